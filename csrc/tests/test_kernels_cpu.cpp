// CTest: the C++ CPU kernels against a scalar C++ reference written here (formulas of reference.py).
// Float outputs within 1e-5 (fp32), ids / sorted_pairs / expert_offsets exactly equal, including the
// stable order of pairs within an expert. Exits non-zero with a message on the first mismatch.
#include "foe_ops.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <vector>

namespace {

void expect(bool ok, const char* what, int64_t T, int64_t E, int64_t k, int64_t H) {
  if (ok) return;
  std::fprintf(stderr, "FAIL %s (T=%lld E=%lld k=%lld H=%lld)\n", what, (long long)T, (long long)E, (long long)k,
               (long long)H);
  std::exit(1);
}

bool close(const at::Tensor& a, const std::vector<float>& b, float tol) {
  const auto a32 = a.contiguous().to(at::kFloat);
  const float* p = a32.const_data_ptr<float>();
  for (size_t i = 0; i < b.size(); ++i) {
    if (std::fabs(p[i] - b[i]) > tol * (1.f + std::fabs(b[i]))) return false;
  }
  return static_cast<size_t>(a32.numel()) == b.size();
}

bool equal(const at::Tensor& a, const std::vector<int64_t>& b) {
  const auto c = a.contiguous();
  return static_cast<size_t>(c.numel()) == b.size() && std::equal(b.begin(), b.end(), c.const_data_ptr<int64_t>());
}

// Scalar reference of sum_route_dispatch in fp32 (renormalised weights), stable sort of pairs by expert.
void check_route(int64_t T, int64_t E, int64_t k, int64_t H, int64_t residual_groups, int64_t d = 40) {
  const auto residual = at::randn({residual_groups, T, d}), partials = at::randn({H, T, d});
  const auto norm_weight = 1 + 0.1 * at::randn({d}), router = at::randn({E, d});
  const float eps = 1e-6f;
  const auto [r, xn, ids, weights, pairs, offsets] =
      foe::sum_route_dispatch_cpu(residual, partials, norm_weight, eps, router, H, k, true);

  const float *res = residual.const_data_ptr<float>(), *par = partials.const_data_ptr<float>();
  const float *nw = norm_weight.const_data_ptr<float>(), *rw = router.const_data_ptr<float>();
  std::vector<float> want_r(T * d), want_xn(T * d), want_w(T * k);
  std::vector<int64_t> want_ids(T * k);
  for (int64_t t = 0; t < T; ++t) {
    float sumsq = 0.f;
    for (int64_t i = 0; i < d; ++i) {
      float s = 0.f;
      for (int64_t h = 0; h < H; ++h) s += res[((residual_groups == 1 ? 0 : h) * T + t) * d + i] + par[(h * T + t) * d + i];
      want_r[t * d + i] = s / H;
      sumsq += want_r[t * d + i] * want_r[t * d + i];
    }
    const float rstd = 1.f / std::sqrt(sumsq / d + eps);
    for (int64_t i = 0; i < d; ++i) want_xn[t * d + i] = nw[i] * want_r[t * d + i] * rstd;
    std::vector<float> probs(E);
    for (int64_t e = 0; e < E; ++e) {
      probs[e] = 0.f;
      for (int64_t i = 0; i < d; ++i) probs[e] += want_xn[t * d + i] * rw[e * d + i];
    }
    const float top = *std::max_element(probs.begin(), probs.end());
    float total = 0.f;
    for (float& p : probs) total += (p = std::exp(p - top));
    for (float& p : probs) p /= total;
    const int64_t block = E / H, per_group = k / H;
    float picked = 0.f;
    for (int64_t g = 0; g < H; ++g) {
      std::vector<int64_t> order(block);
      std::iota(order.begin(), order.end(), g * block);
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return probs[a] > probs[b]; });
      for (int64_t j = 0; j < per_group; ++j) {
        want_ids[t * k + g * per_group + j] = order[j];
        picked += probs[order[j]];
      }
    }
    for (int64_t j = 0; j < k; ++j) want_w[t * k + j] = probs[want_ids[t * k + j]] / picked;
  }
  std::vector<int64_t> want_pairs(T * k), want_offsets(E + 1, 0);
  std::iota(want_pairs.begin(), want_pairs.end(), 0);
  std::stable_sort(want_pairs.begin(), want_pairs.end(),
                   [&](int64_t a, int64_t b) { return want_ids[a] < want_ids[b]; });
  for (int64_t id : want_ids) ++want_offsets[id + 1];
  std::partial_sum(want_offsets.begin(), want_offsets.end(), want_offsets.begin());

  expect(close(r, want_r, 1e-5f), "r", T, E, k, H);
  expect(close(xn, want_xn, 1e-5f), "xn", T, E, k, H);
  expect(equal(ids, want_ids), "topk_ids", T, E, k, H);
  expect(close(weights, want_w, 1e-5f), "topk_weights", T, E, k, H);
  expect(equal(pairs, want_pairs), "sorted_pairs (stable grouping)", T, E, k, H);
  expect(equal(offsets, want_offsets), "expert_offsets", T, E, k, H);
}

// Experts: out[g(e), t] += w * down_e(silu(gate_e x) * up_e x), gate rows first.
void check_experts(int64_t T, int64_t E, int64_t k, int64_t H, int64_t d = 24, int64_t inter = 20) {
  const auto routed = foe::sum_route_dispatch_cpu(at::zeros({1, T, d}), at::randn({H, T, d}), at::ones({d}), 1e-6,
                                                  at::randn({E, d}), H, k, true);
  const auto& [r, x, ids, weights, pairs, offsets] = routed;
  const auto gate_up = at::randn({E, 2 * inter, d}), down = at::randn({E, d, inter});
  gate_up.slice(1, inter).mul_(0.25);  // asymmetric gate/up
  const auto out = foe::experts_swiglu_cpu(x, gate_up, down, ids, weights, pairs, offsets, H);
  std::vector<float> want(H * T * d, 0.f);
  const float *xs = x.const_data_ptr<float>(), *gu = gate_up.const_data_ptr<float>(), *dn = down.const_data_ptr<float>();
  const float* w = weights.const_data_ptr<float>();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = id[t * k + j];
      std::vector<float> h(inter);
      for (int64_t i = 0; i < inter; ++i) {
        float gate = 0.f, up = 0.f;
        for (int64_t c = 0; c < d; ++c) {
          gate += gu[(e * 2 * inter + i) * d + c] * xs[t * d + c];
          up += gu[(e * 2 * inter + inter + i) * d + c] * xs[t * d + c];
        }
        h[i] = gate / (1.f + std::exp(-gate)) * up;
      }
      for (int64_t c = 0; c < d; ++c) {
        float y = 0.f;
        for (int64_t i = 0; i < inter; ++i) y += dn[(e * d + c) * inter + i] * h[i];
        want[((e / (E / H)) * T + t) * d + c] += w[t * k + j] * y;
      }
    }
  }
  expect(close(out, want, 1e-4f), "experts_swiglu out", T, E, k, H);
}

void check_grouping_adversarial() {
  const int64_t n = 1000, E = 7;
  std::vector<int64_t> ids(n), pairs(n), offsets(E + 1);
  for (int64_t p = 0; p < n; ++p) ids[p] = (p * 5 + 3) % E == 0 ? 6 : (n - p) % 3;  // skewed, experts 3-5 empty
  foe::group_by_expert_host(ids.data(), n, E, pairs.data(), offsets.data());
  for (int64_t p = 1; p < n; ++p) {
    const bool ordered = ids[pairs[p - 1]] < ids[pairs[p]] || (ids[pairs[p - 1]] == ids[pairs[p]] && pairs[p - 1] < pairs[p]);
    expect(ordered, "group_by_expert_host stable order", n, E, 1, 1);
  }
  expect(offsets[3] == offsets[6] && offsets[E] == n, "group_by_expert_host offsets", n, E, 1, 1);
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (int64_t T : {0, 1, 7, 111, 300}) {
    check_route(T, 12, 2, 1, 1);
    check_route(T, 12, 2, 2, 2);
    check_route(T, 12, 4, 2, 1);
    check_route(T, 60, 4, 4, 4);
    check_route(T, 60, 8, 4, 1);
    check_experts(T, 12, 4, 2);
  }
  check_grouping_adversarial();
  for (const char* op : {"foe::sum_route_dispatch_native", "foe::experts_swiglu_native"}) {
    const auto handle = c10::Dispatcher::singleton().findSchema({op, ""});
    expect(handle.has_value() && handle->hasKernelForDispatchKey(c10::DispatchKey::CPU), op, 0, 0, 0, 0);
  }
  std::puts("foe C++ CPU kernels: all checks passed");
  return 0;
}
