// foe::experts_swiglu on CUDA (NVRTC-compatible): a correctness-first, graph-safe path (warp-per-row
// dot products, no tensor cores); the tuned CUDA path for this op is the Triton kernel.
//   foe_experts_up_<dtype>    grid (n sorted positions, ceil(I/8)): hidden[pair] = unit(gate_up_e x + b_e), the
//                             expert unit of reference.expert_unit (blocks of one expert are adjacent, so its
//                             weight rows stay in L2); x is w * x_t, rounded to the dtype, when given
//                             input weights (weight_input, Llama 4)
//   foe_experts_down_<dtype>  grid (T*G, ceil(d/8)): out[g, t] = sum over t's picks in group g, in
//                             ascending expert order, of w * (down_e @ hidden[pair] + c_e) (w = 1 when the
//                             weights are null: they scaled the input); no atomics, so results are
//                             deterministic (CUDA-graph replay equals eager)
// Each step rounds to the dtype where reference.py's ops do; biases join the fp32 dot products before that
// rounding (as F.linear's). The unit is a runtime argument: it costs a few flops per hidden entry, next to
// a d-long dot product.
#pragma once

#include "common.cuh"

#define FOE_ROWS_PER_BLOCK 8  // one warp per output row
#define FOE_EXPERT_THREADS (32 * FOE_ROWS_PER_BLOCK)
// The unit's activation (enum foe::Activation in csrc/foe_ops.h; cupy_runtime.py reads these #defines).
#define FOE_ACT_SILU 0
#define FOE_ACT_GELU 1
#define FOE_ACT_GELU_TANH 2
#define FOE_ACT_RELU2 3  // ungated: gate_up holds I rows per expert, not 2I

// One output of F.linear: the fp32 dot product plus the optional bias entry, rounded once to the dtype.
template <typename scalar_t>
__device__ __forceinline__ float foe_linear_out(float dot, const scalar_t* bias /*entry, or null*/) {
  return foe_round<scalar_t>(bias == nullptr ? dot : dot + foe_to_float(*bias));
}

// torch.clamp: lower bound first, then the upper one (so lo > hi gives hi), and a NaN stays NaN (fminf/fmaxf
// would return the bound).
__device__ __forceinline__ float foe_clamp(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// act(g) of a gated unit, rounded where the reference's ops round: F.silu and F.gelu once, the alpha form
// g * sigmoid(alpha * g) after each of its three ops.
template <typename scalar_t>
__device__ __forceinline__ float foe_gate_activation(float g, int activation, float alpha) {
  if (activation == FOE_ACT_GELU) return foe_round<scalar_t>(0.5f * g * (1.f + erff(g * 0.70710678118654752f)));
  if (activation == FOE_ACT_GELU_TANH) {  // 0.79788456 = sqrt(2 / pi)
    return foe_round<scalar_t>(0.5f * g * (1.f + tanhf(0.79788456080286536f * (g + 0.044715f * g * g * g))));
  }
  if (alpha == 1.f) return foe_round<scalar_t>(g / (1.f + expf(-g)));
  const float sigmoid = foe_round<scalar_t>(1.f / (1.f + expf(-foe_round<scalar_t>(alpha * g))));
  return foe_round<scalar_t>(g * sigmoid);
}

// act(min(g, limit)) * (clamp(u, -limit, limit) + up_offset) from the rounded g and u; no limit is +inf here,
// which leaves g and u as they are.
template <typename scalar_t>
__device__ __forceinline__ float foe_gated_unit(float g, float u, int activation, float alpha, float limit,
                                                float up_offset) {
  g = foe_round<scalar_t>(g > limit ? limit : g);
  u = foe_round<scalar_t>(foe_clamp(u, -limit, limit));
  return foe_round<scalar_t>(foe_gate_activation<scalar_t>(g, activation, alpha) * foe_round<scalar_t>(u + up_offset));
}

// Dot product of the row w * a (each product rounded to scalar_t, as torch's `w * x` in the dtype) with a
// [n] weight row by one warp, fp32 accumulation.
template <typename scalar_t>
__device__ __forceinline__ float foe_warp_dot_weighted(const scalar_t* a /*[n]*/, float w, const scalar_t* b /*[n]*/,
                                                       long long n) {
  float acc = 0.f;
  for (long long i = threadIdx.x & 31; i < n; i += 32) {
    acc += foe_round<scalar_t>(w * foe_to_float(a[i])) * foe_to_float(b[i]);
  }
  return foe_warp_sum(acc);
}

// The expert's input x_t, or w * x_t when input_weight is given, dotted with one gate_up row.
template <typename scalar_t>
__device__ __forceinline__ float foe_input_dot(const scalar_t* x /*[d]*/, const scalar_t* input_weight /*or null*/,
                                               const scalar_t* row /*[d]*/, long long d) {
  return input_weight == nullptr ? foe_warp_dot(x, row, d)
                                 : foe_warp_dot_weighted(x, foe_to_float(*input_weight), row, d);
}

template <typename scalar_t>
__device__ void foe_experts_up(const scalar_t* x /*[T,d]*/, const scalar_t* gate_up /*[E,2I,d] or [E,I,d]*/,
                               const scalar_t* gate_up_bias /*[E,2I] or [E,I], or null*/,
                               const long long* ids /*[T*k]*/, const long long* pairs /*[n]*/,
                               const scalar_t* input_weights /*[T*k] routing weights scaling x, or null*/,
                               long long d, long long inter, int k, int activation, float alpha, float limit,
                               float up_offset, float* hidden /*[n,I], indexed by pair*/) {
  const long long pair = pairs[blockIdx.x];
  const long long token = pair / k, expert = ids[pair];
  const long long row = (long long)blockIdx.y * FOE_ROWS_PER_BLOCK + (threadIdx.x >> 5);
  if (row >= inter) return;
  const bool gated = activation != FOE_ACT_RELU2;
  const long long rows = gated ? 2 * inter : inter;  // gate_up rows per expert
  const scalar_t* gate_row = gate_up + (expert * rows + row) * d;
  const scalar_t* bias = gate_up_bias == nullptr ? nullptr : gate_up_bias + expert * rows + row;
  const scalar_t* input_weight = input_weights == nullptr ? nullptr : input_weights + pair;
  const float gate = foe_linear_out<scalar_t>(foe_input_dot(x + token * d, input_weight, gate_row, d), bias);
  float unit;
  if (gated) {
    const float up = foe_linear_out<scalar_t>(foe_input_dot(x + token * d, input_weight, gate_row + inter * d, d),
                                              bias == nullptr ? nullptr : bias + inter);
    unit = foe_gated_unit<scalar_t>(gate, up, activation, alpha, limit, up_offset);
  } else {  // relu2; `gate < 0` keeps a NaN as torch.relu does
    const float relu = gate < 0.f ? 0.f : gate;
    unit = foe_round<scalar_t>(relu * relu);
  }
  if ((threadIdx.x & 31) == 0) hidden[pair * inter + row] = unit;
}

template <typename scalar_t>
__device__ void foe_experts_down(const scalar_t* down /*[E,d,I]*/, const scalar_t* down_bias /*[E,d], or null*/,
                                 const long long* ids /*[T,k]*/, const scalar_t* weights /*[T,k], or null: w = 1*/,
                                 const float* hidden /*[T*k,I]*/, long long d,
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
    const scalar_t* bias = down_bias == nullptr ? nullptr : down_bias + expert * d + row;
    const float w = weights == nullptr ? 1.f : foe_to_float(weights[token * k + slot]);
    y = foe_round<scalar_t>(foe_linear_out<scalar_t>(foe_warp_sum(y), bias) * w);
    acc = foe_round<scalar_t>(acc + y);
  }
  if ((threadIdx.x & 31) == 0) out[((long long)group * T + token) * d + row] = foe_from_float<scalar_t>(acc);
}

#define FOE_EXPERTS_ENTRY(SUFFIX, TYPE)                                                                           \
  extern "C" __global__ void __launch_bounds__(FOE_EXPERT_THREADS) foe_experts_up_##SUFFIX(                       \
      const TYPE* x, const TYPE* gate_up, const TYPE* gate_up_bias, const long long* ids, const long long* pairs, \
      const TYPE* input_weights, long long d, long long inter, int k, int activation, float alpha, float limit,  \
      float up_offset, float* hidden) {                                                                           \
    foe_experts_up<TYPE>(x, gate_up, gate_up_bias, ids, pairs, input_weights, d, inter, k, activation, alpha,     \
                         limit, up_offset, hidden);                                                               \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(FOE_EXPERT_THREADS) foe_experts_down_##SUFFIX(                     \
      const TYPE* down, const TYPE* down_bias, const long long* ids, const TYPE* weights, const float* hidden,    \
      long long d, long long inter, int k, int experts_per_group, int groups, long long T, TYPE* out) {           \
    foe_experts_down<TYPE>(down, down_bias, ids, weights, hidden, d, inter, k, experts_per_group, groups, T,      \
                           out);                                                                                  \
  }
FOE_EXPERTS_ENTRY(f32, float)
FOE_EXPERTS_ENTRY(bf16, foe_bf16)
FOE_EXPERTS_ENTRY(f16, foe_f16)
