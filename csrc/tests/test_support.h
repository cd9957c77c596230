// Helpers shared by the C++ kernel tests (test_kernels_cpu.cpp, test_route_variants_cpu.cpp).
#pragma once

#include "foe_ops.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

namespace foe_test {

inline void expect(bool ok, const char* what, int64_t T, int64_t E, int64_t k, int64_t H) {
  if (ok) return;
  std::fprintf(stderr, "FAIL %s (T=%lld E=%lld k=%lld H=%lld)\n", what, (long long)T, (long long)E, (long long)k,
               (long long)H);
  std::exit(1);
}

inline bool close(const at::Tensor& a, const std::vector<float>& b, float tol) {
  const auto a32 = a.contiguous().to(at::kFloat);
  const float* p = a32.const_data_ptr<float>();
  for (size_t i = 0; i < b.size(); ++i) {
    if (std::fabs(p[i] - b[i]) > tol * (1.f + std::fabs(b[i]))) return false;
  }
  return static_cast<size_t>(a32.numel()) == b.size();
}

inline bool equal(const at::Tensor& a, const std::vector<int64_t>& b) {
  const auto c = a.contiguous();
  return static_cast<size_t>(c.numel()) == b.size() && std::equal(b.begin(), b.end(), c.const_data_ptr<int64_t>());
}

// fn() must raise a c10::Error whose message contains `needle`.
template <typename Fn>
void expect_error(Fn fn, const char* needle) {
  bool raised = false;
  try {
    fn();
  } catch (const c10::Error& error) {
    raised = std::string(error.what()).find(needle) != std::string::npos;
    if (!raised) std::fprintf(stderr, "unexpected message: %s\n", error.what());
  }
  expect(raised, needle, 0, 0, 0, 0);
}

// Quota top-(k/H) of `select` in each block of E/H experts, ties to the lower id (torch.topk's order on
// distinct values): writes the k ids to `ids` and returns the sum of `scores` at them.
inline float quota_pick(const std::vector<float>& select, const std::vector<float>& scores, int64_t H, int64_t k,
                        int64_t* ids) {
  const int64_t E = static_cast<int64_t>(select.size()), block = E / H, per_group = k / H;
  float picked = 0.f;
  for (int64_t g = 0; g < H; ++g) {
    std::vector<int64_t> order(block);
    std::iota(order.begin(), order.end(), g * block);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return select[a] > select[b]; });
    for (int64_t j = 0; j < per_group; ++j) {
      ids[g * per_group + j] = order[j];
      picked += scores[order[j]];
    }
  }
  return picked;
}

inline void check_route_invariants(const foe::RouteOutputs& out, int64_t E, int64_t k, int64_t H, const char* what) {
  const auto& [r, xn, ids, weights, pairs, offsets] = out;
  const int64_t T = ids.size(0), block = E / H, per_group = k / H;
  const int64_t* id = ids.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t g = j / per_group;
      expect(id[t * k + j] >= g * block && id[t * k + j] < (g + 1) * block, what, T, E, k, H);
      for (int64_t i = 0; i < j; ++i) expect(id[t * k + i] != id[t * k + j], what, T, E, k, H);
    }
  }
  std::vector<int64_t> want_pairs(T * k), want_offsets(E + 1);
  foe::group_by_expert_host(id, T * k, E, want_pairs.data(), want_offsets.data());
  expect(equal(pairs, want_pairs) && equal(offsets, want_offsets), what, T, E, k, H);
}

// A NaN in one token's partials (or an Inf: RMSNorm then gives NaN) makes that row's r/xn/weights NaN, its ids
// torch.topk's picks among NaNs; every other row is bit-identical to the run without it.

}  // namespace foe_test
