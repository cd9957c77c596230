"""ModelShape: the numbers of a source MoE model that conversion decisions depend on."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import FoEConfig, default_group_count, valid_group_counts
from .families import Family, is_moe_block


@dataclass(frozen=True)
class ModelShape:
    model_class: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    num_heads: int
    num_kv_heads: int
    hidden_size: int
    # Dense SwiGLU widths that must split over H: shared experts and dense layers' MLPs.
    split_widths: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, model: nn.Module, family: Family) -> ModelShape:
        cfg = model.config
        layers = model.model.layers
        moe = tuple(i for i, layer in enumerate(layers) if is_moe_block(layer.mlp))
        if not moe:
            raise ValueError(f"{type(model).__name__} has no MoE layers (model.model.layers[*].mlp); nothing to convert")
        widths = []
        for i, layer in enumerate(layers):
            if i not in moe:
                widths.append((f"model.layers.{i}.mlp", layer.mlp.gate_proj.weight.shape[0]))
            elif family.has_shared_expert:
                widths.append((f"model.layers.{i}.mlp.shared_expert", layer.mlp.shared_expert.gate_proj.weight.shape[0]))
        return cls(
            model_class=type(model).__name__,
            num_layers=len(layers),
            moe_layers=moe,
            num_experts=family.num_experts(cfg),
            top_k=int(cfg.num_experts_per_tok),
            num_heads=int(cfg.num_attention_heads),
            num_kv_heads=int(cfg.num_key_value_heads),
            hidden_size=int(cfg.hidden_size),
            split_widths=tuple(widths),
        )

    def valid_group_counts(self, mode: str) -> list[int]:
        valid = valid_group_counts(self.num_kv_heads, self.num_experts, self.top_k, mode)
        return [h for h in valid if all(w % h == 0 for _, w in self.split_widths)]

    def resolve_group_count(self, config: FoEConfig) -> int:
        """H for this model, or a ValueError naming the module and listing the valid H."""
        valid = self.valid_group_counts(config.mode)
        if config.num_groups is None:
            return max(h for h in valid if h <= default_group_count(self.num_kv_heads, self.num_experts,
                                                                     self.top_k, config.mode))
        H = config.num_groups
        if H in valid:
            return H
        problems = []
        if H > self.num_kv_heads:
            problems.append(f"H={H} is larger than the {self.num_kv_heads} KV heads of model.layers.*.self_attn")
        elif self.num_kv_heads % H:
            problems.append(f"{self.num_kv_heads} KV heads (model.layers.*.self_attn) are not divisible by H={H}")
        if self.num_experts % H:
            problems.append(f"E={self.num_experts} experts (model.layers.*.mlp.experts) are not divisible by H={H}")
        if config.mode == "foe" and self.top_k % H:
            problems.append(f"top-k={self.top_k} (model.layers.*.mlp.gate) is not divisible by H={H}")
        problems += [f"{name} intermediate size {w} is not divisible by H={H}" for name, w in self.split_widths if w % H]
        raise ValueError(
            f"cannot convert {self.model_class} with num_groups={H} in mode {config.mode!r}: "
            f"{'; '.join(problems)}. Valid num_groups: {valid}"
        )
