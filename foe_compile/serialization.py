"""Saving and loading converted models.

A converted model saves in the *source* layout (the checkpoint plain transformers loads as the
source model) plus `config.foe`, the resolved FoEConfig with every layer's expert assignment.
Loading rebuilds the source model and converts it again with that config: lossless, because
conversion only partitions weights.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from .hf_outputs import converted_forward
from .models import FoEDenseMLP, FoEMoE

_CONVERTED_CLASSES: dict[type, type] = {}


def source_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The converted model's weights reassembled under the source model's parameter names."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        state[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        state.update({p + "self_attn." + k: v for k, v in _attention_state(layer.self_attn).items()})
        state.update({p + "mlp." + k: v for k, v in _mlp_state(layer.mlp).items()})
    return {k: v.contiguous() for k, v in state.items()}


def _attention_state(attn: nn.Module) -> dict[str, Tensor]:
    g = attn.groups
    state = {f"{n}.weight": torch.cat([getattr(x, n).weight for x in g]) for n in ("q_proj", "k_proj", "v_proj")}
    state.update({f"{n}.bias": torch.cat([getattr(x, n).bias for x in g])
                  for n in ("q_proj", "k_proj", "v_proj") if g[0].q_proj.bias is not None})
    state["o_proj.weight"] = torch.cat([x.o_proj.weight for x in g], dim=1)
    if g[0].o_proj.bias is not None:
        state["o_proj.bias"] = g[0].o_proj.bias
    if attn.spec.qk_norm == "per_head":
        state["q_norm.weight"], state["k_norm.weight"] = g[0].q_norm.weight, g[0].k_norm.weight
    elif attn.spec.qk_norm == "full_width":
        state["q_norm.weight"] = torch.cat([x.q_norm_weight for x in g])
        state["k_norm.weight"] = torch.cat([x.k_norm_weight for x in g])
    return state


def _split_mlp_state(shares: nn.ModuleList) -> dict[str, Tensor]:
    return {
        "gate_proj.weight": torch.cat([s.gate_proj.weight for s in shares]),
        "up_proj.weight": torch.cat([s.up_proj.weight for s in shares]),
        "down_proj.weight": torch.cat([s.down_proj.weight for s in shares], dim=1),
    }


def _mlp_state(mlp: nn.Module) -> dict[str, Tensor]:
    if isinstance(mlp, FoEDenseMLP):
        return _split_mlp_state(mlp.shares)
    assert isinstance(mlp, FoEMoE)
    gate_up, down = mlp.gate_up_proj, mlp.down_proj  # assignment order
    if mlp.router.perm is not None:  # back to source expert order: source[perm[j]] = ours[j]
        order = torch.argsort(mlp.router.perm.to(gate_up.device))
        gate_up, down = gate_up[order], down[order]
    state = {"gate.weight": mlp.router.weight, "experts.gate_up_proj": gate_up, "experts.down_proj": down}
    if mlp.shared is not None:
        state.update({"shared_expert." + k: v for k, v in _split_mlp_state(mlp.shared).items()})
        state["shared_expert_gate.weight"] = mlp.shared_gate.weight
    return state


def _save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
    """save_pretrained of a converted model: source layout + config.foe (see module docstring)."""
    if "state_dict" in kwargs:
        raise ValueError("a converted model saves its own weights in the source layout; do not pass state_dict")
    self.config.foe = self.foe_config.to_dict()
    base = type(self).__mro__[1]
    base.save_pretrained(self, save_directory, state_dict=source_state_dict(self), **kwargs)


def _from_pretrained(cls, path: str | os.PathLike, *args, **kwargs) -> nn.Module:
    from .convert import from_pretrained

    return from_pretrained(path, *args, **kwargs)


def mark_converted(model: nn.Module, config) -> None:
    """Give this instance (only) a subclass whose save/from_pretrained keep the FoE structure and
    whose forward serves Hugging Face's optional outputs (hf_outputs.py)."""
    cls = type(model)
    if cls not in _CONVERTED_CLASSES:
        _CONVERTED_CLASSES[cls] = type(
            f"FoE{cls.__name__}", (cls,),
            {"save_pretrained": _save_pretrained, "from_pretrained": classmethod(_from_pretrained),
             "forward": converted_forward(cls), "__module__": __name__},
        )
    model.__class__ = _CONVERTED_CLASSES[cls]
    model.foe_config = config
    model.config.foe = config.to_dict()


def is_converted(model: nn.Module) -> bool:
    return type(model) in _CONVERTED_CLASSES.values()
