"""Starting ranks: under torchrun (`init_from_env`), or spawned here (`spawn`, tests and bench).

Both set a bounded collective timeout, so a rank that fails or stalls makes its peers raise
(CollectiveError, accounting.py) instead of hanging.
"""
from __future__ import annotations

import math
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 60.0


def check_seconds(value: float, name: str) -> float:
    """A timeout in seconds: a finite number > 0, or ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...); NCCL with one
    GPU per local rank when CUDA is available, else gloo on CPU. Returns this rank's device."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("RANK/WORLD_SIZE are not set: launch with torchrun, e.g. "
                         "`torchrun --nproc-per-node 2 -m foe_compile.cli distributed-bench`")
    check_seconds(timeout_s, "timeout_s")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
    return device


@dataclass
class RankResult:
    rank: int
    value: Any = None
    error: str | None = None  # "ExceptionType: message" (plus traceback in `trace`)
    trace: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 60.0,
          collective_timeout_s: float = 20.0, threads: int = 1) -> list[RankResult]:
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks (CPU processes); one RankResult
    per rank, in rank order. `fn` must be importable (module level); its value must pickle.
    A rank that has not reported after `timeout_s` is killed and reported as timed out."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    check_seconds(timeout_s, "timeout_s")
    check_seconds(collective_timeout_s, "collective_timeout_s")
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'store')}"
        procs = [ctx.Process(target=_run_rank, args=(fn, rank, world_size, init, collective_timeout_s, threads,
                                                     results, args), daemon=True) for rank in range(world_size)]
        for p in procs:
            p.start()
        got: dict[int, RankResult] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < world_size:
            try:
                r = results.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                got[r.rank] = r
            except queue.Empty:
                if time.monotonic() > deadline:
                    break
                dead = [i for i, p in enumerate(procs) if i not in got and p.exitcode not in (None, 0)]
                for i in dead:  # died without reporting (segfault, killed)
                    got[i] = RankResult(i, error=f"process exited with code {procs[i].exitcode} without reporting")
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [got.get(r, RankResult(r, error=f"TimeoutError: rank {r} did not finish within {timeout_s:g} s"))
            for r in range(world_size)]


def _run_rank(fn, rank, world_size, init, collective_timeout_s, threads, results, args) -> None:
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout_s))
        results.put(RankResult(rank, value=fn(rank, world_size, *args)))
    except BaseException as err:  # report everything, then exit: peers see the closed connection
        results.put(RankResult(rank, error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()))
        return
    dist.destroy_process_group()
