// Argument checks of the native foe:: ops (they mirror ops.check_route_args / check_experts_args and add the
// dtype/device rules the kernels rely on), and the route outputs every device allocates alike.
#include "foe_ops.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <string_view>
#include <utility>
#include <vector>

namespace foe {

namespace {
bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// An optional bias: [E, n] (`layout` names it) in x's dtype, on x's device.
void check_bias(const std::optional<at::Tensor>& bias, const char* name, const char* layout, const at::Tensor& x,
                int64_t E, int64_t n) {
  if (!bias) return;
  TORCH_CHECK(bias->dim() == 2 && bias->size(0) == E && bias->size(1) == n, name, " must be ", layout, " = [", E,
              ", ", n, "], got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(), ", got ",
              bias->scalar_type(), ": cast it with .to(x.dtype)");
  TORCH_CHECK(bias->device() == x.device(), "all inputs of foe::experts_swiglu must be on x's device ", x.device());
}
}  // namespace

void check_route_args(const at::Tensor& residual, const at::Tensor& partials, const at::Tensor& norm_weight,
                      const at::Tensor& router_weight, int64_t num_groups, int64_t top_k) {
  TORCH_CHECK(partials.dim() == 3 && residual.dim() == 3, "residual/partials must be [H, T, d], got ",
              residual.sizes(), " and ", partials.sizes());
  TORCH_CHECK((residual.size(0) == 1 || residual.size(0) == partials.size(0)) &&
                  residual.size(1) == partials.size(1) && residual.size(2) == partials.size(2),
              "residual ", residual.sizes(), " must be [1 or H, T, d] with partials ", partials.sizes());
  TORCH_CHECK(router_weight.dim() == 2 && router_weight.size(1) == partials.size(2) && norm_weight.dim() == 1 &&
                  norm_weight.size(0) == partials.size(2),
              "router_weight [E, d] ", router_weight.sizes(), " / norm_weight [d] ", norm_weight.sizes(),
              " do not match hidden size ", partials.size(2));
  const int64_t E = router_weight.size(0);
  TORCH_CHECK(num_groups >= 1 && top_k >= 1 && E % num_groups == 0 && top_k % num_groups == 0 && top_k <= E,
              "need E=", E, " and top_k=", top_k, " divisible by num_groups=", num_groups, ", 1 <= top_k <= E");
  const auto dtype = partials.scalar_type();
  TORCH_CHECK(is_float_type(dtype), "partials must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(residual.scalar_type() == dtype && norm_weight.scalar_type() == dtype &&
                  router_weight.scalar_type() == dtype,
              "residual, norm_weight and router_weight must have the partials' dtype ", dtype,
              ": cast them with .to(partials.dtype)");
  TORCH_CHECK(residual.device() == partials.device() && norm_weight.device() == partials.device() &&
                  router_weight.device() == partials.device(),
              "all inputs of foe::sum_route_dispatch must be on one device (", partials.device(), ")");
}

Scoring check_route_variant(const at::Tensor& router_weight, c10::string_view scoring,
                            const std::optional<at::Tensor>& router_bias,
                            const std::optional<at::Tensor>& correction_bias, double routed_scaling) {
  static constexpr std::pair<c10::string_view, Scoring> kNames[] = {
      {"softmax", Scoring::kSoftmax}, {"sigmoid", Scoring::kSigmoid}, {"sqrtsoftplus", Scoring::kSqrtSoftplus}};
  const auto* found = std::find_if(std::begin(kNames), std::end(kNames),
                                   [&](const auto& entry) { return entry.first == scoring; });
  TORCH_CHECK_VALUE(found != std::end(kNames), "unknown router scoring '", scoring,
                    "'; foe::sum_route_dispatch computes softmax, sigmoid and sqrtsoftplus");
  TORCH_CHECK_VALUE(std::isfinite(routed_scaling), "routed_scaling must be finite, got ", routed_scaling);
  const int64_t E = router_weight.size(0);
  const auto dtype = router_weight.scalar_type();
  for (const auto& [name, bias] : {std::pair<const char*, const std::optional<at::Tensor>*>{"router_bias", &router_bias},
                                   {"correction_bias", &correction_bias}}) {
    if (!bias->has_value()) continue;
    const at::Tensor& b = **bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == E, name, " must be [E] = [", E, "], got ", b.sizes());
    const bool fp32_ok = std::string_view(name) == "correction_bias" && b.scalar_type() == at::kFloat;
    TORCH_CHECK_VALUE(b.scalar_type() == dtype || fp32_ok, name, " must have dtype ", dtype,
                      fp32_ok ? "" : (std::string_view(name) == "correction_bias" ? " or Float" : ""), ", got ",
                      b.scalar_type(), ": cast it with .to(...)");
    TORCH_CHECK_VALUE(b.device() == router_weight.device(), name, " must be on router_weight's device ",
                      router_weight.device(), ", got ", b.device());
  }
  return found->second;
}

void check_route_limits(const at::Tensor& router_weight, int64_t num_groups,
                        const std::optional<at::Tensor>& correction_bias, int64_t n_group, int64_t topk_group,
                        const std::optional<at::Tensor>& expert_scale, double renorm_eps, double renorm_min,
                        bool topk_first) {
  const int64_t E = router_weight.size(0);
  if (n_group != 1) {
    TORCH_CHECK_VALUE(n_group >= 1 && E % n_group == 0 && E / n_group >= 2, "n_group=", n_group,
                      " must split the ", E, " experts into equal groups of at least 2");
    TORCH_CHECK_VALUE(topk_group >= 1 && topk_group <= n_group, "topk_group=", topk_group, " must be in [1, n_group=",
                      n_group, "]");
  }
  for (const auto& [name, value] : {std::pair<const char*, double>{"renorm_eps", renorm_eps}, {"renorm_min", renorm_min}}) {
    TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0.0, name, " must be finite and >= 0, got ", value);
  }
  TORCH_CHECK_VALUE(!topk_first || (!correction_bias && n_group == 1),
                    "topk_first selects on the logits: it takes no correction_bias and no group limit (n_group=1)");
  if (expert_scale) {
    const at::Tensor& s = *expert_scale;
    TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == E, "expert_scale must be [E] = [", E, "], got ", s.sizes());
    TORCH_CHECK_VALUE(s.scalar_type() == router_weight.scalar_type() || s.scalar_type() == at::kFloat,
                      "expert_scale must have dtype ", router_weight.scalar_type(), " or Float, got ", s.scalar_type(),
                      ": cast it with .to(...)");
    TORCH_CHECK_VALUE(s.device() == router_weight.device(), "expert_scale must be on router_weight's device ",
                      router_weight.device(), ", got ", s.device());
  }
  TORCH_CHECK(num_groups == 1 || n_group == 1, "a group limit (n_group=", n_group,
              ") needs num_groups=1: in the FoE form the quota of k/H picks per block replaces it (pass n_group=1)");
}

namespace {

ExpertUnit parse_expert_unit(c10::string_view activation, double alpha, std::optional<double> limit,
                             double up_offset) {
  static constexpr std::pair<c10::string_view, Activation> kNames[] = {
      {"silu", Activation::kSilu}, {"gelu", Activation::kGelu}, {"gelu_tanh", Activation::kGeluTanh},
      {"relu2", Activation::kRelu2}};
  const auto* found = std::find_if(std::begin(kNames), std::end(kNames),
                                   [&](const auto& entry) { return entry.first == activation; });
  TORCH_CHECK_VALUE(found != std::end(kNames), "unknown expert activation '", activation,
                    "'; foe::experts_swiglu computes silu, gelu, gelu_tanh and relu2");
  const ExpertUnit unit{found->second, alpha, limit, up_offset};
  TORCH_CHECK_VALUE(alpha == 1.0 || unit.activation == Activation::kSilu, "alpha=", alpha,
                    " applies to the silu unit only (g * sigmoid(alpha * g)), not ", activation);
  TORCH_CHECK_VALUE(unit.gated() || (!limit && up_offset == 0.0), "limit/up_offset apply to gated units only, not ",
                    activation);
  TORCH_CHECK_VALUE(!limit || !std::isnan(*limit), "limit is NaN");
  return unit;
}

void check_experts_shapes(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                          const at::Tensor& topk_ids, const at::Tensor& topk_weights, const at::Tensor& sorted_pairs,
                          const at::Tensor& expert_offsets, int64_t num_groups, const ExpertUnit& unit,
                          const std::optional<at::Tensor>& gate_up_bias, const std::optional<at::Tensor>& down_bias) {
  TORCH_CHECK(gate_up.dim() == 3, "gate_up must be [E, 2I, d] (gated) or [E, I, d] (relu2), got ", gate_up.sizes());
  TORCH_CHECK(!unit.gated() || gate_up.size(1) % 2 == 0, "a gated unit needs gate_up [E, 2I, d], got ",
              gate_up.sizes());
  const int64_t E = gate_up.size(0), rows = gate_up.size(1), d = gate_up.size(2);
  const int64_t I = unit.gated() ? rows / 2 : rows;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == d, "x must be [T, ", d, "], got ", x.sizes());
  TORCH_CHECK(down.dim() == 3 && down.size(0) == E && down.size(1) == d && down.size(2) == I,
              "down must be [E, d, I] = [", E, ", ", d, ", ", I, "], got ", down.sizes());
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0) && topk_weights.sizes() == topk_ids.sizes() &&
                  sorted_pairs.numel() == topk_ids.numel() && expert_offsets.numel() == E + 1,
              "topk_ids [T, k], topk_weights [T, k], sorted_pairs [T*k] and expert_offsets [E+1] disagree: ",
              topk_ids.sizes(), ", ", topk_weights.sizes(), ", ", sorted_pairs.sizes(), ", ",
              expert_offsets.sizes());
  TORCH_CHECK(num_groups >= 1 && E % num_groups == 0, "E=", E, " is not divisible by num_groups=", num_groups);
  TORCH_CHECK(topk_ids.scalar_type() == at::kLong && sorted_pairs.scalar_type() == at::kLong &&
                  expert_offsets.scalar_type() == at::kLong,
              "topk_ids, sorted_pairs and expert_offsets must be int64 (as foe::sum_route_dispatch returns them)");
  TORCH_CHECK(is_float_type(x.scalar_type()) && gate_up.scalar_type() == x.scalar_type() &&
                  down.scalar_type() == x.scalar_type() && topk_weights.scalar_type() == x.scalar_type(),
              "x, gate_up, down and topk_weights must share one float dtype (float32/bfloat16/float16), got ",
              x.scalar_type(), ", ", gate_up.scalar_type(), ", ", down.scalar_type(), ", ",
              topk_weights.scalar_type());
  for (const at::Tensor* t : {&gate_up, &down, &topk_ids, &topk_weights, &sorted_pairs, &expert_offsets}) {
    TORCH_CHECK(t->device() == x.device(), "all inputs of foe::experts_swiglu must be on x's device ", x.device());
  }
  check_bias(gate_up_bias, "gate_up_bias", unit.gated() ? "[E, 2I]" : "[E, I]", x, E, rows);
  check_bias(down_bias, "down_bias", "[E, d]", x, E, d);
}

}  // namespace

ExpertUnit check_experts_args(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                              const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                              const at::Tensor& sorted_pairs, const at::Tensor& expert_offsets, int64_t num_groups,
                              c10::string_view activation, const std::optional<at::Tensor>& gate_up_bias,
                              const std::optional<at::Tensor>& down_bias, double alpha, std::optional<double> limit,
                              double up_offset) {
  const ExpertUnit unit = parse_expert_unit(activation, alpha, limit, up_offset);
  check_experts_shapes(x, gate_up, down, topk_ids, topk_weights, sorted_pairs, expert_offsets, num_groups, unit,
                       gate_up_bias, down_bias);
  return unit;
}

void check_routing_indices(const at::Tensor& topk_ids, const at::Tensor& sorted_pairs,
                           const at::Tensor& expert_offsets, int64_t num_experts) {
  TORCH_CHECK(topk_ids.device().is_cpu() && sorted_pairs.device().is_cpu() && expert_offsets.device().is_cpu(),
              "check_routing_indices reads CPU tensors (on CUDA these values are not checked: see foe_ops.h)");
  const auto ids_c = topk_ids.contiguous(), pairs_c = sorted_pairs.contiguous(), offsets_c = expert_offsets.contiguous();
  const int64_t* ids = ids_c.const_data_ptr<int64_t>();          // [n] = [T*k], p = t*k + j
  const int64_t* pairs = pairs_c.const_data_ptr<int64_t>();      // [n]
  const int64_t* offsets = offsets_c.const_data_ptr<int64_t>();  // [E+1]
  const int64_t n = ids_c.numel(), E = num_experts;
  const char* hint = ": pass the outputs of foe::sum_route_dispatch (or reference.group_by_expert(topk_ids, E))";
  TORCH_CHECK(pairs_c.numel() == n && offsets_c.numel() == E + 1, "sorted_pairs must hold T*k = ", n,
              " and expert_offsets E+1 = ", E + 1, " entries, got ", pairs_c.numel(), " and ", offsets_c.numel(), hint);
  TORCH_CHECK(offsets[0] == 0 && offsets[E] == n, "expert_offsets must start at 0 and end at T*k = ", n, ", got ",
              offsets[0], " and ", offsets[E], hint);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(offsets[e] <= offsets[e + 1], "expert_offsets must be non-decreasing, got expert_offsets[", e,
                "] = ", offsets[e], " > expert_offsets[", e + 1, "] = ", offsets[e + 1], hint);
  }
  for (int64_t p = 0; p < n; ++p) {
    TORCH_CHECK(ids[p] >= 0 && ids[p] < E, "topk_ids.flatten()[", p, "] = ", ids[p], " is not an expert id in [0, ",
                E, ")", hint);
  }
  std::vector<bool> seen(n, false);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = offsets[e]; i < offsets[e + 1]; ++i) {
      const int64_t p = pairs[i];
      TORCH_CHECK(p >= 0 && p < n, "sorted_pairs[", i, "] = ", p, " is not a pair index in [0, T*k = ", n, ")", hint);
      TORCH_CHECK(!seen[p], "sorted_pairs holds pair ", p, " twice (again at position ", i, ")", hint);
      TORCH_CHECK(ids[p] == e, "sorted_pairs[", i, "] = ", p, " lies in expert ", e, "'s segment of expert_offsets but",
                  " topk_ids.flatten()[", p, "] = ", ids[p], hint);
      seen[p] = true;
    }
  }
}

RouteOutputs empty_route_outputs(const at::Tensor& partials, int64_t num_experts, int64_t top_k) {
  const int64_t T = partials.size(1), d = partials.size(2);
  const auto longs = partials.options().dtype(at::kLong);
  return {at::empty({T, d}, partials.options()), at::empty({T, d}, partials.options()),
          at::empty({T, top_k}, longs),          at::empty({T, top_k}, partials.options()),
          at::empty({T * top_k}, longs),         at::empty({num_experts + 1}, longs)};
}

}  // namespace foe
