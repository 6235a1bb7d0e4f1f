"""Build script: metadata lives in pyproject.toml; this adds the C++/CUDA extension.

The fused conv -> BatchNorm -> (+residual) -> LeakyReLU op (csrc/) builds as
`vggbench._C`:
  - a CUDAExtension (csrc/**/*.cpp + csrc/cuda/*.cu) when a CUDA toolkit is found
    (CUDA_HOME, else the toolkit holding nvcc, else /usr/local/cuda) or
    VGGBENCH_FORCE_CUDA=1; without a visible GPU it compiles for
    TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"),
  - a CppExtension (CPU kernels only) otherwise: no toolkit, a CPU-only torch, or
    VGGBENCH_CPU_ONLY=1.
DEBUG=1 builds with -O0 -g. Install with `pip install --no-build-isolation -e .` so the
build uses the installed torch.
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

from setuptools import setup


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> str | None:
    """A CUDA toolkit root: a directory with bin/nvcc and lib64/libcudart.so.

    torch guesses the root as the parent of whichever `nvcc` is first on PATH, which is
    wrong when that nvcc is a wrapper script (linking then fails with "cannot find
    -lcudart"), so look for a real root first and tell torch through CUDA_HOME.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates.append("/usr/local/cuda")
    for root in filter(None, candidates):
        if (Path(root) / "bin" / "nvcc").exists() and any((Path(root) / "lib64").glob("libcudart.so*")):
            return root
    return None


def extension():
    import torch

    cpu_only = env_flag("VGGBENCH_CPU_ONLY") or torch.version.cuda is None  # a CPU-only torch
    cuda_home = None if cpu_only else find_cuda_home()
    if env_flag("VGGBENCH_FORCE_CUDA") and not cuda_home:
        raise RuntimeError(
            "VGGBENCH_FORCE_CUDA=1 but CUDA cannot be built: it needs a CUDA build of torch "
            f"(this one: {torch.__version__}) and a CUDA toolkit; set CUDA_HOME to the toolkit root "
            "(the directory holding bin/nvcc and lib64/libcudart.so)"
        )
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension on import
    from torch.utils import cpp_extension  # after CUDA_HOME is settled

    use_cuda = cuda_home is not None
    if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if not torch.cuda.is_available():  # with a GPU, torch targets the GPUs it sees
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    optimise = ["-O0", "-g"] if env_flag("DEBUG") else ["-O3"]
    # OpenMP: at::parallel_for in the CPU kernels runs on torch's thread pool only when the
    # extension is compiled with it (otherwise it silently runs on one thread)
    openmp = ["-fopenmp"]
    # lets the compiler turn `v > 0 ? v : v * slope` into a vector select (the results are
    # unchanged; only floating-point exception flags, which nothing here reads, may differ)
    vectorise = ["-fno-trapping-math"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    extra = {"cxx": optimise + openmp + vectorise}
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = optimise
        print(f"vggbench: building the CPU and CUDA kernels (CUDA_HOME={cuda_home})")
        return cpp_extension.CUDAExtension("vggbench._C", sources, extra_compile_args=extra,
                                           extra_link_args=openmp)
    print("vggbench: building the CPU kernels only (no CUDA toolkit or CUDA torch, or VGGBENCH_CPU_ONLY=1)")
    return cpp_extension.CppExtension("vggbench._C", sources, extra_compile_args=extra,
                                      extra_link_args=openmp)


ext_modules = [extension()]
from torch.utils.cpp_extension import BuildExtension  # noqa: E402  (after extension() set CUDA_HOME)

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension})
