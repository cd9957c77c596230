// foe::sum_route_dispatch on CPU: two token-parallel passes around the router GEMM.
//   pass 1 (per token): r = mean_h(residual + partials), xn = RMSNorm(r) * norm_weight
//   router: logits = xn @ router_weight^T through ATen's BLAS GEMM
//   pass 2 (per chunk of tokens): fp32 softmax, quota top-(k/H) in torch.topk's CPU order (NaN first, ties
//          as torch.topk leaves them; see topk_like_torch), renormalise, scale, count picks per expert
//   router variants (sigmoid / sqrtsoftplus scores, correction_bias, group limit, topk_first): the fp32 scores
//          and the selection (scores + bias, group-limited; the logits for topk_first) come from the reference's
//          own ATen calls on the whole [T, E] logits, bit for bit; pass 2 then picks on the selection and weighs
//          with the scores. router_bias goes into the router GEMM (at::linear's bias, the reference's F.linear
//          call). The weight variants (renorm_eps / renorm_min, expert_scale, topk_first's softmax over the
//          picks) are applied per token in pass 2 (WeightRule).
//   placement (per chunk): stable counting sort of the (token, slot) pairs by expert
// Rounding mirrors reference.py step by step (each op rounds to the input dtype where the reference
// does), so bf16/fp16 results match the reference up to summation order.
// The router product is a GEMM rather than a fused per-token GEMV: the portable build has no -march
// flags, so BLAS is the fast path for [T,d] x [d,E], and the same call on the same xn reproduces the
// reference's logits bit for bit (routing decisions then agree even on near-ties).
// NOTE: measured on the shared 2-core AVX-512 Xeon, fp32, 1 thread, Qwen3 shape (d=2048, E=128, H=4),
// T=512: pass 1 ~1.9 ms (28 MB compulsory traffic, ~15 GB/s; torch.sum over the 16 MB of partials
// alone takes 0.93 ms), router GEMM 1.6 ms, routing + placement ~0.4 ms: 3.9 ms vs the reference's
// 7.1 ms. The GEMM plus the compulsory bytes bound any fp32 implementation near 2.9 ms here.
#include "foe_ops.h"
#include "dispatch_types.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace foe {

namespace {

// Chunks of tokens handled by one task in pass 2 and the placement pass.
constexpr int64_t kTokensPerChunk = 64;

template <typename scalar_t>
void sum_and_norm(const scalar_t* residual /*[Hr,T,d]*/, int64_t residual_group_stride /*0 or T*d*/,
                  const scalar_t* partials /*[H,T,d]*/, const scalar_t* norm_weight /*[d]*/, float eps, int64_t H,
                  int64_t T, int64_t d, scalar_t* r /*[T,d]*/, scalar_t* xn /*[T,d]*/) {
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(d);  // [d] fp32 row
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* res = residual + h * residual_group_stride + t * d;
        const scalar_t* par = partials + (h * T + t) * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) acc[i] += static_cast<float>(static_cast<scalar_t>(float(res[i]) + float(par[i])));
      }
      // mean as ATen's CPU mean computes it for every float dtype: fp32 sum, divided by H, then rounded once
      // (not the sum rounded to the dtype first: that overflows fp16 where the mean does not, and rounds twice).
      scalar_t* r_row = r + t * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        r_row[i] = static_cast<scalar_t>(acc[i] / float(H));
        acc[i] = float(r_row[i]);
      }
      float sumsq = 0.f;  // separate loop: a lone reduction vectorises
#pragma omp simd reduction(+ : sumsq)
      for (int64_t i = 0; i < d; ++i) sumsq += acc[i] * acc[i];
      const float rstd = 1.f / std::sqrt(sumsq / float(d) + eps);
      scalar_t* xn_row = xn + t * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        xn_row[i] = static_cast<scalar_t>(float(norm_weight[i]) * float(static_cast<scalar_t>(acc[i] * rstd)));
      }
    }
  });
}

// One (probability, index in the block) entry of the top-k queue, as ATen's topk_impl_loop holds it.
using Candidate = std::pair<float, int64_t>;

// torch.topk's CPU order (largest=True): a before b iff (isnan(a) && !isnan(b)) || a > b. NaN ranks
// above every number; equal values (and NaNs among themselves) are not ordered by this comparator.
inline bool ranks_before(const Candidate& a, const Candidate& b) {
  return (std::isnan(a.first) && !std::isnan(b.first)) || a.first > b.first;
}

// The top `picks` of queue [n] (filled with (value, j) in index order) moved to its front, sorted:
// torch.topk's CPU algorithm step for step (ATen/native/TopKImpl.h, topk_impl_loop, largest and sorted,
// torch 2.13): std::partial_sort when picks * 64 <= n, else std::nth_element at picks - 1 followed by
// std::sort of the first picks - 1. The same libstdc++ algorithms, comparator and starting order leave
// tied values (and NaNs) in the same order as the reference's torch.topk, so ids agree exactly on ties:
// e.g. topk([.5, .5, .2, .5], 2) gives ids [1, 0], not the lower id first.
void topk_like_torch(Candidate* queue, int64_t n, int64_t picks) {
  if (picks * 64 <= n) {
    std::partial_sort(queue, queue + picks, queue + n, ranks_before);
  } else {
    std::nth_element(queue, queue + picks - 1, queue + n, ranks_before);
    std::sort(queue, queue + picks - 1, ranks_before);
  }
}

// Fast path of the same selection: repeated arg-max over block [n], taken entries marked -inf. Exact only while the result is unique, i.e. no value at or above the last pick is tied: then
// every correct top-k, torch.topk's included, returns it. Returns false on a tie (restoring block), and the
// caller takes topk_like_torch. NaN-free input only (the caller checks).
// NOTE (shared 2-core AVX-512 Xeon, 1 thread, fp32, E=128, H=4, k=8, d=16 so that routing dominates, medians
// of 300 calls): the previous kernel (branchy arg-max, no tie check) took 0.057 ms at T=64 and 0.54 ms at
// T=512; topk_like_torch for every block 0.100 ms at T=64; a branchy arg-max with a tie flag 0.065 ms; these
// branch-free passes 0.058-0.060 ms and 0.43 ms (random probabilities mispredict every arg-max branch).
bool topk_distinct(float* block /*[n]*/, int64_t n, int64_t picks, int64_t* local /*[picks]*/,
                   float* values /*[picks]*/) {
  for (int64_t j = 0; j < picks; ++j) {
    // Branch-free passes (arg-max branches mispredict on random data): the maximum (four chains: max is
    // exact in any order without NaN), how often it occurs, and where it first occurs.
    constexpr float lowest = -std::numeric_limits<float>::infinity();
    float m[4] = {lowest, lowest, lowest, lowest};
    int64_t e = 0;
    for (; e + 4 <= n; e += 4) {
      for (int i = 0; i < 4; ++i) m[i] = block[e + i] > m[i] ? block[e + i] : m[i];
    }
    for (; e < n; ++e) m[0] = block[e] > m[0] ? block[e] : m[0];
    const float best = std::max(std::max(m[0], m[1]), std::max(m[2], m[3]));
    int64_t count = 0;
    for (e = 0; e < n; ++e) count += block[e] == best;
    if (count != 1) {  // tied at the top of what is left (or -inf, like the taken entries): not unique
      for (int64_t i = 0; i < j; ++i) block[local[i]] = values[i];
      return false;
    }
    int64_t best_e = 0;
    while (block[best_e] != best) ++best_e;
    local[j] = best_e, values[j] = best;
    block[best_e] = lowest;  // taken
  }
  return true;
}

// The weight variants of reference.picked_weights, applied to a token's k picked scores: the renormalisation
// divides by clamp(sum + renorm_eps, min=renorm_min); expert_scale [E] (fp32) multiplies after the scaling;
// softmax_picks (topk_first with softmax scores): the picks hold logits, and their softmax over the k picks
// replaces them. The default rule changes nothing.
struct WeightRule {
  float renorm_eps = 0.f, renorm_min = 0.f;
  const float* expert_scale = nullptr;  // [E] fp32, or null
  bool softmax_picks = false;
};

// Softmax over E logits, top-(k/H) per block of E/H experts (torch.topk's order, above), weights
// renormalised over the k picks, then scaled. Counts picks per expert into chunk_counts [E].
// Variants: with `scores` [E] (fp32, precomputed) the picks are made on `selection` [E] (scores + correction
// bias; `scores` itself when null) and weighed with `scores`; a block holding a NaN takes torch.topk's order.
// NaN: a NaN or +Inf logit (or all -Inf) makes the whole row of probabilities NaN, as ATen's softmax does
// (then `total` is NaN, and only then); the picks are torch.topk's picks among NaNs (valid ids in [0, E)),
// the row's weights are NaN, so its expert outputs are NaN while other tokens are unaffected, as in the
// reference.
template <typename scalar_t>
void route_token(const scalar_t* logits /*[E]*/, const float* scores /*[E] or null*/,
                 const float* selection /*[E] or null*/, int64_t E, int64_t H, int64_t k, bool renormalize,
                 float scaling, const WeightRule& rule, float* probs /*[E] scratch*/, Candidate* queue /*[E/H] scratch*/, int64_t* local /*[k/H] scratch*/,
                 float* picked /*[k] scratch*/, int64_t* ids /*[k]*/, scalar_t* weights /*[k]*/,
                 int64_t* chunk_counts /*[E]*/) {
  bool nan_row = false;  // softmax: every probability NaN, or none
  if (scores == nullptr) {
    float max_logit = -std::numeric_limits<float>::infinity();
    for (int64_t e = 0; e < E; ++e) max_logit = std::max(max_logit, float(logits[e]));
    float total = 0.f;
    for (int64_t e = 0; e < E; ++e) {
      probs[e] = std::exp(float(logits[e]) - max_logit);
      total += probs[e];
    }
    const float inv_total = 1.f / total;
    for (int64_t e = 0; e < E; ++e) probs[e] *= inv_total;
    nan_row = std::isnan(total);
  } else {
    std::copy(selection ? selection : scores, (selection ? selection : scores) + E, probs);
  }

  const int64_t block = E / H, per_group = k / H;
  for (int64_t g = 0; g < H; ++g) {
    float* block_probs = probs + g * block;
    float* values = picked + g * per_group;
    const bool nan_block = nan_row || (scores != nullptr && std::any_of(block_probs, block_probs + block,
                                                                        [](float v) { return std::isnan(v); }));
    if (nan_block || !topk_distinct(block_probs, block, per_group, local, values)) {
      for (int64_t j = 0; j < block; ++j) queue[j] = {block_probs[j], j};
      topk_like_torch(queue, block, per_group);
      for (int64_t j = 0; j < per_group; ++j) local[j] = queue[j].second, values[j] = queue[j].first;
    }
    for (int64_t j = 0; j < per_group; ++j) {
      const int64_t id = g * block + local[j];  // in [g * block, (g + 1) * block) by construction
      ids[g * per_group + j] = id;
      ++chunk_counts[id];
      if (scores != nullptr) values[j] = scores[id];  // weighed by the scores, not the selection
    }
  }
  if (rule.softmax_picks) {  // as the in-row softmax above, over the k picked logits
    float max_logit = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < k; ++j) max_logit = std::max(max_logit, picked[j]);
    float total = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      picked[j] = std::exp(picked[j] - max_logit);
      total += picked[j];
    }
    const float inv_total = 1.f / total;
    for (int64_t j = 0; j < k; ++j) picked[j] *= inv_total;
  }
  float sum = 0.f;
  for (int64_t j = 0; j < k; ++j) sum += picked[j];
  if (rule.renorm_eps != 0.f) sum += rule.renorm_eps;
  if (rule.renorm_min != 0.f && sum < rule.renorm_min) sum = rule.renorm_min;  // a NaN sum stays NaN, as clamp
  // x * 1.f is x exactly: the default call's weights are unchanged by the scaling.
  for (int64_t j = 0; j < k; ++j) {
    float w = (renormalize ? picked[j] / sum : picked[j]) * scaling;
    if (rule.expert_scale != nullptr) w *= rule.expert_scale[ids[j]];
    weights[j] = static_cast<scalar_t>(w);
  }
}

template <typename scalar_t>
void route_tokens(const scalar_t* logits /*[T,E]*/, const float* scores /*[T,E] or null*/,
                  const float* selection /*[T,E] or null*/, int64_t T, int64_t E, int64_t H, int64_t k,
                  bool renormalize, float scaling, const WeightRule& rule, int64_t* ids /*[T,k]*/, scalar_t* weights /*[T,k]*/, int64_t* pairs /*[T*k]*/,
                  int64_t* offsets /*[E+1]*/) {
  const int64_t chunks = (T + kTokensPerChunk - 1) / kTokensPerChunk;
  std::vector<int64_t> slots(chunks * E, 0);  // [chunks, E]: picks per (chunk, expert), then write cursors
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> probs(E), picked(k);  // per-task scratch: no allocation per token
    std::vector<Candidate> queue(E / H);
    std::vector<int64_t> local(k / H);
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t t = c * kTokensPerChunk; t < std::min(T, (c + 1) * kTokensPerChunk); ++t) {
        route_token(logits + t * E, scores ? scores + t * E : nullptr, selection ? selection + t * E : nullptr, E,
                    H, k, renormalize, scaling, rule, probs.data(), queue.data(), local.data(), picked.data(),
                    ids + t * k, weights + t * k, slots.data() + c * E);
      }
    }
  });
  // Exclusive scan in (expert, chunk) order: chunk c's picks of expert e start after earlier chunks'.
  int64_t position = 0;
  for (int64_t e = 0; e < E; ++e) {
    offsets[e] = position;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t count = slots[c * E + e];
      slots[c * E + e] = position;  // now the write cursor of (chunk c, expert e)
      position += count;
    }
  }
  offsets[E] = position;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* cursor = slots.data() + c * E;
      const int64_t first = c * kTokensPerChunk * k, last = std::min(T, (c + 1) * kTokensPerChunk) * k;
      for (int64_t p = first; p < last; ++p) pairs[cursor[ids[p]]++] = p;
    }
  });
}

// reference.limit_groups in the same ATen calls: `select` [T, E] fp32 with the experts outside the topk_group
// best of n_group groups (a group scores the sum of its top-2) set to -inf, or 0 with fill_zero.
at::Tensor limit_groups(const at::Tensor& select, int64_t n_group, int64_t topk_group, bool fill_zero) {
  const int64_t T = select.size(0), E = select.size(1);
  const auto group_scores = std::get<0>(select.view({T, n_group, E / n_group}).topk(2, -1)).sum(-1);  // [T, n_group]
  const auto best = std::get<1>(group_scores.topk(topk_group, -1, /*largest=*/true, /*sorted=*/false));
  const auto kept = at::zeros_like(group_scores).scatter_(1, best, 1.0).to(at::kBool);
  const auto masked = kept.logical_not().unsqueeze(-1).expand({T, n_group, E / n_group}).reshape({T, E});
  return select.masked_fill(masked, fill_zero ? 0.0 : -std::numeric_limits<double>::infinity()).contiguous();
}

}  // namespace

void group_by_expert_host(const int64_t* ids, int64_t n, int64_t num_experts, int64_t* pairs, int64_t* offsets) {
  std::vector<int64_t> cursor(num_experts + 1, 0);  // [E+1]
  for (int64_t p = 0; p < n; ++p) {
    TORCH_CHECK(ids[p] >= 0 && ids[p] < num_experts, "expert id ", ids[p], " out of range [0, ", num_experts, ")");
    ++cursor[ids[p] + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) cursor[e + 1] += cursor[e];
  std::copy(cursor.begin(), cursor.end(), offsets);
  for (int64_t p = 0; p < n; ++p) pairs[cursor[ids[p]]++] = p;
}

RouteOutputs sum_route_dispatch_cpu(const at::Tensor& residual, const at::Tensor& partials,
                                    const at::Tensor& norm_weight, double eps, const at::Tensor& router_weight,
                                    int64_t num_groups, int64_t top_k, bool renormalize, c10::string_view scoring,
                                    const std::optional<at::Tensor>& router_bias,
                                    const std::optional<at::Tensor>& correction_bias, double routed_scaling,
                                    int64_t n_group, int64_t topk_group, bool group_fill_zero,
                                    const std::optional<at::Tensor>& expert_scale, double renorm_eps, double renorm_min,
                                    bool topk_first) {
  check_route_args(residual, partials, norm_weight, router_weight, num_groups, top_k);
  const Scoring score = check_route_variant(router_weight, scoring, router_bias, correction_bias, routed_scaling);
  check_route_limits(router_weight, num_groups, correction_bias, n_group, topk_group, expert_scale, renorm_eps,
                     renorm_min, topk_first);
  TORCH_CHECK(partials.device().is_cpu(), "sum_route_dispatch_cpu got a ", partials.device(), " tensor");
  const auto res = residual.contiguous(), par = partials.contiguous(), nw = norm_weight.contiguous();
  const int64_t H = par.size(0), T = par.size(1), d = par.size(2), E = router_weight.size(0);
  at::Tensor r, xn, ids, weights, pairs, offsets;
  std::tie(r, xn, ids, weights, pairs, offsets) = empty_route_outputs(par, E, top_k);
  FOE_DISPATCH_FLOAT_TYPES(par.scalar_type(), "sum_route_dispatch_cpu", [&] {
    sum_and_norm<scalar_t>(res.const_data_ptr<scalar_t>(), res.size(0) == 1 ? 0 : T * d,
                           par.const_data_ptr<scalar_t>(), nw.const_data_ptr<scalar_t>(), float(eps), H, T, d,
                           r.mutable_data_ptr<scalar_t>(), xn.mutable_data_ptr<scalar_t>());
    const auto logits = at::linear(xn, router_weight, router_bias).contiguous();  // [T,E], rounded like F.linear
    // Variants: the reference's fp32 scores and selection (reference.router_scores / selection_scores /
    // limit_groups; topk_first: the selection is the logits, and with softmax the picked logits are weighed by
    // their softmax over the picks, WeightRule::softmax_picks).
    at::Tensor scores, selection;
    if (score != Scoring::kSoftmax || correction_bias || n_group > 1 || topk_first) {
      const auto logits32 = logits.to(at::kFloat).contiguous();
      scores = topk_first && score == Scoring::kSoftmax ? logits32
               : (score == Scoring::kSoftmax   ? at::softmax(logits32, -1)
                  : score == Scoring::kSigmoid ? at::sigmoid(logits32)
                                               : at::sqrt(at::softplus(logits32)))
                     .contiguous();
      if (topk_first) selection = logits32;
      if (correction_bias) selection = (scores + correction_bias->to(at::kFloat)).contiguous();
      if (n_group > 1) selection = limit_groups(selection.defined() ? selection : scores, n_group, topk_group, group_fill_zero);
    }
    const auto scale = expert_scale ? expert_scale->to(at::kFloat).contiguous() : at::Tensor();
    const WeightRule rule{static_cast<float>(renorm_eps), static_cast<float>(renorm_min),
                          scale.defined() ? scale.const_data_ptr<float>() : nullptr,
                          topk_first && score == Scoring::kSoftmax};
    route_tokens<scalar_t>(logits.const_data_ptr<scalar_t>(), scores.defined() ? scores.const_data_ptr<float>() : nullptr,
                           selection.defined() ? selection.const_data_ptr<float>() : nullptr, T, E, num_groups, top_k,
                           renormalize, static_cast<float>(routed_scaling), rule,
                           ids.mutable_data_ptr<int64_t>(), weights.mutable_data_ptr<scalar_t>(),
                           pairs.mutable_data_ptr<int64_t>(), offsets.mutable_data_ptr<int64_t>());
  });
  return {r, xn, ids, weights, pairs, offsets};
}

}  // namespace foe
