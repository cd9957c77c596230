"""FoE vs EP vs exact on CPU gloo ranks spawned here: per-layer counted bytes and times, as JSON.

Run: python bench/distributed_bench.py --world-size 2 --model olmoe-tiny --tokens 64
(on GPUs use torchrun: `torchrun --nproc-per-node G -m foe_compile.cli distributed-bench`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess

from foe_compile.distributed.bench import format_report, run_bench
from foe_compile.distributed.launch import spawn

import torch


def _rank(rank: int, world_size: int, args: dict) -> dict:
    return run_bench(args["model"], args["tokens"], args["batch"] or world_size, args["groups"], args["repeats"],
                     args["seed"], torch.device("cpu"), timeout_s=args["timeout"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--model", default="olmoe-tiny")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--groups", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "distributed_bench.json"))
    args = parser.parse_args()
    results = spawn(_rank, args.world_size, vars(args), timeout_s=300, collective_timeout_s=args.timeout)
    failed = [r for r in results if not r.ok]
    if failed:
        for r in failed:
            print(f"rank {r.rank}: {r.error}")
        return 1
    report = results[0].value
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report.update(commit=commit, machine=platform.machine(), torch=torch.__version__)
    print(format_report(report))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
