"""Build script.

Metadata lives in pyproject.toml. The fused conv->BN->act extension (csrc/) plugs in
here as `ext_modules=[CppExtension or CUDAExtension]` with
`cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension}`; install with
`pip install --no-build-isolation -e .` so the build sees the installed torch.
"""

from setuptools import setup

setup()
