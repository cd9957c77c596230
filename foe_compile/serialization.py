"""Saving and loading converted models.

A converted model saves in the *source* layout (the checkpoint plain transformers loads as the
source model) plus `config.foe`, the resolved FoEConfig with every layer's expert assignment,
its schema version and a checksum of both. Loading checks the section (foe_config_from_section)
and converts the source model again with that config: lossless, because conversion only
partitions weights.

Saving refuses, before writing anything, a path that is a file and weights on the meta device,
and writes into a fresh directory beside the target that is then moved into place, so an
interrupted save never leaves a directory that looks complete (publish_directory).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import FoEConfig
from .hf_outputs import converted_forward
from .models import FoEDenseMLP, FoEMoE

FOE_SCHEMA_VERSION = 1
_SECTION_KEYS = ("schema_version", "checksum")
# Files save_pretrained writes for the weights; stale ones are removed when saving over a directory.
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")

_CONVERTED_CLASSES: dict[type, type] = {}  # source class -> its class with FoE layers (module level)
BLOCK_CONVERTED_CLASSES: dict[type, type] = {}  # source class -> its class with converted blocks (hf_blocks.py)


def source_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The converted model's weights reassembled under the source model's parameter names (a model
    whose blocks were converted in place kept them: its own state_dict)."""
    if type(model) in BLOCK_CONVERTED_CLASSES.values():
        return model.state_dict()
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


def foe_section(config: FoEConfig) -> dict[str, Any]:
    """config.json's `foe` section: the FoE settings plus schema_version and a checksum of both."""
    section = {"schema_version": FOE_SCHEMA_VERSION, **json.loads(json.dumps(config.to_dict()))}
    section["checksum"] = _checksum(section)
    return section


def _checksum(section: dict[str, Any]) -> str:
    # Canonical JSON (sorted keys) of everything but the checksum: the same before and after a round trip.
    body = json.dumps({k: v for k, v in section.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def foe_config_from_section(section: Any, file: str | os.PathLike) -> FoEConfig:
    """The FoEConfig a saved `foe` section describes. ValueError naming `file` when the section
    has missing or unknown keys, another schema version, or settings edited after saving."""
    where = f"{file}: the 'foe' section"
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(section).__name__}")
    settings = [f.name for f in fields(FoEConfig)]
    missing = [k for k in (*_SECTION_KEYS, *settings) if k not in section]
    if missing:
        raise ValueError(f"{where} lacks the key(s) {missing}; it was edited or written by an older foe_compile. "
                         f"Convert the source model again and save it (a converted model loads only from a "
                         f"complete section, never from defaults)")
    unknown = sorted(set(section) - {*_SECTION_KEYS, *settings})
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; valid keys: {[*_SECTION_KEYS, *settings]}")
    if section["schema_version"] != FOE_SCHEMA_VERSION:
        raise ValueError(f"{where} has schema_version {section['schema_version']!r}; this foe_compile reads "
                         f"version {FOE_SCHEMA_VERSION} only")
    if section["checksum"] != _checksum(section):
        raise ValueError(f"{where} was edited after saving (its checksum does not match its settings); restore the "
                         f"saved config.json, or convert the source model again with the settings you want")
    try:
        return FoEConfig.from_dict({k: section[k] for k in settings})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where} is invalid: {err}") from None


def check_savable(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Refuse, before anything is written, a save that could only write part of a model."""
    if os.path.exists(save_directory) and not os.path.isdir(save_directory):
        raise ValueError(f"{save_directory} exists and is not a directory; save_pretrained needs a directory "
                         f"(nothing was written)")
    meta = [name for name, t in model.state_dict().items() if t.is_meta]
    if meta:
        raise ValueError(f"this converted model has {len(meta)} weights on the meta device (e.g. {meta[0]}), so there "
                         f"are no values to save (nothing was written). Convert a model that holds real weights")


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh directory beside `target` to write into; on success its files are published to
    `target` (publish_directory), on failure it is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:12]}"
    staged.mkdir()  # not tempfile.mkdtemp: its 0o700 would become the saved directory's mode
    try:
        yield staged
        publish_directory(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def publish_directory(staged: Path, target: Path) -> None:
    """Move the files of a finished save into `target`, which never looks complete half-way:
    a new (or empty) target is one atomic rename; into an existing directory, config.json is
    removed first and moved in last, stale weight files are removed and other files (a tokenizer
    saved beside the model) are kept."""
    try:
        os.rename(staged, target)
        return
    except OSError:
        if not target.is_dir():
            raise
    (target / "config.json").unlink(missing_ok=True)
    written = {p.name for p in staged.iterdir()}
    for old in target.iterdir():
        if _WEIGHT_FILE.fullmatch(old.name) and old.name not in written:
            old.unlink()
    for p in sorted(staged.iterdir(), key=lambda p: p.name == "config.json"):
        os.replace(p, target / p.name)


def save_source_layout(self, save_directory: str | os.PathLike, **kwargs) -> None:
    """save_pretrained of a converted model: source layout + config.foe (see module docstring)."""
    if "state_dict" in kwargs:
        raise ValueError("a converted model saves its own weights in the source layout; do not pass state_dict")
    check_savable(self, save_directory)
    self.config.foe = foe_section(self.foe_config)
    state = source_state_dict(self)
    base = type(self).__mro__[1]
    if not kwargs.get("is_main_process", True):  # another rank of a distributed save: the main one writes
        return base.save_pretrained(self, save_directory, state_dict=state, **kwargs)
    if kwargs.get("push_to_hub"):  # the repository is named after the target, not the staging directory
        kwargs.setdefault("repo_id", Path(save_directory).name)
    with staged_directory(save_directory) as staged:
        base.save_pretrained(self, staged, state_dict=state, **kwargs)


def load_converted(cls, path: str | os.PathLike, *args, **kwargs) -> nn.Module:
    from .convert import from_pretrained

    return from_pretrained(path, *args, **kwargs)


def mark_converted(model: nn.Module, config) -> None:
    """Give this instance (only) a subclass whose save/from_pretrained keep the FoE structure and
    whose forward serves Hugging Face's optional outputs (hf_outputs.py)."""
    cls = type(model)
    if cls not in _CONVERTED_CLASSES:
        _CONVERTED_CLASSES[cls] = type(
            f"FoE{cls.__name__}", (cls,),
            {"save_pretrained": save_source_layout, "from_pretrained": classmethod(load_converted),
             "forward": converted_forward(cls), "__module__": __name__},
        )
    model.__class__ = _CONVERTED_CLASSES[cls]
    model.foe_config = config
    model.config.foe = foe_section(config)


def is_converted(model: nn.Module) -> bool:
    return type(model) in _CONVERTED_CLASSES.values() or type(model) in BLOCK_CONVERTED_CLASSES.values()
