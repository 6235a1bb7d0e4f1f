// VGGBENCH_HD: marks a function both the C++ and the CUDA kernels call (__host__ __device__
// under nvcc), so the CPU tests exercise what the GPU runs. Always inlined: the CPU passes
// call these with vectors (cpu/lanes.h) from code built for AVX2 or AVX-512, which a call
// into the baseline build of the function could not pass in registers.
#pragma once

#if defined(__CUDACC__)
#define VGGBENCH_HD __host__ __device__ __forceinline__
#else
#define VGGBENCH_HD inline __attribute__((always_inline))
#endif
