"""Launch configurations of the Triton experts kernels, as JSON data (STYLE rule 10).

One file per (layer shape, dtype, device): `config_filename()` is the ONE naming function,
shared by the tuner (`bench/tune_experts.py`, which writes files) and the runtime
(`get_config()`, which reads them). A file maps token counts T to one launch configuration:

    {"untuned": true, "note": "...",
     "configs": {"1":   {"BLOCK_M": 16, "gate_up": {...}, "down": {...}},
                 "512": {...}}}

with per-GEMM entries {"BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}. BLOCK_M is
shared because both GEMMs walk the same padded block schedule. The runtime uses the entry whose
T key is nearest to the actual T (ties go to the smaller key), as vLLM does.

Search order: the directory in $FOE_CONFIG_DIR (if set; the tuner's output), then the shipped
`configs/` next to this file. Fallback when no file matches: `default_config()`, a documented
rule on the average number of rows per expert, m = T*k/E (decode-like m <= 16 takes 16-row
blocks and narrow N tiles so that enough programs stream weights; large m takes 64/128-row tiles).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).with_name("configs")
GEMMS = ("gate_up", "down")
GEMM_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def device_name(device: torch.device) -> str:
    """File-name form of the device: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3'; CPU -> 'cpu'."""
    if device.type != "cuda":
        return device.type
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index).replace(" ", "_").replace("/", "_")


def config_filename(E: int, I: int, d: int, dtype: torch.dtype, device: str) -> str:
    """The one naming function: 'E=128,I=768,d=2048,dtype=bfloat16,device=NVIDIA_H200.json'."""
    return f"E={E},I={I},d={d},dtype={str(dtype).removeprefix('torch.')},device={device}.json"


def _search_dirs() -> list[Path]:
    extra = os.environ.get("FOE_CONFIG_DIR")
    return ([Path(extra)] if extra else []) + [CONFIG_DIR]


@functools.lru_cache(maxsize=256)
def _load(name: str, dirs: tuple[Path, ...]) -> dict[int, dict[str, Any]] | None:
    for folder in dirs:
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            return {int(t): validate(cfg) for t, cfg in data["configs"].items()}
    return None


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check one configuration's keys and power-of-two block sizes; return it unchanged."""
    blocks = [cfg["BLOCK_M"]] + [cfg[g][key] for g in GEMMS for key in ("BLOCK_N", "BLOCK_K")]
    if any(b < 16 or b & (b - 1) for b in blocks):
        raise ValueError(f"launch config block sizes must be powers of two >= 16, got {cfg}")
    for g in GEMMS:
        missing = set(GEMM_KEYS) - set(cfg[g])
        if missing:
            raise ValueError(f"launch config {g!r} entry lacks {sorted(missing)}: {cfg}")
    return cfg


def _gemm(n: int, k: int, group_m: int, warps: int, stages: int) -> dict[str, int]:
    return {"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": group_m, "num_warps": warps, "num_stages": stages}


def default_config(T: int, E: int, k: int) -> dict[str, Any]:
    """Fallback rule on m = T*k/E rows per expert (hand-chosen, not tuned):
    m <= 16: BLOCK_M 16, N tiles 32 (gate_up, two accumulators) / 64 (down), K 128, 4 stages;
    m <= 64: BLOCK_M 32, N 64, K 64; otherwise BLOCK_M 64 (128 when m >= 512), N 128, K 64, GROUP_M 8."""
    m = T * k / max(E, 1)
    if m <= 16:
        return {"BLOCK_M": 16, "gate_up": _gemm(32, 128, 1, 4, 4), "down": _gemm(64, 128, 1, 4, 4)}
    if m <= 64:
        return {"BLOCK_M": 32, "gate_up": _gemm(64, 64, 4, 4, 4), "down": _gemm(64, 64, 4, 4, 4)}
    block_m = 128 if m >= 512 else 64
    return {"BLOCK_M": block_m, "gate_up": _gemm(64 if block_m == 128 else 128, 64, 8, 8, 3),
            "down": _gemm(128, 64, 8, 8, 3)}


def get_config(E: int, I: int, d: int, k: int, T: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """The launch configuration for this call: nearest-T entry of the matching file, else the rule."""
    table = _load(config_filename(E, I, d, dtype, device_name(device)), tuple(_search_dirs()))
    if not table:
        return default_config(T, E, k)
    return table[min(table, key=lambda key: (abs(key - T), key))]


def write_configs(path: Path, configs: dict[int, dict[str, Any]], untuned: bool, note: str) -> None:
    """Write one config file (used by the tuner); keys sorted by T."""
    data = {"untuned": untuned, "note": note,
            "configs": {str(t): validate(configs[t]) for t in sorted(configs)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    _load.cache_clear()
