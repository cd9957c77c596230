"""Compiled converted model vs the eager source model, on CPU (issue 3's benchmark).

A small Qwen3-MoE config at T in {1, 64, 512} tokens: median latency of the eager source,
the eager converted model (foe:: ops, C++ kernels when built), and torch.compile(backend="foe")
of the converted model; compile time reported separately. Writes bench/results/compile_cpu.json.
Run: python bench/compile_cpu.py [--tokens 1 64 512] [--repeats 10]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import torch

from foe_compile import builtin_model, convert
from foe_compile.kernels import dispatch

SHAPE = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
             moe_intermediate_size=256, num_experts=32, num_experts_per_tok=4, vocab_size=4096,
             intermediate_size=1024)


def median_ms(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--mode", choices=["exact", "foe"], default="exact")
    parser.add_argument("--out", default="bench/results/compile_cpu.json")
    args = parser.parse_args()
    source = builtin_model("qwen3-30b-a3b", device="cpu", **SHAPE)
    converted, _ = convert(builtin_model("qwen3-30b-a3b", device="cpu", **SHAPE), mode=args.mode)
    compiled = torch.compile(converted, backend="foe", fullgraph=True, dynamic=False)
    rows = []
    print(f"threads={torch.get_num_threads()} kernels: {dispatch.choose('sum_route_dispatch', torch.device('cpu'))}")
    print(f"{'T':>5} {'source eager':>13} {'converted eager':>16} {'compiled':>9} {'speedup':>8} {'compile s':>10}")
    for T in args.tokens:
        ids = torch.randint(0, SHAPE["vocab_size"], (1, T))
        start = time.perf_counter()
        compiled(ids, use_cache=False)
        compile_s = time.perf_counter() - start
        row = {
            "T": T,
            "source_eager_ms": median_ms(lambda: source(ids, use_cache=False), args.repeats),
            "converted_eager_ms": median_ms(lambda: converted(ids, use_cache=False), args.repeats),
            "compiled_ms": median_ms(lambda: compiled(ids, use_cache=False), args.repeats),
            "compile_s": compile_s,
        }
        row["speedup_vs_source"] = row["source_eager_ms"] / row["compiled_ms"]
        rows.append(row)
        print(f"{T:>5} {row['source_eager_ms']:>11.2f}ms {row['converted_eager_ms']:>14.2f}ms "
              f"{row['compiled_ms']:>7.2f}ms {row['speedup_vs_source']:>7.2f}x {compile_s:>10.1f}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.machine(), "threads": torch.get_num_threads(), "commit": commit,
                   "mode": args.mode, "shape": SHAPE, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
