// foe::sum_route_dispatch on CUDA (NVRTC-compatible, no includes besides common.cuh).
//   foe_route_tokens_<dtype>  one block per token: r = mean_h(residual + partials), xn = RMSNorm(r) * w,
//                             logits = xn @ router^T (warp per expert), fp32 softmax, quota top-(k/H)
//                             per expert block (warp per group, ties to the lower id), renormalise
//   foe_count_tiles           picks per (tile of FOE_TILE pairs, expert)
//   foe_scan_tiles            one block: expert_offsets and each (tile, expert)'s first output slot
//   foe_place_tiles           each pair's rank among earlier same-expert pairs of its tile -> its slot
// Count, scan, place is deterministic and stable: pairs of one expert come out in ascending order,
// exactly as the reference's stable sort. No atomics on global memory, no host synchronisation.
#pragma once

#include "common.cuh"

#define FOE_ROUTE_THREADS 256
#define FOE_TILE 256

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
    const scalar_t ri = foe_from_float<scalar_t>(foe_round<scalar_t>(acc) / (float)H);  // ATen mean: sum, then divide
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
      float best = -1.f;
      int best_id = E;
      for (int e = g * block + lane; e < (g + 1) * block; e += 32) {
        if (probs[e] > best) best = probs[e], best_id = e;  // ascending e: keeps the lower id on ties
      }
      for (int offset = 16; offset > 0; offset >>= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, best, offset);
        const int other_id = __shfl_xor_sync(0xffffffffu, best_id, offset);
        if (other > best || (other == best && other_id < best_id)) best = other, best_id = other_id;
      }
      if (lane == 0) {
        ids[t * k + g * per_group + j] = best_id;
        picked[g * per_group + j] = best;
        probs[best_id] = -1.f;  // probabilities are >= 0: marks the expert as taken
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

// grid = tiles, block = FOE_TILE, shared = E ints.
extern "C" __global__ void __launch_bounds__(FOE_TILE) foe_count_tiles(const long long* ids /*[n]*/, int n, int E,
                                                                        int* tile_counts /*[tiles,E]*/) {
  extern __shared__ int histogram[];  // [E]
  for (int e = threadIdx.x; e < E; e += blockDim.x) histogram[e] = 0;
  __syncthreads();
  const int p = blockIdx.x * FOE_TILE + threadIdx.x;
  if (p < n) atomicAdd(&histogram[ids[p]], 1);  // shared-memory counts: order does not matter
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) tile_counts[(long long)blockIdx.x * E + e] = histogram[e];
}

// grid = 1, block = any multiple of 32, shared = E ints. tile_counts becomes each (tile, expert)'s first slot.
extern "C" __global__ void foe_scan_tiles(int* tile_counts /*[tiles,E]*/, int tiles, int E,
                                          long long* offsets /*[E+1]*/) {
  extern __shared__ int totals[];  // [E] picks per expert
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int running = 0;
    for (int tile = 0; tile < tiles; ++tile) {
      const int count = tile_counts[(long long)tile * E + e];
      tile_counts[(long long)tile * E + e] = running;  // exclusive, within expert e
      running += count;
    }
    totals[e] = running;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int position = 0;
    for (int e = 0; e < E; ++e) {
      const int count = totals[e];
      totals[e] = position;
      offsets[e] = position;
      position += count;
    }
    offsets[E] = position;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    for (int tile = 0; tile < tiles; ++tile) tile_counts[(long long)tile * E + e] += totals[e];
  }
}

// grid = tiles, block = FOE_TILE.
extern "C" __global__ void __launch_bounds__(FOE_TILE) foe_place_tiles(const long long* ids /*[n]*/, int n, int E,
                                                                        const int* tile_starts /*[tiles,E]*/,
                                                                        long long* pairs /*[n]*/) {
  __shared__ int tile_ids[FOE_TILE];
  const int p = blockIdx.x * FOE_TILE + threadIdx.x;
  tile_ids[threadIdx.x] = p < n ? (int)ids[p] : -1;
  __syncthreads();
  if (p >= n) return;
  const int e = tile_ids[threadIdx.x];
  int rank = 0;
  for (int q = 0; q < (int)threadIdx.x; ++q) rank += tile_ids[q] == e;
  pairs[tile_starts[(long long)blockIdx.x * E + e] + rank] = p;
}
