"""pytest-benchmark suite setup: mode, parametrisation, ceilings, timing and the result rows.

GPU mode (default when CUDA is present): DESIGN.md's layers x T in {1, 8, 64, 512, 4096}, bf16.
CPU mode (`--cpu`, FOE_BENCH_CPU=1, or no CUDA): a tiny layer at T in {1, 8, 64}, fp32, one
thread, Triton through its interpreter (T <= 8 only); for CI, under a minute. Rows go to bench/results/ (or --bench-out /
$FOE_BENCH_OUT) as CSV/JSON plus a PNG, and a short table is printed at the end.

Timing: pytest-benchmark's pedantic mode with a clock that synchronises the GPU, so a round is
[sync, `iterations` back-to-back calls, sync] and the per-call median includes the launch
overhead an eager caller pays. CUDA-graph rows time `graph.replay()` the same way.
"""
from __future__ import annotations

import os
import sys
import time

import pytest
import torch

CPU_MODE = ("--cpu" in sys.argv or os.environ.get("FOE_BENCH_CPU") == "1" or not torch.cuda.is_available())
if CPU_MODE:  # must precede the first import of Triton (foe_compile imports it)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # NOTE: on a shared 2-core CI box two OpenMP threads measured 600x slower (0.7 ms -> 620 ms for
    # the tiny reference experts) than one: CPU rows use FOE_BENCH_THREADS threads, default 1.
    torch.set_num_threads(int(os.environ.get("FOE_BENCH_THREADS", "1")))

import cases  # noqa: E402  (bench/ is on sys.path: pytest's rootdir-less import mode)
import report  # noqa: E402

DEVICE = "cpu" if CPU_MODE else "cuda"
DTYPE = torch.float32 if CPU_MODE else torch.bfloat16
GROUPS = int(os.environ.get("FOE_BENCH_GROUPS", "1"))
ROUND_S = 2e-3  # target time of one round (sets `iterations`)
ROUNDS = 7 if not CPU_MODE else 3
GRAPH_TOKENS = (1, 8)
_rows: list[dict] = []
_ceilings: dict[str, float] = {}


def pytest_addoption(parser):
    parser.addoption("--cpu", action="store_true", help="tiny fp32 CPU benchmarks (also FOE_BENCH_CPU=1)")
    parser.addoption("--bench-out", default=os.environ.get("FOE_BENCH_OUT", "bench/results"),
                     help="folder for the CSV/JSON/PNG results")


def synced_clock() -> float:
    if not CPU_MODE:
        torch.cuda.synchronize()
    return time.perf_counter()


def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.hasplugin("benchmark"):
        for item in items:
            item.add_marker(pytest.mark.benchmark(timer=synced_clock, group=item.originalname))


class _Stats:
    def __init__(self, times: list[float]):
        self.median = sorted(times)[len(times) // 2]


class _Benchmark:
    """Stand-in for pytest-benchmark's fixture where the plugin is missing (an offline GPU box):
    the part this suite uses, pedantic() with the same synced clock, stats.stats.median, extra_info."""

    def __init__(self):
        self.extra_info: dict = {}
        self.stats = None

    def pedantic(self, fn, rounds: int, iterations: int, warmup_rounds: int = 0):
        times = []
        for r in range(warmup_rounds + rounds):
            start = synced_clock()
            for _ in range(iterations):
                fn()
            if r >= warmup_rounds:
                times.append((synced_clock() - start) / iterations)
        self.stats = type("Metadata", (), {"stats": _Stats(times)})()


def layers() -> list[cases.Layer]:
    shapes = cases.CPU_LAYERS if CPU_MODE else cases.GPU_LAYERS
    return [cases.Layer(name, *shape, GROUPS, DTYPE, DEVICE) for name, shape in shapes.items()]


def pytest_generate_tests(metafunc):
    if "layer" in metafunc.fixturenames:
        tokens = cases.CPU_TOKENS if CPU_MODE else cases.GPU_TOKENS
        params = [(layer, T) for layer in layers() for T in tokens]
        metafunc.parametrize("layer,T", params, ids=[f"{lay.name}-T{T}" for lay, T in params])
    if "graph" in metafunc.fixturenames:
        metafunc.parametrize("graph", [False] if CPU_MODE else [False, True], ids=lambda g: "graph" if g else "eager")


@pytest.fixture(scope="session")
def ceilings() -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and dense GEMM FLOP/s, measured now."""
    n, size = (1024, 1 << 24) if CPU_MODE else (8192, 1 << 30)
    src = torch.empty(size // DTYPE.itemsize, dtype=DTYPE, device=DEVICE)
    dst = torch.empty_like(src)
    a, b = (torch.randn(n, n, device=DEVICE).to(DTYPE) for _ in range(2))
    copy_s = _median_time(lambda: dst.copy_(src))
    gemm_s = _median_time(lambda: a @ b)
    _ceilings.update(copy_GBps=2 * size / copy_s / 1e9, gemm_TFLOPs=2 * n ** 3 / gemm_s / 1e12)
    return _ceilings


def _median_time(fn, reps: int = 10) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = synced_clock()
        fn()
        times.append(synced_clock() - start)
    return sorted(times)[len(times) // 2]


def graphed(fn):
    """(replay, output) of `fn` captured in a CUDA graph; pytest.skip when it cannot be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except RuntimeError as err:
        torch.cuda.synchronize()
        pytest.skip(f"not capturable in a CUDA graph: {str(err).splitlines()[0]}")
    return graph.replay, out


def first(out):
    return out[0] if isinstance(out, tuple) else out


def check_close(out, ref, what: str) -> None:
    """One correctness check per row before timing: bf16 3e-2 / fp32 1e-4 against the baseline."""
    out, ref = first(out).float(), first(ref).float()
    if out.dim() == 3 and ref.dim() == 2:  # [H, T, d] group outputs vs the transformers [T, d]
        out = out.sum(0)
    tol = 1e-4 if DTYPE == torch.float32 else 3e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


@pytest.fixture
def bench(ceilings, request):
    """bench(op, layer, T, impl, fn, graph, bytes, flops, floor_bytes, floor_flops) -> median s."""
    plugin = request.config.pluginmanager.hasplugin("benchmark")

    def run(op, layer, T, impl, fn, graph, nbytes, flops, floor_bytes, floor_flops):
        benchmark = request.getfixturevalue("benchmark") if plugin else _Benchmark()
        if graph:
            fn, _ = graphed(fn)
        fn()
        start = synced_clock()
        fn()
        once = max(synced_clock() - start, 1e-7)
        iterations = max(1, min(100, int(ROUND_S / once)))
        benchmark.pedantic(fn, rounds=ROUNDS, iterations=iterations, warmup_rounds=1)
        median = benchmark.stats.stats.median
        bw, rate = ceilings["copy_GBps"] * 1e9, ceilings["gemm_TFLOPs"] * 1e12
        row = dict(op=op, layer=layer.name, d=layer.d, I=layer.I, E=layer.E, k=layer.k, H=layer.H, T=T, impl=impl,
                   graph=graph, dtype=str(DTYPE).removeprefix("torch."), median_ms=median * 1e3,
                   GBps=nbytes / median / 1e9, TFLOPs=flops / median / 1e12,
                   frac_bw=nbytes / median / bw, frac_gemm=flops / median / rate,
                   floor_ms=max(floor_bytes / bw, floor_flops / rate) * 1e3, rounds=ROUNDS, iterations=iterations)
        benchmark.extra_info.update(row)
        _rows.append(row)
        return median

    return run


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _rows:
        return
    meta = dict(report.machine_meta(DEVICE, DTYPE), auto_backends=cases.backend_names(), ceilings=_ceilings,
                groups=GROUPS, mode="cpu" if CPU_MODE else "gpu", launch_configs=cases.config_sources(layers()))
    paths = report.write(_rows, meta, config.getoption("--bench-out"), meta["mode"])
    for line in report.summary(_rows, meta).splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line("results: " + ", ".join(map(str, paths)))
