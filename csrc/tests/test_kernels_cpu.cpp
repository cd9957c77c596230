// CTest: the C++ CPU kernels against a scalar C++ reference written here (formulas of reference.py), the
// experts for every expert unit variant (activations, biases, gpt-oss's alpha / limit / up_offset) and with the
// routing weight on the input (weight_input, Llama 4); the
// router variants are in test_route_variants_cpu.cpp.
// Float outputs within 1e-5 (fp32), ids / sorted_pairs / expert_offsets exactly equal, including the
// stable order of pairs within an expert. NaN rows and exact ties: ids equal at::topk's (the reference's
// torch.topk) exactly. Bad routing indices and unit arguments raise c10::Error. Exits non-zero on the first
// mismatch.
#include "foe_ops.h"
#include "test_support.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <array>
#include <limits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

namespace {

using namespace foe_test;  // expect, close, equal, expect_error, quota_pick, check_route_invariants

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
    const float picked = quota_pick(probs, probs, H, k, &want_ids[t * k]);
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

// An expert unit of foe::experts_swiglu (the schema's unit arguments), whether both biases are passed and
// whether the routing weight scales the expert's input (weight_input) rather than its output.
struct Unit {
  const char* activation = "silu";
  double alpha = 1.0;
  std::optional<double> limit;
  double up_offset = 0.0;
  bool biases = false;
  bool weight_input = false;
  bool gated() const { return std::string(activation) != "relu2"; }
};

// reference.expert_unit for one hidden entry from g = gate row . x (+ bias), u = up row . x (+ bias); relu2: g = h.
float unit_value(float g, float u, const Unit& unit) {
  const std::string activation = unit.activation;
  if (activation == "relu2") return g > 0.f ? g * g : 0.f;
  if (unit.limit) {
    const float limit = static_cast<float>(*unit.limit);
    g = std::min(g, limit);
    u = std::clamp(u, -limit, limit);
  }
  float act;
  if (activation == "silu") {
    act = g / (1.f + std::exp(-static_cast<float>(unit.alpha) * g));
  } else if (activation == "gelu") {
    act = 0.5f * g * (1.f + std::erf(g / std::sqrt(2.f)));
  } else {  // gelu_tanh
    act = 0.5f * g * (1.f + std::tanh(std::sqrt(2.f / static_cast<float>(M_PI)) * (g + 0.044715f * g * g * g)));
  }
  return act * (u + static_cast<float>(unit.up_offset));
}

// Experts: out[g(e), t] += w * (down_e unit(gate_up_e x + b_e) + c_e), gate rows first (gated units); with
// weight_input: out[g(e), t] += down_e unit(gate_up_e (w x) + b_e) + c_e.
void check_experts(int64_t T, int64_t E, int64_t k, int64_t H, const Unit& unit = {}, int64_t d = 24,
                   int64_t inter = 20) {
  const auto routed = foe::sum_route_dispatch_cpu(at::zeros({1, T, d}), at::randn({H, T, d}), at::ones({d}), 1e-6,
                                                  at::randn({E, d}), H, k, true);
  const auto& [r, x, ids, weights, pairs, offsets] = routed;
  const int64_t rows = unit.gated() ? 2 * inter : inter;  // gate_up rows per expert
  const auto gate_up = at::randn({E, rows, d}), down = at::randn({E, d, inter});
  if (unit.gated()) gate_up.slice(1, inter).mul_(0.25);  // asymmetric gate/up
  const std::optional<at::Tensor> gate_up_bias = unit.biases ? std::optional(at::randn({E, rows})) : std::nullopt;
  const std::optional<at::Tensor> down_bias = unit.biases ? std::optional(at::randn({E, d})) : std::nullopt;
  const auto out = foe::experts_swiglu_cpu(x, gate_up, down, ids, weights, pairs, offsets, H, unit.activation,
                                           gate_up_bias, down_bias, unit.alpha, unit.limit, unit.up_offset,
                                           unit.weight_input);
  std::vector<float> want(H * T * d, 0.f);
  const float *xs = x.const_data_ptr<float>(), *gu = gate_up.const_data_ptr<float>(), *dn = down.const_data_ptr<float>();
  const float* w = weights.const_data_ptr<float>();
  const float* gub = unit.biases ? gate_up_bias->const_data_ptr<float>() : nullptr;  // [E,rows]
  const float* db = unit.biases ? down_bias->const_data_ptr<float>() : nullptr;       // [E,d]
  const int64_t* id = ids.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = id[t * k + j];
      const float in_w = unit.weight_input ? w[t * k + j] : 1.f, out_w = unit.weight_input ? 1.f : w[t * k + j];
      std::vector<float> h(inter);
      for (int64_t i = 0; i < inter; ++i) {
        float gate = gub ? gub[e * rows + i] : 0.f, up = gub && unit.gated() ? gub[e * rows + inter + i] : 0.f;
        for (int64_t c = 0; c < d; ++c) {
          const float xc = in_w * xs[t * d + c];
          gate += gu[(e * rows + i) * d + c] * xc;
          if (unit.gated()) up += gu[(e * rows + inter + i) * d + c] * xc;
        }
        h[i] = unit_value(gate, up, unit);
      }
      for (int64_t c = 0; c < d; ++c) {
        float y = db ? db[e * d + c] : 0.f;
        for (int64_t i = 0; i < inter; ++i) y += dn[(e * d + c) * inter + i] * h[i];
        want[((e / (E / H)) * T + t) * d + c] += out_w * y;
      }
    }
  }
  const std::string what = std::string("experts_swiglu out, ") + unit.activation + (unit.biases ? " + biases" : "") +
                           (unit.limit ? " + limit" : "") + (unit.alpha != 1.0 ? " + alpha" : "") +
                           (unit.up_offset != 0.0 ? " + up_offset" : "") + (unit.weight_input ? " + weight_input" : "");
  expect(close(out, want, 1e-4f), what.c_str(), T, E, k, H);
}

// The unit variants: every activation with and without biases; gpt-oss's clamped SiLU (alpha 1.702, limit 7,
// up_offset 1; gate/up of std ~5 and ~1 here, so the limit clamps some), a limit that clamps most gates, and
// SiLU and ReLU^2 with the routing weight on the input.
std::vector<Unit> unit_variants() {
  std::vector<Unit> units;
  for (bool biases : {false, true}) {
    for (const char* activation : {"silu", "gelu", "gelu_tanh", "relu2"}) units.push_back({activation, 1.0, {}, 0.0, biases});
    units.push_back({"silu", 1.702, 7.0, 1.0, biases});
    units.push_back({"gelu_tanh", 1.0, 0.5, -0.25, biases});
    units.push_back({"silu", 1.0, {}, 0.0, biases, /*weight_input=*/true});
    units.push_back({"relu2", 1.0, {}, 0.0, biases, /*weight_input=*/true});
  }
  return units;
}

// Bad unit arguments are refused with a message naming the problem.
void check_bad_unit_args() {
  const int64_t T = 4, E = 6, k = 2, H = 2, d = 8, inter = 4;
  const auto routed = foe::sum_route_dispatch_cpu(at::zeros({1, T, d}), at::randn({H, T, d}), at::ones({d}), 1e-6,
                                                  at::randn({E, d}), H, k, true);
  const auto& [r, x, ids, weights, pairs, offsets] = routed;
  const auto gate_up = at::randn({E, 2 * inter, d}), down = at::randn({E, d, inter});
  const auto run = [&](const at::Tensor& gu, c10::string_view activation, const std::optional<at::Tensor>& gate_up_bias,
                       const std::optional<at::Tensor>& down_bias, double alpha, std::optional<double> limit) {
    foe::experts_swiglu_cpu(x, gu, down, ids, weights, pairs, offsets, H, activation, gate_up_bias, down_bias, alpha,
                            limit);
  };
  const auto ungated = gate_up.slice(1, 0, inter);  // relu2's [E, I, d]
  expect_error([&] { run(gate_up, "swish", {}, {}, 1.0, {}); }, "unknown expert activation 'swish'");
  expect_error([&] { run(gate_up, "gelu", {}, {}, 1.702, {}); }, "applies to the silu unit only");
  expect_error([&] { run(ungated, "relu2", {}, {}, 1.0, 7.0); }, "gated units only");
  expect_error([&] { run(gate_up, "silu", {}, {}, 1.0, std::nan("")); }, "limit is NaN");
  expect_error([&] { run(gate_up, "silu", at::zeros({E, inter}), {}, 1.0, {}); }, "gate_up_bias must be [E, 2I]");
  expect_error([&] { run(gate_up, "silu", {}, at::zeros({E, d}, at::kDouble), 1.0, {}); },
               "down_bias must have x's dtype");
  expect_error([&] { run(gate_up, "relu2", {}, {}, 1.0, {}); }, "down must be [E, d, I]");  // [E, 2I, d] for relu2
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


// ids of the reference: quota top-(k/H) of softmax(linear(xn, router)) by at::topk (torch.topk's CPU kernel).
at::Tensor topk_ids_of(const at::Tensor& xn, const at::Tensor& router, int64_t k, int64_t H) {
  const int64_t T = xn.size(0), E = router.size(0), block = E / H;
  const auto probs = at::softmax(at::linear(xn, router).to(at::kFloat), -1).view({T, H, block});
  const auto local = std::get<1>(at::topk(probs, k / H, -1));
  return (local + at::arange(H, local.options()).view({1, H, 1}) * block).reshape({T, k});
}

// Structural invariants that keep every consumer in bounds: ids in their group's block and distinct within a
// row, pairs/offsets the stable grouping of ids.
void check_route_nan(int64_t E, int64_t k, int64_t H, float poison) {
  const int64_t T = 7, d = 24, bad = 3;
  const auto residual = at::randn({1, T, d}), partials = at::randn({H, T, d});
  const auto norm_weight = 1 + 0.1 * at::randn({d}), router = at::randn({E, d});
  const auto clean = foe::sum_route_dispatch_cpu(residual, partials, norm_weight, 1e-6, router, H, k, true);
  auto poisoned_partials = partials.clone();
  poisoned_partials[H - 1][bad][d / 2] = poison;
  const auto out = foe::sum_route_dispatch_cpu(residual, poisoned_partials, norm_weight, 1e-6, router, H, k, true);
  check_route_invariants(out, E, k, H, "NaN row: ids/pairs/offsets in range");
  const auto& [r, xn, ids, weights, pairs, offsets] = out;
  expect(weights[bad].isnan().all().item<bool>() && xn[bad].isnan().any().item<bool>(), "NaN row: NaN weights", T,
         E, k, H);
  expect(at::equal(ids, topk_ids_of(xn, router, k, H)), "NaN row: ids equal torch.topk's", T, E, k, H);
  const auto rest = at::arange(T).ne(bad).nonzero().flatten();
  expect(at::equal(r.index_select(0, rest), std::get<0>(clean).index_select(0, rest)) &&
             at::equal(xn.index_select(0, rest), std::get<1>(clean).index_select(0, rest)) &&
             at::equal(ids.index_select(0, rest), std::get<2>(clean).index_select(0, rest)) &&
             at::equal(weights.index_select(0, rest), std::get<3>(clean).index_select(0, rest)),
         "NaN row: other rows unchanged", T, E, k, H);
}

// Exact ties (a zero router: every probability 1/E) resolve as torch.topk resolves them, not "lower id first",
// through both of its algorithms (nth_element + sort when k/H * 64 > E/H, partial_sort otherwise).
void check_route_ties(int64_t E, int64_t k, int64_t H) {
  const int64_t T = 5, d = 16;
  const auto out = foe::sum_route_dispatch_cpu(at::randn({1, T, d}), at::randn({H, T, d}), at::ones({d}), 1e-6,
                                               at::zeros({E, d}), H, k, true);
  check_route_invariants(out, E, k, H, "ties: ids/pairs/offsets in range");
  expect(at::equal(std::get<2>(out), topk_ids_of(std::get<1>(out), at::zeros({E, d}), k, H)),
         "ties: ids equal torch.topk's", T, E, k, H);
}

// Routing tensors that would index out of bounds are refused with a message naming the problem.
void check_bad_routing_indices() {
  const int64_t T = 4, E = 6, k = 2, H = 2, d = 8, inter = 4;
  const auto routed = foe::sum_route_dispatch_cpu(at::zeros({1, T, d}), at::randn({H, T, d}), at::ones({d}), 1e-6,
                                                  at::randn({E, d}), H, k, true);
  const auto& [r, x, ids, weights, pairs, offsets] = routed;
  const auto gate_up = at::randn({E, 2 * inter, d}), down = at::randn({E, d, inter});
  const auto refused = [&](const at::Tensor& i, const at::Tensor& p, const at::Tensor& o, const char* needle) {
    expect_error([&] { foe::experts_swiglu_cpu(x, gate_up, down, i, weights, p, o, H); }, needle);
  };
  foe::experts_swiglu_cpu(x, gate_up, down, ids, weights, pairs, offsets, H);  // the genuine ones pass
  auto o = offsets.clone();
  o[E] = T * k + 1;
  refused(ids, pairs, o, "end at T*k");
  o = offsets.clone();
  o[0] = 1;
  refused(ids, pairs, o, "start at 0");
  o = offsets.clone();
  o[2] = T * k;  // expert 2's segment ends past expert 3's start
  o[3] = 0;
  refused(ids, pairs, o, "non-decreasing");
  auto i = ids.clone();
  i[1][1] = E;
  refused(i, pairs, offsets, "is not an expert id");
  i = ids.clone();
  i[0][0] = -1;
  refused(i, pairs, offsets, "is not an expert id");
  auto p = pairs.clone();
  p[0] = T * k;
  refused(ids, p, offsets, "is not a pair index");
  p = pairs.clone();
  p[1] = p[0];
  refused(ids, p, offsets, "twice");
  p = pairs.flip(0).contiguous();  // a permutation, but not grouped by expert
  refused(ids, p, offsets, "segment");
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
  for (const Unit& unit : unit_variants()) {
    for (int64_t T : {0, 7}) {
      check_experts(T, 12, 4, 2, unit);
      check_experts(T, 12, 4, 1, unit);
    }
    check_experts(5, 1, 1, 1, unit);  // E = 1
  }
  check_bad_unit_args();
  check_grouping_adversarial();
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  for (float poison : {nan, inf, -inf}) {
    check_route_nan(12, 4, 2, poison);
    check_route_nan(60, 8, 4, poison);
    check_route_nan(8, 8, 1, poison);   // k = E
    check_route_nan(130, 2, 1, poison);  // partial_sort path
  }
  for (const auto& [E, k, H] : std::vector<std::array<int64_t, 3>>{{12, 2, 1}, {60, 8, 4}, {64, 8, 8}, {130, 2, 1},
                                                                   {128, 2, 1}, {8, 8, 1}, {1, 1, 1}}) {
    check_route_ties(E, k, H);
  }
  check_bad_routing_indices();
  for (const char* op : {"foe::sum_route_dispatch_native", "foe::experts_swiglu_native"}) {
    const auto handle = c10::Dispatcher::singleton().findSchema({op, ""});
    expect(handle.has_value() && handle->hasKernelForDispatchKey(c10::DispatchKey::CPU), op, 0, 0, 0, 0);
  }
  std::puts("foe C++ CPU kernels: all checks passed");
  return 0;
}
