"""A zoo of tiny random-weight Mixture-of-Experts causal LMs, one per family of the *installed*
transformers, to measure which families convert() handles (bench/family_coverage.py).

- `moe_families()`: every model_type of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES whose config class
  (or a non-text sub-config, e.g. dbrx's `ffn_config`) declares an expert count. Multimodal
  wrappers (gemma4, llama4, qwen3_5_moe, ...) are left out when their `text_config` is itself a
  listed causal LM (`composite_moe_types()` names them), so each decoder is measured once.
- `tiny_config(model_type)`: the family's default config shrunk by one generic rule on
  attribute names (`_generic_overrides`: hidden 64, 4 layers, 4 query / 2 KV heads, 8 experts,
  top-2, vocab 128, intermediate sizes 32, layer-kind lists cut to 4 layers keeping every
  kind), then the family's row of `FAMILY_OVERRIDES` for what the rule gets wrong.
- `tiny_model(model_type)`: that config built on the CPU in eval mode, with `randomize_zero_init`
  applied: every parameter the family initialises to zero (attention and expert biases, router
  correction biases, attention sinks, Gemma-style norm offsets) gets small random values and
  every all-ones one (norm weights) becomes 1 + 0.1·N(0, 1), so that a converter which drops or
  misplaces one of them shows in the logits instead of passing as exact. A family whose tiny
  config or model cannot be built raises `ZooBuildError` with the reason.
- `describe(model)`: attention kind, router kind and expert activation, for coverage tables.

No downloads; everything is random weights. Typical build + forward: well under a second.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

import torch
from torch import nn

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, TOP_K, VOCAB, INTERMEDIATE = 64, 4, 4, 2, 16, 8, 2, 128, 32

EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_ATTRS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_top_k", "top_k_experts", "moe_k")
SHARED_COUNT_ATTRS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
TOKEN_ID_ATTRS = ("pad_token_id", "bos_token_id", "eos_token_id", "eod_token_id", "sep_token_id")

# Exact attribute name -> tiny value (ints only; None / 0 / bool defaults are kept).
_EXACT = {
    **dict.fromkeys(EXPERT_COUNT_ATTRS, EXPERTS), **dict.fromkeys(TOP_K_ATTRS, TOP_K),
    **dict.fromkeys(SHARED_COUNT_ATTRS, 1),
    "hidden_size": HIDDEN, "d_model": HIDDEN, "num_hidden_layers": LAYERS, "n_layers": LAYERS,
    "num_attention_heads": HEADS, "n_heads": HEADS, "num_key_value_heads": KV_HEADS, "kv_n_heads": KV_HEADS,
    "head_dim": HEAD_DIM, "vocab_size": VOCAB, "max_position_embeddings": 256, "max_seq_len": 256,
    "model_max_length": 256, "kv_lora_rank": 16, "q_lora_rank": 24, "o_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "qk_head_dim": 16, "v_head_dim": 16, "rotary_dim": 8,
    "first_k_dense_replace": 1, "num_dense_layers": 1, "num_nextn_predict_layers": 0,
    "sliding_window": 4, "sliding_window_size": 4, "attention_chunk_size": 4,
    "index_topk": 4, "index_n_heads": 2, "index_head_dim": 16, "router_hidden_size": 16,
    "zero_expert_num": 2, "ssm_state_size": 8, "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_num_heads": 4,
    "mamba_head_dim": 16, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_chunk_size": 8, "chunk_size": 8,
    "mamba_dt_rank": 8, "linear_num_heads": 4, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_head_dim": 16, "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2, "swa_head_dim": 16, "kv_channels": 16, "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": VOCAB, "num_kv_shared_layers": 0, "max_window_layers": LAYERS,
}
# Name patterns for the rest (first match wins): any intermediate / FFN width -> small.
_PATTERNS = [(re.compile(r"intermediate|ffn_hidden_size|ffn_dim|expert_ffn"), INTERMEDIATE)]
_SKIP = {"chunk_size_feed_forward", "pretraining_tp", "seed", "transformers_version"}


class ZooBuildError(RuntimeError):
    """A family whose tiny model cannot be built; the message says why."""


# One row per family: what the generic rule gets wrong (data, not code; see the module docstring).
FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    "doge": dict(is_moe=True, num_experts=16),  # product-key experts: E must be a square
    "gemma4_text": dict(enable_moe_block=True, moe_intermediate_size=INTERMEDIATE, global_head_dim=2 * HEAD_DIM),
    "dbrx": dict(attn_config=dict(kv_n_heads=KV_HEADS, clip_qkv=8.0,  # the modeling code reads
                                  rope_theta=10000.0)),  # attn_config.rope_theta, which the class lacks
    "deepseek_v2": dict(first_k_dense_replace=1),  # as in DeepSeek-V2's checkpoints (default 0)
    "dots1": dict(n_shared_experts=1, first_k_dense_replace=1),  # defaults None and 0
    "granitemoehybrid": dict(layer_types=["mamba", "attention", "mamba", "attention"]),  # default: Mamba only
    "jamba": dict(attn_layer_period=4, attn_layer_offset=2),  # default period 8: no attention in 4 layers
    "longcat_flash": dict(num_layers=LAYERS // 2),  # num_layers blocks of two sublayers each
    "hunyuan_v1_moe": dict(head_dim=HEAD_DIM),  # default None is not derived
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),  # default None
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=4,
                           indexer_compress_ratio=2, hc_lowrank=8),  # QSA indexer: no defaults
    "zaya": dict(num_experts_per_tok=1),  # "ZAYA currently supports num_experts_per_tok=1 only"
}


def composite_moe_types() -> dict[str, str]:
    """Multimodal MoE model types that moe_families() represents by their text decoder's type."""
    return dict(_scan()[1])


def moe_families() -> list[str]:
    """Every MoE causal-LM model_type of the installed transformers (sorted)."""
    return list(_scan()[0])


def _scan() -> tuple[list[str], list[tuple[str, str]]]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = {}  # model_type -> model_type of its text decoder (itself for a plain causal LM)
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config_cls = CONFIG_MAPPING[model_type]
        if not dataclasses.is_dataclass(config_cls):  # e.g. musicgen: not a decoder config
            continue
        subs = {k: v for k, v in (getattr(config_cls, "sub_configs", None) or {}).items()
                if dataclasses.is_dataclass(v)}
        text = subs.get("text_config")
        if text is not None and _declares_experts(text):
            found[model_type] = getattr(text, "model_type", model_type)
        elif _declares_experts(config_cls) or any(_declares_experts(s) for s in subs.values()):
            found[model_type] = model_type
    composite = sorted((mt, text) for mt, text in found.items() if mt != text and text in found)
    return sorted(mt for mt in found if mt not in dict(composite)), composite


def _declares_experts(config_cls: type) -> bool:
    return any(f.name in EXPERT_COUNT_ATTRS for f in dataclasses.fields(config_cls))


def _config_class(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"unknown model_type {model_type!r}; MoE families of this transformers: {moe_families()}")
    return CONFIG_MAPPING[model_type]


def _cover(seq, n: int):
    """A length-n layer pattern (list or str) from `seq` in which every kind of `seq` appears: the
    first n entries, with kinds missing from them put in place of the last entries."""
    head, missing = list(seq[:n]), []
    for kind in seq:
        if kind not in head and kind not in missing:
            missing.append(kind)
    if missing:
        head[n - len(missing):] = missing[:n]
    return "".join(head) if isinstance(seq, str) else head


def _is_layer_pattern(name: str, value: Any, num_layers: int | None) -> bool:
    """A per-layer list of kinds (layer_types, mlp_layer_types, ...) or pattern string (nemotron_h's
    hybrid_override_pattern) of the default depth; not a list of layer indices (moe_layers)."""
    if not num_layers or num_layers <= LAYERS or not isinstance(value, (list, str)) or len(value) != num_layers:
        return False
    return (isinstance(value, list) or "pattern" in name) and len(set(value)) < len(value)


def _shrink(name: str, value: Any, num_layers: int | None) -> Any:
    """The tiny value of one config attribute by the generic rule (or `value` unchanged)."""
    if isinstance(value, dict):
        return {k: _shrink(k, v, num_layers) for k, v in value.items()}
    if _is_layer_pattern(name, value, num_layers):
        return _cover(value, LAYERS)
    if not isinstance(value, int) or isinstance(value, bool) or value == 0 or name in _SKIP:
        return value
    if name in TOKEN_ID_ATTRS:
        return value if value < VOCAB else VOCAB - 1
    if name in _EXACT:
        return _EXACT[name]
    for pattern, small in _PATTERNS:
        if pattern.search(name):
            return small
    if name in ("n_group", "num_expert_group", "n_groups") and value > 1:
        return 2
    if name == "topk_group" and value > 1:
        return 1
    return value


def _generic_overrides(model_type: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The generic rule applied to the family's default config (see `_shrink`): (overrides,
    fallback layer patterns).

    Values the config derives in __post_init__ from a None / "auto" field default (qk_head_dim,
    mamba_d_head, moe_layers, ...) are left for it to derive again from the tiny sizes; expert
    counts / top-k are set even then. A derived per-layer pattern (mlp_layer_types from
    first_k_dense_replace, ...) is re-derived too, and its cut-down default is the fallback for
    when the re-derived one lacks a kind of layer the default had."""
    config_cls = _config_class(model_type)
    default = config_cls()
    num_layers = vars(default).get("num_hidden_layers") or vars(default).get("n_layers")
    subs = getattr(config_cls, "sub_configs", None) or {}
    out, fallback = {}, {}
    for field in dataclasses.fields(config_cls):
        name, value = field.name, vars(default).get(field.name)  # vars: no per-layer attribute guard
        if name in ("id2label", "label2id", "rope_parameters"):
            continue
        if name in subs:  # dbrx's attn_config / ffn_config: shrink their fields too
            if dataclasses.is_dataclass(value):
                small = {f.name: _shrink(f.name, getattr(value, f.name), num_layers) for f in dataclasses.fields(value)}
                out[name] = {k: v for k, v in small.items() if v != getattr(value, k)}
            continue
        derived = field.default is None or field.default == "auto"
        if name in EXPERT_COUNT_ATTRS + TOP_K_ATTRS and value is None:
            out[name] = EXPERTS if name in EXPERT_COUNT_ATTRS else TOP_K
        elif derived and _is_layer_pattern(name, value, num_layers):
            fallback[name] = _cover(value, LAYERS)
        elif not derived:
            small = _shrink(name, value, num_layers)
            if small is not value and small != value:
                out[name] = small
        if name in TOKEN_ID_ATTRS and isinstance(value, list):
            out[name] = [t if t < VOCAB else VOCAB - 1 for t in value]
    # GQA wherever the config has a KV-head count, also when its default derives it (= MHA);
    # MLA expands keys and values per query head (kv heads = query heads).
    raw = vars(default)
    if "num_key_value_heads" in raw:
        out["num_key_value_heads"] = HEADS if raw.get("kv_lora_rank") is not None else KV_HEADS
    # MLA families point head_dim at the rotary slice (qk_rope_head_dim): keep them equal.
    if raw.get("head_dim") is not None and raw["head_dim"] == raw.get("qk_rope_head_dim"):
        out["head_dim"] = out["qk_rope_head_dim"]
    return out, fallback


def tiny_config(model_type: str, **overrides):
    """The family's default config shrunk to a tiny one (generic rule, then FAMILY_OVERRIDES,
    then `overrides`)."""
    generic, fallback = _generic_overrides(model_type)
    kwargs = {**generic, **FAMILY_OVERRIDES.get(model_type, {}), **overrides}
    try:
        config = _config_class(model_type)(**kwargs)
        lacking = {name: pattern for name, pattern in fallback.items() if name not in kwargs
                   and not set(pattern) <= set(vars(config).get(name) or ())}
        return _config_class(model_type)(**kwargs, **lacking) if lacking else config
    except Exception as exc:  # noqa: BLE001 -- any failure is a reason to report
        raise ZooBuildError(f"{model_type}: config rejected: {type(exc).__name__}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


@torch.no_grad()
def randomize_zero_init(model: nn.Module, *, seed: int = 0, scale: float = 0.1) -> list[str]:
    """Make every parameter the family initialises to a constant matter; returns their names.

    A tiny random model leaves biases, expert biases, router correction biases
    (e_score_correction_bias, also when it is a buffer), Gemma-style norm offsets and similar
    at zero, where a converter that drops them would still look exact. Every all-zero
    parameter, and every all-zero floating buffer whose name ends in `bias`, becomes
    scale·N(0, 1); every all-ones parameter (norm weights) becomes 1 + scale·N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    changed = []
    tensors = [(n, t) for n, t in model.named_parameters()]
    tensors += [(n, t) for n, t in model.named_buffers() if n.rsplit(".", 1)[-1].endswith("bias")]
    for name, t in tensors:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) * scale
        if bool((t == 0).all()):
            t.copy_(noise)
        elif bool((t == 1).all()):
            t.copy_(1 + noise)
        else:
            continue
        changed.append(name)
    return changed


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    """A tiny random-weight causal LM of the family (CPU, eval mode, zero-init parameters
    randomised); raises ZooBuildError saying why when it cannot be built."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    for impl in ("sdpa", "eager"):  # eager for a family without an SDPA path
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=impl)
            break
        except Exception as exc:  # noqa: BLE001
            error = exc
    else:
        raise ZooBuildError(f"{model_type}: model construction failed: {type(error).__name__}: "
                            f"{_first_line(error)}") from error
    randomize_zero_init(model, seed=seed)
    return model.to(dtype).eval()


# Describing a family (for bench/family_coverage.py's table) ---------------------------------

def describe(model: nn.Module) -> dict[str, str]:
    """Attention kind, router kind and expert activation of a (tiny) model, for a coverage table."""
    return {"attention": _attention_kind(model), "router": _router_kind(model),
            "experts_act": _expert_activation(model)}


def _attention_kind(model: nn.Module) -> str:
    """MLA / GQA / MQA / MHA, plus the other layer kinds a hybrid family interleaves, from the
    config (and attention experts, JetMoE's mixture of attention heads, from the modules)."""
    raw = vars(model.config)
    attn = raw.get("attn_config")
    heads = raw.get("num_attention_heads") or raw.get("n_heads")
    kv = raw.get("num_key_value_heads") or getattr(attn, "kv_n_heads", None) or heads
    if raw.get("kv_lora_rank") is not None:
        base = "MLA"
    elif kv == 1:
        base = "MQA"
    else:
        base = "GQA" if kv and heads and kv < heads else "MHA"
    kinds = set(raw.get("layer_types") or ())
    pattern = raw.get("hybrid_override_pattern")
    if pattern:
        kinds |= {{"M": "mamba", "*": "full_attention", "-": "mlp", "E": "moe"}.get(c, c) for c in pattern}
    if raw.get("attn_layer_period"):  # jamba
        kinds |= {"mamba", "full_attention"}
    other = sorted(k for k in kinds if re.search(r"linear|mamba|conv|delta|lightning", str(k)))
    extras = [f"hybrid: {'+'.join(other)}"] if other else []
    plain = r"^(full_|sliding_|chunked_)?attention$|^mlp$|^moe$"
    unusual = sorted(k for k in kinds - set(other) if not re.search(plain, str(k)))
    if unusual:
        extras.append(f"layer kinds: {'+'.join(unusual)}")
    if any("sliding" in str(k) for k in kinds) or (raw.get("sliding_window") and not other and not kinds):
        extras.append("SWA")
    if any("sparse" in str(k) for k in kinds) or raw.get("index_topk") or raw.get("indexer_budget"):
        extras.append("sparse indexer")
    if any("attention.experts" in n or "attn.experts" in n for n, _ in model.named_modules()):
        extras.append("attention experts")
    return base + (f" ({', '.join(extras)})" if extras else "")


def _router_kind(model: nn.Module) -> str:
    """softmax / sigmoid / other scoring, plus grouping, correction bias and router bias.

    Config attributes first (scoring_func, expert_selection_fn, topk_method); otherwise the one
    scoring function called in the source of the first MoE block's router module, else of the
    block, else of its other children (a heuristic for the table; the converter's own matcher
    is the authority)."""
    raw = vars(model.config)
    scoring = raw.get("scoring_func") or raw.get("expert_selection_fn")
    if scoring is None and raw.get("topk_method") == "noaux_tc":
        scoring = "sigmoid"
    block = _first_moe_block(model)
    kids = dict(block.named_children()) if block is not None else {}
    routers = [m for n, m in kids.items() if _is_router_name(n)]
    if scoring is None and block is not None:
        for module in routers[:1] + [block] + [m for m in kids.values() if m not in routers[:1]]:
            found = _scoring_calls(module)
            if len(found) == 1:
                scoring = found.pop()
                break
    flags = []
    if (raw.get("n_group") or raw.get("num_expert_group") or 1) > 1:
        flags.append("grouped")
    names = [n for n, _ in list(model.named_parameters()) + list(model.named_buffers())]
    if any(re.search(r"e_score_correction_bias|expert_bias", n) for n in names):
        flags.append("bias-corrected")
    if any(getattr(m, "bias", None) is not None for m in routers):
        flags.append("router bias")
    return str(scoring or "other") + (f" ({', '.join(flags)})" if flags else "")


def _scoring_calls(module) -> set[str]:
    """{'sigmoid', 'softmax'} called in the module's class source (comments dropped)."""
    try:
        source = inspect.getsource(type(module))
    except (OSError, TypeError):
        return set()
    code = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
    return set(re.findall(r"\b(sigmoid|softmax)\s*\(", code))


def _is_router_name(name: str) -> bool:
    return name in ("gate", "router", "router_gate")


def _first_moe_block(model):
    """The first module with a router child (gate / router) and an experts child."""
    for _, module in model.named_modules():
        kids = dict(module.named_children())
        if any(_is_router_name(n) for n in kids) and any(
                "expert" in n.lower() or "Expert" in type(c).__name__ for n, c in kids.items()):
            return module
    return None


def _expert_activation(model: nn.Module) -> str:
    """The config's activation, and the clamp of a clamped GLU (gpt_oss, deepseek_v4)."""
    raw = vars(model.config)
    ffn = raw.get("ffn_config")
    act = (raw.get("hidden_act") or raw.get("hidden_activation") or raw.get("mlp_hidden_act")
           or raw.get("activation_function")
           or (getattr(ffn, "ffn_act_fn", None) or {}).get("name") or "?")
    block = _first_moe_block(model)
    experts = getattr(block, "experts", None)
    if act == "?" and getattr(experts, "act_fn", None) is not None:  # hard-coded in the modeling file
        act = getattr(experts.act_fn, "__name__", type(experts.act_fn).__name__)
    limit = raw.get("swiglu_limit") or getattr(experts, "limit", None) or getattr(experts, "swiglu_limit", None)
    if limit:
        alpha = getattr(experts, "alpha", None)
        act += f" (clamped GLU, limit {limit}" + (f", alpha {alpha}" if alpha else "") + ")"
    return str(act)
