"""Conversion wall time and peak extra memory for a ~1B-parameter random-weight MoE on CPU.

Goal (issue 2): peak extra memory below 10% of the model's size, because conversion makes
views of the source weights instead of copies. Run: python bench/convert_memory.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import torch

from foe_compile import builtin_model, convert

# ~1.0B parameters in the Qwen3-MoE family (d=1024, 16 layers, 64 experts of width 256, k=8).
SHAPE = dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
             moe_intermediate_size=256, num_experts=64, num_experts_per_tok=8, vocab_size=32000,
             intermediate_size=2048)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (Linux >= 4.0)
        f.write("5")


def make_model(dtype: torch.dtype):
    model = builtin_model("qwen3-30b-a3b", device="meta", dtype=dtype, **SHAPE)  # shape only
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def measure(assignment: str, dtype: torch.dtype) -> dict:
    model = make_model(dtype)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    calib = torch.randint(0, SHAPE["vocab_size"], (1, 64)) if assignment == "calibrated" else None
    before = rss()
    reset_peak()
    start = time.perf_counter()
    model, report = convert(model, expert_assignment=assignment, calibration_inputs=calib)
    seconds = time.perf_counter() - start
    extra = peak_rss() - before
    return {
        "assignment": assignment, "dtype": str(dtype).removeprefix("torch."),
        "params": sum(p.numel() for p in model.parameters()), "model_bytes": size,
        "convert_seconds": round(seconds, 3), "peak_extra_bytes": extra, "peak_extra_fraction": extra / size,
        "groups": report.num_groups,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default="bench/results/convert_memory.json")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    # Calibrated assignment permutes (copies) the experts it moves: shown for contrast.
    rows = [measure("contiguous", dtype), measure("calibrated", dtype)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"{'assignment':>11} {'params':>8} {'model':>9} {'convert':>8} {'peak extra':>11} {'fraction':>8}")
    for r in rows:
        print(f"{r['assignment']:>11} {r['params'] / 1e9:7.2f}B {r['model_bytes'] / 2**30:7.2f}GiB "
              f"{r['convert_seconds']:7.2f}s {r['peak_extra_bytes'] / 2**20:8.1f}MiB {r['peak_extra_fraction']:8.2%}")
    status = "meets" if rows[0]["peak_extra_fraction"] < 0.10 else "MISSES"
    print(f"goal (contiguous, zero-copy): peak extra memory < 10% of the model size: {status}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "commit": commit, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
