// Device helpers shared by the foe:: CUDA kernels. NVRTC-compatible: no includes, so CuPy can compile the
// kernels at run time (foe_compile/kernels/cupy_runtime.py) and nvcc builds the same text (csrc/*.cu).
// Storage types: float, foe_bf16, foe_f16 (16-bit patterns, layout-equal to at::BFloat16 / at::Half).
#pragma once

struct foe_bf16 {
  unsigned short bits;
};
struct foe_f16 {
  unsigned short bits;
};

__device__ __forceinline__ float foe_to_float(float x) { return x; }
__device__ __forceinline__ float foe_to_float(foe_bf16 x) { return __uint_as_float(((unsigned int)x.bits) << 16); }
__device__ __forceinline__ float foe_to_float(foe_f16 x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t foe_from_float(float x);
template <>
__device__ __forceinline__ float foe_from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ foe_bf16 foe_from_float<foe_bf16>(float x) {  // round to nearest even, as c10
  unsigned int u = __float_as_uint(x);
  foe_bf16 out;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    out.bits = 0x7fc0;  // NaN
    return out;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  out.bits = (unsigned short)(u >> 16);
  return out;
}
template <>
__device__ __forceinline__ foe_f16 foe_from_float<foe_f16>(float x) {
  foe_f16 out;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(out.bits) : "f"(x));
  return out;
}

// x rounded to the storage type scalar_t and back: reproduces the reference's per-op rounding.
template <typename scalar_t>
__device__ __forceinline__ float foe_round(float x) {
  return foe_to_float(foe_from_float<scalar_t>(x));
}

__device__ __forceinline__ float foe_warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float foe_warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Block-wide sum or max (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ __forceinline__ float foe_block_reduce(float v, bool is_max, float* scratch /*[32] shared*/) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = is_max ? foe_warp_max(v) : foe_warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = scratch[0];
  for (int w = 1; w < warps; ++w) r = is_max ? fmaxf(r, scratch[w]) : r + scratch[w];
  return r;
}

// Dot product of a [n] activation row with a [n] weight row by one warp, fp32 accumulation.
template <typename scalar_t>
__device__ __forceinline__ float foe_warp_dot(const scalar_t* a /*[n]*/, const scalar_t* b /*[n]*/, long long n) {
  float acc = 0.f;
  for (long long i = threadIdx.x & 31; i < n; i += 32) acc += foe_to_float(a[i]) * foe_to_float(b[i]);
  return foe_warp_sum(acc);
}
