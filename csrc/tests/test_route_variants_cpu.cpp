// CTest: the router variants of the C++ CPU route/dispatch kernel (scoring softmax | sigmoid | sqrtsoftplus,
// router bias, selection-only correction bias, renormalisation, routed scaling; H = 1, 2; T = 0, 37) against a
// scalar reference written here, a NaN router-bias entry, and the errors for bad variant arguments. Exits
// non-zero on the first mismatch.
#include "foe_ops.h"
#include "test_support.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

namespace {

using namespace foe_test;  // expect, close, equal, expect_error, quota_pick, check_route_invariants

// Router variants: the kernel's xn routed by a scalar reference written here: logits = xn . router_e (+ bias_e),
// scores = softmax | sigmoid | sqrt(softplus), picks by scores (+ correction), weights = picked scores,
// renormalised when asked, times the scaling.
void check_route_variant(int64_t T, int64_t E, int64_t k, int64_t H, const char* scoring, bool router_bias,
                         bool correction_bias, bool renormalize, double scaling, int64_t d = 24) {
  const auto router = at::randn({E, d}) / std::sqrt(double(d));
  const auto rb = 0.5 * at::randn({E}), cb = 0.2 * at::randn({E});
  const std::optional<at::Tensor> rb_opt = router_bias ? std::optional<at::Tensor>(rb) : std::nullopt;
  const std::optional<at::Tensor> cb_opt = correction_bias ? std::optional<at::Tensor>(cb) : std::nullopt;
  const auto [r, xn, ids, weights, pairs, offsets] = foe::sum_route_dispatch_cpu(
      at::randn({1, T, d}), at::randn({H, T, d}), 1 + 0.1 * at::randn({d}), 1e-6, router, H, k, renormalize, scoring,
      rb_opt, cb_opt, scaling);
  const std::string score(scoring);
  const float *x = xn.const_data_ptr<float>(), *rw = router.const_data_ptr<float>();
  const float *b = rb.const_data_ptr<float>(), *c = cb.const_data_ptr<float>();
  std::vector<float> want_w(T * k);
  std::vector<int64_t> want_ids(T * k);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> scores(E), select(E);
    for (int64_t e = 0; e < E; ++e) {
      float logit = router_bias ? b[e] : 0.f;
      for (int64_t i = 0; i < d; ++i) logit += x[t * d + i] * rw[e * d + i];
      scores[e] = logit;
    }
    if (score == "softmax") {
      const float top = *std::max_element(scores.begin(), scores.end());
      float total = 0.f;
      for (float& p : scores) total += (p = std::exp(p - top));
      for (float& p : scores) p /= total;
    } else {
      for (float& p : scores) p = score == "sigmoid" ? 1.f / (1.f + std::exp(-p)) : std::sqrt(std::log1p(std::exp(p)));
    }
    for (int64_t e = 0; e < E; ++e) select[e] = scores[e] + (correction_bias ? c[e] : 0.f);
    const float picked = quota_pick(select, scores, H, k, &want_ids[t * k]);
    for (int64_t j = 0; j < k; ++j) {
      const float w = scores[want_ids[t * k + j]];
      want_w[t * k + j] = (renormalize ? w / picked : w) * static_cast<float>(scaling);
    }
  }
  std::vector<int64_t> want_pairs(T * k), want_offsets(E + 1, 0);
  std::iota(want_pairs.begin(), want_pairs.end(), 0);
  std::stable_sort(want_pairs.begin(), want_pairs.end(),
                   [&](int64_t a, int64_t b) { return want_ids[a] < want_ids[b]; });
  for (int64_t id : want_ids) ++want_offsets[id + 1];
  std::partial_sum(want_offsets.begin(), want_offsets.end(), want_offsets.begin());
  const std::string what = std::string("variant ") + scoring + (router_bias ? " router_bias" : "") +
                           (correction_bias ? " correction_bias" : "") + (renormalize ? " renormalize" : "") +
                           (scaling != 1.0 ? " scaled" : "");
  expect(equal(ids, want_ids), (what + ": topk_ids").c_str(), T, E, k, H);
  expect(close(weights, want_w, 1e-5f), (what + ": topk_weights").c_str(), T, E, k, H);
  expect(equal(pairs, want_pairs) && equal(offsets, want_offsets), (what + ": grouping").c_str(), T, E, k, H);
}

void check_bad_route_variant_args() {
  const int64_t T = 3, E = 12, d = 8;
  const auto residual = at::zeros({1, T, d}), partials = at::randn({1, T, d}), nw = at::ones({d});
  const auto router = at::randn({E, d});
  auto call = [&](const char* scoring, std::optional<at::Tensor> rb, std::optional<at::Tensor> cb, double scaling) {
    return [=] { foe::sum_route_dispatch_cpu(residual, partials, nw, 1e-6, router, 1, 2, true, scoring, rb, cb, scaling); };
  };
  expect_error(call("tanh", std::nullopt, std::nullopt, 1.0), "unknown router scoring 'tanh'");
  expect_error(call("sigmoid", at::zeros({E + 1}), std::nullopt, 1.0), "router_bias must be [E] = [12]");
  expect_error(call("sigmoid", std::nullopt, at::zeros({1, E}), 1.0), "correction_bias must be [E] = [12]");
  expect_error(call("sigmoid", at::zeros({E}, at::kDouble), std::nullopt, 1.0), "router_bias must have dtype");
  expect_error(call("sigmoid", std::nullopt, std::nullopt, std::numeric_limits<double>::infinity()),
               "routed_scaling must be finite");
}

// A NaN router-bias entry: with sigmoid scores that expert's score is NaN in every row, ranks first in its block
// (torch.topk's order) and only its weight is NaN (no renormalisation).
void check_route_variant_nan_bias() {
  const int64_t T = 9, E = 12, k = 4, H = 2, d = 16;
  auto rb = 0.5 * at::randn({E});
  rb[7] = std::numeric_limits<float>::quiet_NaN();
  const auto cb = 0.2 * at::randn({E});
  const auto out = foe::sum_route_dispatch_cpu(at::randn({1, T, d}), at::randn({H, T, d}), at::ones({d}), 1e-6,
                                               at::randn({E, d}), H, k, false, "sigmoid", rb, cb, 2.5);
  const auto& [r, xn, ids, weights, pairs, offsets] = out;
  check_route_invariants(out, E, k, H, "NaN router bias: ids/pairs/offsets in range");
  const auto ids_c = ids.contiguous();
  const auto w = weights.contiguous();
  for (int64_t t = 0; t < T; ++t) {
    expect(ids_c[t][k / 2].item<int64_t>() == 7, "NaN router bias: the NaN expert ranks first", T, E, k, H);
    for (int64_t j = 0; j < k; ++j) {
      const bool is_nan = std::isnan(w[t][j].item<float>());
      expect(is_nan == (ids_c[t][j].item<int64_t>() == 7), "NaN router bias: only its weight is NaN", T, E, k, H);
    }
  }
}

// Group limit and weight variants (DeepSeek-V3: sigmoid + correction, 4 groups of 4 by their top-2 sums, 2 kept,
// sum + 1e-20; Gemma 4: per-expert scale; Ernie 4.5: clamped sum; topk_first with sigmoid) against a scalar
// reference written here, on the kernel's xn: the picks as a set, the weights by id.
void check_group_and_weight_variants(int64_t T, int64_t n_group, int64_t topk_group, bool scale, double eps,
                                     double minimum, bool topk_first) {
  const int64_t E = 16, k = 4, d = 24;
  const auto router = at::randn({E, d}) / std::sqrt(double(d));
  const auto cb = 0.2 * at::randn({E}), es = at::rand({E}) + 0.5;
  const std::optional<at::Tensor> cb_opt = topk_first ? std::nullopt : std::optional<at::Tensor>(cb);
  const std::optional<at::Tensor> es_opt = scale ? std::optional<at::Tensor>(es) : std::nullopt;
  const auto out = foe::sum_route_dispatch_cpu(at::randn({1, T, d}), at::randn({1, T, d}), at::ones({d}), 1e-6,
                                               router, 1, k, true, "sigmoid", std::nullopt, cb_opt, 1.0, n_group,
                                               topk_group, false, es_opt, eps, minimum, topk_first);
  check_route_invariants(out, E, k, 1, "group/weight variants: ids/pairs/offsets in range");
  const auto& [r, xn, ids, weights, pairs, offsets] = out;
  const auto logits = at::matmul(xn, router.t()).contiguous();
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> logit(E), score(E), select(E);
    for (int64_t e = 0; e < E; ++e) {
      logit[e] = logits[t][e].item<float>();
      score[e] = 1.f / (1.f + std::exp(-logit[e]));
      select[e] = topk_first ? logit[e] : score[e] + cb[e].item<float>();
    }
    if (n_group > 1) {
      const int64_t size = E / n_group;
      std::vector<std::pair<float, int64_t>> groups;
      for (int64_t g = 0; g < n_group; ++g) {
        std::vector<float> v(select.begin() + g * size, select.begin() + (g + 1) * size);
        std::sort(v.rbegin(), v.rend());
        groups.push_back({v[0] + v[1], g});
      }
      std::sort(groups.begin(), groups.end(), [](auto a, auto b) { return a.first > b.first; });
      for (int64_t i = topk_group; i < n_group; ++i) {
        for (int64_t e = groups[i].second * size; e < (groups[i].second + 1) * size; ++e) {
          select[e] = -std::numeric_limits<float>::infinity();
        }
      }
    }
    std::vector<int64_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return select[a] > select[b]; });
    std::vector<int64_t> want(order.begin(), order.begin() + k);
    float total = 0.f;
    for (int64_t id : want) total += score[id];
    const float denominator = std::max(float(total + float(eps)), float(minimum));
    std::sort(want.begin(), want.end());
    auto got = ids[t].clone();
    const auto sorted = got.sort();
    for (int64_t j = 0; j < k; ++j) {
      const int64_t id = std::get<0>(sorted)[j].item<int64_t>();
      expect(id == want[j], "group/weight variants: picks", T, E, k, 1);
      const float w = weights[t][std::get<1>(sorted)[j].item<int64_t>()].item<float>();
      const float want_w = score[id] / denominator * (scale ? es[id].item<float>() : 1.f);
      expect(std::abs(w - want_w) <= 1e-5f * std::abs(want_w) + 1e-7f, "group/weight variants: weights", T, E, k, 1);
    }
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (const char* scoring : {"softmax", "sigmoid", "sqrtsoftplus"}) {
    for (int mask = 0; mask < 16; ++mask) {
      const bool router_bias = mask & 1, correction_bias = mask & 2, renormalize = mask & 4;
      const double scaling = mask & 8 ? 2.5 : 1.0;
      for (int64_t H : {1, 2}) check_route_variant(37, 12, 4, H, scoring, router_bias, correction_bias, renormalize, scaling);
      check_route_variant(0, 12, 4, 2, scoring, router_bias, correction_bias, renormalize, scaling);
    }
  }
  check_route_variant_nan_bias();
  check_bad_route_variant_args();
  for (int64_t T : {0, 1, 37}) {
    check_group_and_weight_variants(T, 4, 2, false, 1e-20, 0.0, false);  // DeepSeek-V3
    check_group_and_weight_variants(T, 4, 4, false, 0.0, 0.0, false);    // every group kept
    check_group_and_weight_variants(T, 1, 1, true, 0.0, 0.0, false);     // per-expert scale
    check_group_and_weight_variants(T, 1, 1, false, 0.0, 1e-3, false);   // clamped sum
    check_group_and_weight_variants(T, 1, 1, true, 1e-6, 0.0, true);     // sigmoid of the top logits
  }
  std::puts("foe C++ CPU router variants: all checks passed");
  return 0;
}
