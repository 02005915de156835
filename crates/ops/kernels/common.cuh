// Shared helpers for the kernels: widening any stored element type to f32.
// Weights may be stored as bf16, f16 or f32 (docs/models.md §0); math is always f32.
// NVRTC sees one file: src/cuda/nvrtc_cache.rs splices this text in place of a kernel file's
// include line for it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(float v) { return v; }
