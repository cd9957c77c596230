// foe::experts_swiglu on CPU: per expert, one gathered GEMM pair over the rows routed to it.
//   out[g(e), t] += w[t, j] * (down_e unit(gate_up_e x_t + b_e) + c_e)   for the picks (t, j) of expert e
// or, with weight_input (Llama 4), out[g(e), t] += down_e unit(gate_up_e (w[t, j] x_t) + b_e) + c_e
// with unit() the expert unit of reference.expert_unit (default: silu(gate) * up). Experts run in ascending
// order and each op rounds to x's dtype where the reference's ops do (biases join inside at::linear's GEMM, in
// its accumulation dtype, as in the reference's F.linear), so results match the reference up to GEMM
// summation order.
#include "foe_ops.h"

#include <ATen/ATen.h>

namespace foe {

namespace {

// unit(h) for one expert's rows h [n, 2I] (gated) or [n, I] (relu2), op by op as reference.expert_unit.
at::Tensor expert_unit(const at::Tensor& h, const ExpertUnit& unit) {
  if (!unit.gated()) return at::square(at::relu(h));  // relu2
  const int64_t I = h.size(1) / 2;
  auto gate = h.slice(1, 0, I), up = h.slice(1, I, 2 * I);
  if (unit.limit) {
    gate = at::clamp_max(gate, *unit.limit);
    up = at::clamp(up, -*unit.limit, *unit.limit);
  }
  at::Tensor act;
  switch (unit.activation) {
    case Activation::kSilu:
      act = unit.alpha == 1.0 ? at::silu(gate) : gate * at::sigmoid(gate * unit.alpha);
      break;
    case Activation::kGelu:
      act = at::gelu(gate);
      break;
    default:  // kGeluTanh (relu2 returned above)
      act = at::gelu(gate, "tanh");
      break;
  }
  return act * (unit.up_offset == 0.0 ? up : up + unit.up_offset);
}

// Row e of an optional [E, n] bias.
std::optional<at::Tensor> bias_of(const std::optional<at::Tensor>& bias, int64_t e) {
  return bias ? std::optional<at::Tensor>((*bias)[e]) : std::nullopt;
}

}  // namespace

at::Tensor experts_swiglu_cpu(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                              const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                              const at::Tensor& sorted_pairs, const at::Tensor& expert_offsets, int64_t num_groups,
                              c10::string_view activation, const std::optional<at::Tensor>& gate_up_bias,
                              const std::optional<at::Tensor>& down_bias, double alpha, std::optional<double> limit,
                              double up_offset, bool weight_input) {
  const ExpertUnit unit = check_experts_args(x, gate_up, down, topk_ids, topk_weights, sorted_pairs, expert_offsets,
                                            num_groups, activation, gate_up_bias, down_bias, alpha, limit, up_offset);
  TORCH_CHECK(x.device().is_cpu(), "experts_swiglu_cpu got a ", x.device(), " tensor");
  check_routing_indices(topk_ids, sorted_pairs, expert_offsets, gate_up.size(0));  // ids, pairs, offsets in range
  const int64_t T = x.size(0), d = x.size(1), k = topk_ids.size(1);
  const int64_t E = gate_up.size(0), experts_per_group = E / num_groups;
  auto out = at::zeros({num_groups, T, d}, x.options());  // [G,T,d]
  if (T == 0) return out;

  const auto pairs = sorted_pairs.reshape({-1});                         // [T*k] p = t*k + j, grouped by expert
  const auto tokens = at::floor_divide(pairs, k);                        // [T*k] token of each pair
  const auto pair_weights = topk_weights.reshape({-1}).index_select(0, pairs).unsqueeze(1);  // [T*k,1]
  auto rows = x.index_select(0, tokens);                                 // [T*k,d] gathered once
  if (weight_input) rows = rows * pair_weights;                          // w * x_t in x's dtype
  const auto offsets = expert_offsets.to(at::kCPU).contiguous();
  const int64_t* bounds = offsets.const_data_ptr<int64_t>();             // [E+1]
  for (int64_t e = 0; e < E; ++e) {
    const int64_t begin = bounds[e], end = bounds[e + 1];
    if (end == begin) continue;
    const auto h = at::linear(rows.slice(0, begin, end), gate_up[e], bias_of(gate_up_bias, e));  // [n,2I] or [n,I]
    const auto hidden = expert_unit(h, unit);                                                    // [n,I]
    auto y = at::linear(hidden, down[e], bias_of(down_bias, e));                                 // [n,d]
    if (!weight_input) y = y * pair_weights.slice(0, begin, end);
    out[e / experts_per_group].index_add_(0, tokens.slice(0, begin, end), y);
  }
  return out;
}

}  // namespace foe
