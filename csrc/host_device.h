// VGGBENCH_HD: marks a function both the C++ and the CUDA kernels call (inline in plain C++,
// __host__ __device__ under nvcc), so the CPU tests exercise what the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define VGGBENCH_HD __host__ __device__ __forceinline__
#else
#define VGGBENCH_HD inline
#endif
