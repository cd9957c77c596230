// foe::experts_swiglu on CUDA (NVRTC-compatible): a correctness-first, graph-safe path (warp-per-row
// dot products, no tensor cores); the tuned CUDA path for this op is the Triton kernel.
//   foe_experts_up_<dtype>    grid (n sorted positions, ceil(I/8)): hidden[pair] = silu(gate x) * up x
//                             (blocks of one expert are adjacent, so its weight rows stay in L2)
//   foe_experts_down_<dtype>  grid (T*G, ceil(d/8)): out[g, t] = sum over t's picks in group g, in
//                             ascending expert order, of w * (down_e @ hidden[pair]); no atomics, so
//                             results are deterministic (CUDA-graph replay equals eager)
// Each step rounds to the dtype where reference.py's ops do.
#pragma once

#include "common.cuh"

#define FOE_ROWS_PER_BLOCK 8  // one warp per output row
#define FOE_EXPERT_THREADS (32 * FOE_ROWS_PER_BLOCK)

template <typename scalar_t>
__device__ void foe_experts_up(const scalar_t* x /*[T,d]*/, const scalar_t* gate_up /*[E,2I,d]*/,
                               const long long* ids /*[T*k]*/, const long long* pairs /*[n]*/, long long d,
                               long long inter, int k, float* hidden /*[n,I], indexed by pair*/) {
  const long long pair = pairs[blockIdx.x];
  const long long token = pair / k, expert = ids[pair];
  const long long row = (long long)blockIdx.y * FOE_ROWS_PER_BLOCK + (threadIdx.x >> 5);
  if (row >= inter) return;
  const scalar_t* gate_row = gate_up + (expert * 2 * inter + row) * d;
  const float gate = foe_round<scalar_t>(foe_warp_dot(x + token * d, gate_row, d));
  const float up = foe_round<scalar_t>(foe_warp_dot(x + token * d, gate_row + inter * d, d));
  if ((threadIdx.x & 31) == 0) hidden[pair * inter + row] = foe_round<scalar_t>(foe_round<scalar_t>(gate / (1.f + expf(-gate))) * up);
}

template <typename scalar_t>
__device__ void foe_experts_down(const scalar_t* down /*[E,d,I]*/, const long long* ids /*[T,k]*/,
                                 const scalar_t* weights /*[T,k]*/, const float* hidden /*[T*k,I]*/, long long d,
                                 long long inter, int k, int experts_per_group, int groups, long long T,
                                 scalar_t* out /*[G,T,d]*/) {
  const long long token = blockIdx.x / groups;
  const int group = blockIdx.x % groups;
  const long long row = (long long)blockIdx.y * FOE_ROWS_PER_BLOCK + (threadIdx.x >> 5);
  if (row >= d) return;
  float acc = 0.f;
  long long previous_expert = -1;
  int previous_slot = -1;
  for (int step = 0; step < k; ++step) {  // picks in ascending (expert, slot) order: index_add's order
    int slot = -1;
    for (int j = 0; j < k; ++j) {
      const long long e = ids[token * k + j];
      const bool after = e > previous_expert || (e == previous_expert && j > previous_slot);
      if (after && (slot < 0 || e < ids[token * k + slot])) slot = j;
    }
    const long long expert = ids[token * k + slot];
    previous_expert = expert, previous_slot = slot;
    if (expert / experts_per_group != group) continue;
    float y = 0.f;
    const float* h = hidden + (token * k + slot) * inter;
    const scalar_t* down_row = down + (expert * d + row) * inter;
    for (long long i = threadIdx.x & 31; i < inter; i += 32) y += foe_to_float(down_row[i]) * h[i];
    y = foe_round<scalar_t>(foe_round<scalar_t>(foe_warp_sum(y)) * foe_to_float(weights[token * k + slot]));
    acc = foe_round<scalar_t>(acc + y);
  }
  if ((threadIdx.x & 31) == 0) out[((long long)group * T + token) * d + row] = foe_from_float<scalar_t>(acc);
}

#define FOE_EXPERTS_ENTRY(SUFFIX, TYPE)                                                                         \
  extern "C" __global__ void __launch_bounds__(FOE_EXPERT_THREADS) foe_experts_up_##SUFFIX(                     \
      const TYPE* x, const TYPE* gate_up, const long long* ids, const long long* pairs, long long d,             \
      long long inter, int k, float* hidden) {                                                                  \
    foe_experts_up<TYPE>(x, gate_up, ids, pairs, d, inter, k, hidden);                                          \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(FOE_EXPERT_THREADS) foe_experts_down_##SUFFIX(                   \
      const TYPE* down, const long long* ids, const TYPE* weights, const float* hidden, long long d,             \
      long long inter, int k, int experts_per_group, int groups, long long T, TYPE* out) {                      \
    foe_experts_down<TYPE>(down, ids, weights, hidden, d, inter, k, experts_per_group, groups, T, out);         \
  }
FOE_EXPERTS_ENTRY(f32, float)
FOE_EXPERTS_ENTRY(bf16, foe_bf16)
FOE_EXPERTS_ENTRY(f16, foe_f16)
