"""Experts modules whose forward torch.export cannot record, captured through an equal spelling.

transformers v5 experts classes decorated with @use_experts_implementation dispatch on
config._experts_implementation. Its "eager" forward loops over `expert_hit` (the experts some
token was routed to, from nonzero()): a Python loop whose trip count depends on the routing,
which torch.export cannot record. "grouped_mm" is transformers' implementation of the same
experts (same weights, gate, biases and combine) without data-dependent control flow.

Experts classes that loop over the experts that were hit without that decorator (DBRX's) are
captured through TRACEABLE_FORWARDS: the same forward looping over every expert, which adds the
same terms in the same order (an expert no token picked selects no rows and adds nothing); and
Aria's grouped GEMM, which slices its sorted rows at running sums read as Python ints, through
the same GEMMs on the rows split by the counts.

Either way, only the capture sees the substitute; the eager model (the user's setting, restored
after the capture) stays the reference that translation validation compares the capture
against, so a substitute that drifted from the class it stands for is caught, not trusted.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def _dbrx_every_expert(self, hidden_states, top_k_index, top_k_weights):
    """transformers' DbrxExperts.forward (5.x) over range(num_experts) instead of the experts hit."""
    batch_size = hidden_states.shape[0]
    hidden_states = hidden_states.reshape(-1, self.hidden_size)
    next_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
    per_expert = (-1, self.ffn_hidden_size, self.hidden_size)
    for expert in range(self.num_experts):
        with torch.no_grad():
            slot, token = torch.where(expert_mask[expert])
        w1, v1, w2 = (w.view(per_expert)[expert] for w in (self.mlp.w1, self.mlp.v1, self.mlp.w2))
        states = self.mlp(hidden_states[token], w1, v1, w2).view(-1, self.hidden_size)
        next_states.index_add_(0, token, states * top_k_weights[token, slot, None])
    return next_states.view(batch_size, -1, self.hidden_size)


def _aria_split_gemm(self, input, tokens_per_expert):
    """transformers' AriaGroupedExpertsGemm.forward (sequential_experts_gemm) with the sorted rows
    split by the per-expert counts instead of sliced at their running sums."""
    chunks = input.split(tokens_per_expert.tolist())
    return torch.cat([chunk @ self.weight[expert] for expert, chunk in enumerate(chunks)])


# (module, class name) -> a forward with the same signature and result, without data-dependent loops.
TRACEABLE_FORWARDS = {
    ("transformers.models.dbrx.modeling_dbrx", "DbrxExperts"): _dbrx_every_expert,
    ("transformers.models.aria.modeling_aria", "AriaGroupedExpertsGemm"): _aria_split_gemm,
}


def _dispatches_experts(module: nn.Module) -> bool:
    """An experts module whose class @use_experts_implementation wrapped (it dispatches on its config)."""
    return (hasattr(type(module), "_apply_gate") and hasattr(module, "is_concatenated")
            and hasattr(type(module).forward, "__wrapped__") and getattr(module, "config", None) is not None)


@contextmanager
def exportable_experts(module: nn.Module) -> Iterator[list[str]]:
    """Within the block, experts of `module` set to transformers' "eager" implementation use its
    "grouped_mm" implementation instead, and experts classes in TRACEABLE_FORWARDS their traceable
    forward (names of the substituted experts classes are yielded)."""
    configs: list[tuple[Any, Any]] = []
    instances: list[nn.Module] = []
    names: list[str] = []
    grouped_mm = _has_grouped_mm()
    for sub in module.modules():
        cls = type(sub)
        spelled = TRACEABLE_FORWARDS.get((cls.__module__, cls.__name__))
        if spelled is not None and "forward" not in sub.__dict__:  # an instance forward (hooks) is left alone
            sub.forward = spelled.__get__(sub)
            instances.append(sub)
        elif grouped_mm and _dispatches_experts(sub) and getattr(sub.config, "_experts_implementation", None) == "eager":
            config = sub.config
            if not any(c is config for c, _ in configs):
                configs.append((config, config._experts_implementation_internal))
                config._experts_implementation_internal = "grouped_mm"
        else:
            continue
        if cls.__name__ not in names:
            names.append(cls.__name__)
    if names:
        log.info("capturing %s through a traceable spelling of the same experts (the eager forward loops over the "
                 "experts that were hit, which torch.export cannot record)", ", ".join(names))
    try:
        yield names
    finally:
        for config, previous in configs:
            config._experts_implementation_internal = previous
        for sub in instances:
            del sub.forward


def _has_grouped_mm() -> bool:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:  # no transformers (or one without the experts interface): nothing dispatches
        return False
    return "grouped_mm" in ALL_EXPERTS_FUNCTIONS
