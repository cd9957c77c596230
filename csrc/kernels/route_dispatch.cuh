// foe::sum_route_dispatch on CUDA (NVRTC-compatible, no includes besides common.cuh).
// Split path (default; the launcher computes logits = F.linear(xn, router_weight) with cuBLAS in between,
// exactly the reference's call, so the logits are the reference's bit for bit):
//   foe_route_norm_<dtype>    one block per token: r = mean_h(residual + partials), xn = RMSNorm(r) * w
//                             (16-byte vector loads when `vec`), fp32 accumulation, the reference's roundings
//   foe_route_topk_<dtype>    one warp per token, several tokens per block: fp32 scores of the dtype logits:
//                             softmax (ATen's warp softmax order: lane sums of e = lane + 32i, xor butterfly,
//                             divide), sigmoid or sqrt(softplus) (ATen's CUDA formulas); quota top-(k/H) per
//                             expert block of the selection = scores (+ fp32 correction bias) (ties to the lower
//                             id, NaN largest); weights = the picked scores, renormalised, times the scaling.
//                             router_bias is the launcher's: at::linear(xn, router_weight, router_bias)
//                             Variants (reference.py): group limit (n_group <= 64 groups scored by their top-2
//                             selection sum, the topk_group best kept, ties to the lower group id, NaN largest;
//                             the others' selection -inf or 0), topk_first (selection = the logits, weights = the
//                             score of the picked logits: softmax over the k picks, sigmoid, sqrt(softplus)),
//                             renormalisation by max(sum + renorm_eps, renorm_min), times expert_scale[id]
//   foe_group_small           one block, T*k <= FOE_GROUP_SMALL: counts, scan, warp-serial stable placement
//   foe_count_tiles           picks per (expert, tile of FOE_TILE pairs), expert-major
//   foe_scan_flat             one block: exclusive scan of the expert-major counts = each (expert, tile)'s
//                             first output slot; expert_offsets read off it
//   foe_place_tiles           each pair's rank among earlier same-expert pairs of its tile -> its slot
// Fused path (kept selectable, FOE_CUDA_ROUTE=fused): foe_route_tokens_<dtype>, one block per token doing
// norm, router GEMV on CUDA cores, softmax and top-k.
// Grouping is deterministic and stable: pairs of one expert come out in ascending order, exactly as the
// reference's stable sort. No atomics on global memory, no host synchronisation, CUDA-graph safe.
// NaN: a row whose probabilities are NaN still gets k/H distinct ids in each block (foe_pick_best ranks NaN
// first, lower id on ties) and NaN weights; the grouping kernels trap on an id outside [0, E).
#pragma once

#include "common.cuh"

#define FOE_ROUTE_THREADS 256
#define FOE_TILE 256
#define FOE_NORM_THREADS 256
#define FOE_TOPK_WARPS 8
#define FOE_MAX_GROUPS 64  // n_group of a group limit: a bit per group in a 64-bit mask
#define FOE_GROUP_THREADS 1024
#define FOE_GROUP_SMALL 4096
#define FOE_SCAN_THREADS 1024
// Router scores (foe::Scoring in foe_ops.h).
#define FOE_SCORE_SOFTMAX 0
#define FOE_SCORE_SIGMOID 1
#define FOE_SCORE_SQRTSOFTPLUS 2

// Selection rule of both CUDA route kernels (and the rule the C++ kernel's torch.topk order agrees with
// wherever values are distinct): NaN ranks above every number, as torch.topk; among equal keys (ties, or
// several NaNs) the lower expert id wins. Taken experts hold FOE_TAKEN and never win again.
// NOTE: torch.topk on CPU leaves ties in its nth_element order (the C++ kernel reproduces it), on CUDA in
// its radix-select order: on exact ties the CUDA kernels may pick other (equally scored) experts than the
// reference; every id is still in [0, E) and a NaN row's weights are NaN either way.
#define FOE_TAKEN (-1.f)

// Key of a probability p in [0, 1] or NaN for the comparison above: NaN -> 2 (above every probability).
__device__ __forceinline__ float foe_rank_key(float p) { return p != p ? 2.f : p; }

// The winning expert id of probs[begin, end) (shared memory), computed by a whole warp (all 32 lanes call).
// Always in [begin, end): every untaken key (NaN included) is >= 0 > FOE_TAKEN, so an untaken expert wins
// while one is left (the launchers ask for k / H <= E / H picks per block); were all taken, `begin` comes back.
__device__ __forceinline__ int foe_pick_best(const float* probs, int begin, int end) {
  const int lane = threadIdx.x & 31;
  float best = FOE_TAKEN;
  int best_id = begin;
  for (int e = begin + lane; e < end; e += 32) {
    const float key = foe_rank_key(probs[e]);
    if (key > best) best = key, best_id = e;  // ascending e: keeps the lower id on ties
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int other_id = __shfl_xor_sync(0xffffffffu, best_id, offset);
    if (other > best || (other == best && other_id < best_id)) best = other, best_id = other_id;
  }
  return best_id;
}

template <typename scalar_t>
__device__ void foe_route_tokens(const scalar_t* residual /*[Hr,T,d]*/, long long residual_group_stride /*0 or T*d*/,
                                 const scalar_t* partials /*[H,T,d]*/, const scalar_t* norm_weight /*[d]*/,
                                 const scalar_t* router_weight /*[E,d]*/, float eps, int H, long long T, long long d,
                                 int E, int k, int renormalize, scalar_t* r /*[T,d]*/, scalar_t* xn /*[T,d]*/,
                                 long long* ids /*[T,k]*/, scalar_t* weights /*[T,k]*/) {
  extern __shared__ float probs[];  // [E] logits, then probabilities; followed by picked [k]
  float* picked = probs + E;
  __shared__ float scratch[32];
  const long long t = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;

  float sumsq = 0.f;
  for (long long i = threadIdx.x; i < d; i += blockDim.x) {
    float acc = 0.f;
    for (int h = 0; h < H; ++h) {
      acc += foe_round<scalar_t>(foe_to_float(residual[h * residual_group_stride + t * d + i]) +
                                 foe_to_float(partials[(h * T + t) * d + i]));
    }
    const scalar_t ri = foe_from_float<scalar_t>(acc * (1.f / (float)H));  // ATen's CUDA mean (foe_norm_row)
    r[t * d + i] = ri;
    sumsq += foe_to_float(ri) * foe_to_float(ri);
  }
  const float rstd = rsqrtf(foe_block_reduce(sumsq, false, scratch) / (float)d + eps);
  for (long long i = threadIdx.x; i < d; i += blockDim.x) {
    const float normed = foe_round<scalar_t>(foe_to_float(r[t * d + i]) * rstd);
    xn[t * d + i] = foe_from_float<scalar_t>(foe_to_float(norm_weight[i]) * normed);
  }
  __syncthreads();  // xn row visible to the whole block

  for (int e = warp; e < E; e += warps) {
    const float logit = foe_warp_dot(xn + t * d, router_weight + (long long)e * d, d);
    if (lane == 0) probs[e] = foe_round<scalar_t>(logit);  // F.linear rounds the logits to the dtype
  }
  __syncthreads();
  float local_max = -3.402823466e38f;
  for (int e = threadIdx.x; e < E; e += blockDim.x) local_max = fmaxf(local_max, probs[e]);
  const float max_logit = foe_block_reduce(local_max, true, scratch);
  float local_sum = 0.f;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    probs[e] = expf(probs[e] - max_logit);
    local_sum += probs[e];
  }
  const float inv_total = 1.f / foe_block_reduce(local_sum, false, scratch);
  for (int e = threadIdx.x; e < E; e += blockDim.x) probs[e] *= inv_total;
  __syncthreads();

  const int block = E / H, per_group = k / H;
  for (int g = warp; g < H; g += warps) {
    for (int j = 0; j < per_group; ++j) {
      const int best_id = foe_pick_best(probs, g * block, (g + 1) * block);
      if (lane == 0) {
        ids[t * k + g * per_group + j] = best_id;
        picked[g * per_group + j] = probs[best_id];
        probs[best_id] = FOE_TAKEN;
      }
      __syncwarp();
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int j = 0; j < k; ++j) sum += picked[j];
    for (int j = 0; j < k; ++j) weights[t * k + j] = foe_from_float<scalar_t>(renormalize ? picked[j] / sum : picked[j]);
  }
}

#define FOE_ROUTE_ENTRY(SUFFIX, TYPE)                                                                           \
  extern "C" __global__ void __launch_bounds__(FOE_ROUTE_THREADS) foe_route_tokens_##SUFFIX(                    \
      const TYPE* residual, long long residual_group_stride, const TYPE* partials, const TYPE* norm_weight,      \
      const TYPE* router_weight, float eps, int H, long long T, long long d, int E, int k, int renormalize,       \
      TYPE* r, TYPE* xn, long long* ids, TYPE* weights) {                                                       \
    foe_route_tokens<TYPE>(residual, residual_group_stride, partials, norm_weight, router_weight, eps, H, T, d, \
                           E, k, renormalize, r, xn, ids, weights);                                             \
  }
FOE_ROUTE_ENTRY(f32, float)
FOE_ROUTE_ENTRY(bf16, foe_bf16)
FOE_ROUTE_ENTRY(f16, foe_f16)

// ---- split path ---------------------------------------------------------------------------------------

template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) foe_pack {
  scalar_t v[V];
};

// V elements per chunk (V > 1 needs d % V == 0 and 16-byte aligned rows; the launcher checks).
template <typename scalar_t, int V>
__device__ __forceinline__ void foe_norm_row(const scalar_t* __restrict__ residual, long long residual_group_stride,
                                             const scalar_t* __restrict__ partials,
                                             const scalar_t* __restrict__ norm_weight, float eps, int H, long long T,
                                             long long d, long long t, scalar_t* __restrict__ r,
                                             scalar_t* __restrict__ xn, float* scratch) {
  typedef foe_pack<scalar_t, V> pack;
  const long long chunks = d / V;
  float sumsq = 0.f;
  for (long long c = threadIdx.x; c < chunks; c += blockDim.x) {
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.f;
    for (int h = 0; h < H; ++h) {
      const pack a = *reinterpret_cast<const pack*>(residual + h * residual_group_stride + t * d + c * V);
      const pack b = *reinterpret_cast<const pack*>(partials + (h * T + t) * d + c * V);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += foe_round<scalar_t>(foe_to_float(a.v[i]) + foe_to_float(b.v[i]));
    }
    pack out;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      // ATen's CUDA mean (MeanOps): fp32 sum times the fp32 factor 1/H, rounded once; rounding the sum to the
      // dtype first would overflow fp16 where the mean does not.
      out.v[i] = foe_from_float<scalar_t>(acc[i] * (1.f / (float)H));
      const float ri = foe_to_float(out.v[i]);
      sumsq += ri * ri;
    }
    *reinterpret_cast<pack*>(r + t * d + c * V) = out;
  }
  const float rstd = rsqrtf(foe_block_reduce(sumsq, false, scratch) / (float)d + eps);
  for (long long c = threadIdx.x; c < chunks; c += blockDim.x) {  // the same chunks this thread wrote
    const pack a = *reinterpret_cast<const pack*>(r + t * d + c * V);
    const pack w = *reinterpret_cast<const pack*>(norm_weight + c * V);
    pack out;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float normed = foe_round<scalar_t>(foe_to_float(a.v[i]) * rstd);
      out.v[i] = foe_from_float<scalar_t>(foe_to_float(w.v[i]) * normed);
    }
    *reinterpret_cast<pack*>(xn + t * d + c * V) = out;
  }
}

// grid = T (1-D), block = FOE_NORM_THREADS, no dynamic shared memory.
#define FOE_NORM_ENTRY(SUFFIX, TYPE)                                                                              \
  extern "C" __global__ void __launch_bounds__(FOE_NORM_THREADS) foe_route_norm_##SUFFIX(                         \
      const TYPE* __restrict__ residual, long long residual_group_stride, const TYPE* __restrict__ partials,       \
      const TYPE* __restrict__ norm_weight, float eps, int H, long long T, long long d, int vec,                   \
      TYPE* __restrict__ r, TYPE* __restrict__ xn) {                                                              \
    __shared__ float scratch[32];                                                                                 \
    const long long t = blockIdx.x;                                                                               \
    if (vec) {                                                                                                    \
      foe_norm_row<TYPE, 16 / sizeof(TYPE)>(residual, residual_group_stride, partials, norm_weight, eps, H, T, d,  \
                                            t, r, xn, scratch);                                                  \
    } else {                                                                                                      \
      foe_norm_row<TYPE, 1>(residual, residual_group_stride, partials, norm_weight, eps, H, T, d, t, r, xn,        \
                            scratch);                                                                             \
    }                                                                                                             \
  }
FOE_NORM_ENTRY(f32, float)
FOE_NORM_ENTRY(bf16, foe_bf16)
FOE_NORM_ENTRY(f16, foe_f16)

// Rank of selection value v of expert e in the split kernel's total order: NaN above every number (+Inf
// included), then by value (-0 == +0), ties to the lower id. Distinct per e; every rank is > 0.
__device__ __forceinline__ unsigned long long foe_select_rank(float v, int e) {
  unsigned key = 0xFFFFFFFFu;  // NaN
  if (v == v) {
    const unsigned bits = __float_as_uint(v == 0.f ? 0.f : v);
    key = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);  // order-preserving: -Inf -> 0x007FFFFF
  }
  return ((unsigned long long)key << 32) | (unsigned)(0x7FFFFFFF - e);
}

// The next pick of block [begin, end) (whole warp; all 32 lanes call): the highest rank below `below` (the
// previous pick's rank; ~0 for the first). Selection = scores (+ correction), `fill` for the experts of a group
// whose bit is clear in `kept` (group e / group_size; kept = ~0: no group limit). Returns the rank; its id is
// foe_rank_id(rank), always in [begin, end) (begin were there none left: the launchers ask for k/H <= E/H).
__device__ __forceinline__ float foe_selection(const float* scores, const float* __restrict__ correction, int e) {
  return correction ? scores[e] + correction[e] : scores[e];
}

__device__ __forceinline__ unsigned long long foe_pick_next(const float* scores, const float* __restrict__ correction,
                                                            int begin, int end, unsigned long long below,
                                                            unsigned long long kept, int group_size, float fill) {
  const int lane = threadIdx.x & 31;
  unsigned long long best = 0;
  for (int e = begin + lane; e < end; e += 32) {
    const bool masked = kept != ~0ull && !((kept >> (e / group_size)) & 1ull);
    const unsigned long long rank = foe_select_rank(masked ? fill : foe_selection(scores, correction, e), e);
    if (rank < below && rank > best) best = rank;
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const unsigned long long other = __shfl_xor_sync(0xffffffffu, best, offset);
    if (other > best) best = other;
  }
  return best;
}

__device__ __forceinline__ int foe_rank_id(unsigned long long rank, int begin) {
  return rank == 0 ? begin : 0x7FFFFFFF - (int)(rank & 0xFFFFFFFFull);
}

// ATen's CUDA formulas in fp32 (sigmoid: 1 / (1 + exp(-x)); softplus, beta 1, threshold 20).
__device__ __forceinline__ float foe_score(int scoring, float x) {
  if (scoring == FOE_SCORE_SIGMOID) return 1.f / (1.f + expf(-x));
  return sqrtf(x > 20.f ? x : log1pf(expf(x)));  // FOE_SCORE_SQRTSOFTPLUS
}

// The groups kept by a group limit (reference.limit_groups), as a bit mask over n_group <= 64 groups, computed
// by lane 0 (n_group and the group sizes are small): group g scores the sum of the top-2 selection values of
// experts [g * size, (g + 1) * size) (top-2 by foe_select_rank: NaN first); the topk_group best scores (same
// order: NaN first, ties to the lower group id) are kept.
__device__ __forceinline__ unsigned long long foe_kept_groups(const float* scores, const float* __restrict__ correction,
                                                              int E, int n_group, int topk_group) {
  const int size = E / n_group;
  float group_score[FOE_MAX_GROUPS];
  for (int g = 0; g < n_group; ++g) {
    unsigned long long first = 0, second = 0;
    for (int e = g * size; e < (g + 1) * size; ++e) {
      const unsigned long long rank = foe_select_rank(foe_selection(scores, correction, e), e);
      if (rank > first) second = first, first = rank;
      else if (rank > second) second = rank;
    }
    group_score[g] = foe_selection(scores, correction, foe_rank_id(first, 0)) +
                     foe_selection(scores, correction, foe_rank_id(second, 0));
  }
  unsigned long long kept = 0;
  for (int i = 0; i < topk_group; ++i) {
    unsigned long long best = 0;
    for (int g = 0; g < n_group; ++g) {
      const unsigned long long rank = foe_select_rank(group_score[g], g);
      if (!((kept >> g) & 1ull) && rank > best) best = rank;
    }
    kept |= 1ull << foe_rank_id(best, 0);
  }
  return kept;
}

// One warp per token. Shared memory per warp: E + k floats (scores, then the k picked scores).
template <typename scalar_t>
__device__ __forceinline__ void foe_route_topk(const scalar_t* __restrict__ logits /*[T,E] in the dtype*/,
                                               long long T, int E, int H, int k, int renormalize, int scoring,
                                               const float* __restrict__ correction /*[E] fp32 or null*/,
                                               float scaling, int n_group, int topk_group, int fill_zero,
                                               const float* __restrict__ expert_scale /*[E] fp32 or null*/,
                                               float renorm_eps, float renorm_min, int topk_first,
                                               long long* __restrict__ ids /*[T,k]*/,
                                               scalar_t* __restrict__ weights /*[T,k]*/, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long t = (long long)blockIdx.x * (blockDim.x >> 5) + warp;
  if (t >= T) return;  // the whole warp leaves together: the shuffles below see all 32 lanes
  float* probs = shared + (long long)warp * (E + k);
  float* picked = probs + E;
  const scalar_t* row = logits + t * E;

  if (topk_first) {  // select on the logits; the picks are scored below
    for (int e = lane; e < E; e += 32) probs[e] = foe_to_float(row[e]);
  } else if (scoring == FOE_SCORE_SOFTMAX) {
    float max_logit = -3.402823466e38f;
    for (int e = lane; e < E; e += 32) {
      const float logit = foe_to_float(row[e]);  // F.linear's dtype logits, .float(): exact
      probs[e] = logit;
      max_logit = fmaxf(max_logit, logit);
    }
    max_logit = foe_warp_max(max_logit);
    float sum = 0.f;
    for (int e = lane; e < E; e += 32) {
      const float p = expf(probs[e] - max_logit);
      probs[e] = p;
      sum += p;  // ATen's warp softmax: each lane sums e = lane + 32 i in order, then an xor butterfly
    }
    sum = foe_warp_sum(sum);
    for (int e = lane; e < E; e += 32) probs[e] = probs[e] / sum;
  } else {
    for (int e = lane; e < E; e += 32) probs[e] = foe_score(scoring, foe_to_float(row[e]));
  }
  __syncwarp();

  unsigned long long kept = ~0ull;  // no group limit
  if (n_group > 1) {
    if (lane == 0) kept = foe_kept_groups(probs, correction, E, n_group, topk_group);
    kept = __shfl_sync(0xffffffffu, kept, 0);
  }
  const float fill = fill_zero ? 0.f : -__int_as_float(0x7f800000);  // -inf
  // Picks in the total order of foe_select_rank (the order of foe_pick_best, without marking taken experts:
  // the scores stay intact for the weights, and a corrected selection may be negative).
  const int block = E / H, per_group = k / H;
  for (int g = 0; g < H; ++g) {
    unsigned long long below = ~0ull;
    for (int j = 0; j < per_group; ++j) {
      below = foe_pick_next(probs, correction, g * block, (g + 1) * block, below, kept, E / n_group, fill);
      const int best_id = foe_rank_id(below, g * block);
      if (lane == 0) {
        ids[t * k + g * per_group + j] = best_id;
        picked[g * per_group + j] = probs[best_id];
      }
    }
  }
  __syncwarp();
  if (topk_first && lane == 0) {  // the picked logits -> their scores (softmax over the k picks)
    if (scoring == FOE_SCORE_SOFTMAX) {
      float max_logit = -3.402823466e38f, sum = 0.f;
      for (int j = 0; j < k; ++j) max_logit = fmaxf(max_logit, picked[j]);
      for (int j = 0; j < k; ++j) sum += (picked[j] = expf(picked[j] - max_logit));
      for (int j = 0; j < k; ++j) picked[j] = picked[j] / sum;
    } else {
      for (int j = 0; j < k; ++j) picked[j] = foe_score(scoring, picked[j]);
    }
  }
  __syncwarp();  // also orders lane 0's ids writes before the other lanes read them (expert_scale)
  float total = 0.f;
  for (int j = 0; j < k; ++j) total += picked[j];  // every lane, the same order
  if (renorm_eps != 0.f) total += renorm_eps;
  if (renorm_min != 0.f && total < renorm_min) total = renorm_min;  // a NaN total stays NaN, as clamp
  for (int j = lane; j < k; j += 32) {  // x * 1.f is x exactly: the default call's weights are unscaled
    float w = (renormalize ? picked[j] / total : picked[j]) * scaling;
    if (expert_scale) w *= expert_scale[ids[t * k + j]];
    weights[t * k + j] = foe_from_float<scalar_t>(w);
  }
}

// grid = ceil(T / warps), block = 32 * warps, shared = warps * (E + k) floats. correction, expert_scale: [E]
// fp32 or null. n_group <= 64 (1: no group limit).
#define FOE_TOPK_ENTRY(SUFFIX, TYPE)                                                                          \
  extern "C" __global__ void __launch_bounds__(32 * FOE_TOPK_WARPS) foe_route_topk_##SUFFIX(                  \
      const TYPE* __restrict__ logits, long long T, int E, int H, int k, int renormalize, int scoring,         \
      const float* __restrict__ correction, float scaling, int n_group, int topk_group, int fill_zero,         \
      const float* __restrict__ expert_scale, float renorm_eps, float renorm_min, int topk_first,              \
      long long* __restrict__ ids, TYPE* __restrict__ weights) {                                              \
    extern __shared__ float foe_topk_shared[];                                                                \
    foe_route_topk<TYPE>(logits, T, E, H, k, renormalize, scoring, correction, scaling, n_group, topk_group,  \
                         fill_zero, expert_scale, renorm_eps, renorm_min, topk_first, ids, weights,           \
                         foe_topk_shared);                                                                    \
  }
FOE_TOPK_ENTRY(f32, float)
FOE_TOPK_ENTRY(bf16, foe_bf16)
FOE_TOPK_ENTRY(f16, foe_f16)

// ---- grouping ---------------------------------------------------------------------------------------

// Exclusive scan over one warp's values; every lane gets its exclusive prefix and the warp total.
__device__ __forceinline__ int foe_warp_exclusive_scan(int value, int* total) {
  const int lane = threadIdx.x & 31;
  int inclusive = value;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  *total = __shfl_sync(0xffffffffu, inclusive, 31);
  return inclusive - value;
}

// An expert id read by the grouping kernels (first readers of ids; foe_place_tiles runs after foe_count_tiles).
// The top-k kernels emit ids in [0, E) only (NaN rows included), so this never fires; were a bug to emit
// another id, the launch stops (cudaErrorLaunchFailure, the context is lost, like a device-side assert)
// instead of writing out of bounds. One compare per pair.
__device__ __forceinline__ int foe_checked_expert(long long e, int E) {
  if ((unsigned long long)e >= (unsigned long long)E) __trap();
  return (int)e;
}

// grid = 1, block = FOE_GROUP_THREADS, shared = (E + n) ints, n = T*k <= FOE_GROUP_SMALL.
extern "C" __global__ void __launch_bounds__(FOE_GROUP_THREADS) foe_group_small(const long long* __restrict__ ids,
                                                                                int n, int E,
                                                                                long long* __restrict__ pairs,
                                                                                long long* __restrict__ offsets) {
  extern __shared__ int foe_group_shared[];
  int* cursor = foe_group_shared;         // [E] counts, then each expert's next free slot
  int* expert = foe_group_shared + E;     // [n] ids as int
  for (int e = threadIdx.x; e < E; e += blockDim.x) cursor[e] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < n; p += blockDim.x) {
    const int e = foe_checked_expert(ids[p], E);
    expert[p] = e;
    atomicAdd(&cursor[e], 1);  // shared-memory counts: order does not matter
  }
  __syncthreads();
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  int carry = 0;
  for (int base = 0; base < E; base += 32) {
    const int e = base + lane;
    const int count = e < E ? cursor[e] : 0;
    int chunk_total;
    const int start = carry + foe_warp_exclusive_scan(count, &chunk_total);
    if (e < E) {
      cursor[e] = start;
      offsets[e] = start;
    }
    carry += chunk_total;
  }
  if (lane == 0) offsets[E] = carry;
  __syncwarp();
  for (int base = 0; base < n; base += 32) {  // 32 pairs at a time, in order: stable
    const int p = base + lane;
    const int e = p < n ? expert[p] : -1 - lane;  // inactive lanes match nobody
    const unsigned same = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(same & ((1u << lane) - 1u));
    int slot = 0;
    if (p < n) slot = cursor[e] + rank;
    __syncwarp();  // every lane has read its expert's cursor
    if (p < n) {
      pairs[slot] = p;
      if (rank == 0) cursor[e] += __popc(same);
    }
    __syncwarp();
  }
}

// grid = tiles, block = FOE_TILE, shared = E ints. tile_counts is expert-major: [E, tiles].
extern "C" __global__ void __launch_bounds__(FOE_TILE) foe_count_tiles(const long long* __restrict__ ids /*[n]*/,
                                                                        int n, int E, int tiles,
                                                                        int* __restrict__ tile_counts /*[E,tiles]*/) {
  extern __shared__ int histogram[];  // [E]
  for (int e = threadIdx.x; e < E; e += blockDim.x) histogram[e] = 0;
  __syncthreads();
  const long long p = (long long)blockIdx.x * FOE_TILE + threadIdx.x;
  if (p < n) atomicAdd(&histogram[foe_checked_expert(ids[p], E)], 1);  // shared-memory counts: any order
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) tile_counts[(long long)e * tiles + blockIdx.x] = histogram[e];
}

// grid = 1, block = FOE_SCAN_THREADS. Exclusive scan of data [E*tiles] in place (each thread a contiguous
// chunk), then offsets[e] = data[e*tiles] (expert e's first slot), offsets[E] = the total.
extern "C" __global__ void __launch_bounds__(FOE_SCAN_THREADS) foe_scan_flat(int* __restrict__ data, int tiles, int E,
                                                                            long long* __restrict__ offsets) {
  __shared__ int warp_start[32];
  __shared__ int grand_total;
  const long long length = (long long)E * tiles;
  const long long chunk = (length + blockDim.x - 1) / blockDim.x;
  const long long begin = min(length, (long long)threadIdx.x * chunk), end = min(length, begin + chunk);
  int local = 0;
  for (long long i = begin; i < end; ++i) local += data[i];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int warp_total;
  const int within = foe_warp_exclusive_scan(local, &warp_total);
  if (lane == 0) warp_start[warp] = warp_total;
  __syncthreads();
  if (warp == 0) {
    const int total_of_warp = lane < warps ? warp_start[lane] : 0;
    int all;
    const int start = foe_warp_exclusive_scan(total_of_warp, &all);
    __syncwarp();
    if (lane < warps) warp_start[lane] = start;
    if (lane == 0) grand_total = all;
  }
  __syncthreads();
  int running = warp_start[warp] + within;
  for (long long i = begin; i < end; ++i) {
    const int count = data[i];
    data[i] = running;
    running += count;
  }
  __syncthreads();  // global writes of the block visible to the block
  for (int e = threadIdx.x; e < E; e += blockDim.x) offsets[e] = data[(long long)e * tiles];
  if (threadIdx.x == 0) offsets[E] = grand_total;
}

// grid = tiles, block = FOE_TILE.
extern "C" __global__ void __launch_bounds__(FOE_TILE) foe_place_tiles(const long long* __restrict__ ids /*[n]*/,
                                                                        int n, int E, int tiles,
                                                                        const int* __restrict__ tile_starts /*[E,tiles]*/,
                                                                        long long* __restrict__ pairs /*[n]*/) {
  __shared__ int tile_ids[FOE_TILE];
  const long long p = (long long)blockIdx.x * FOE_TILE + threadIdx.x;
  tile_ids[threadIdx.x] = p < n ? (int)ids[p] : -1;
  __syncthreads();
  if (p >= n) return;
  const int e = tile_ids[threadIdx.x];
  int rank = 0;
  for (int q = 0; q < (int)threadIdx.x; ++q) rank += tile_ids[q] == e;
  pairs[tile_starts[(long long)e * tiles + blockIdx.x] + rank] = p;
}
