"""foe::experts_swiglu implementations vs transformers' grouped_mm path, per layer shape and T."""
from __future__ import annotations

import pytest

import cases
from conftest import CPU_MODE, GRAPH_TOKENS, check_close

IMPLS = ("triton", "native", "cupy", "reference", "grouped_mm")


@pytest.mark.parametrize("impl", IMPLS)
def test_experts(bench, layer, T, impl, graph):
    if graph and T not in GRAPH_TOKENS:
        pytest.skip("CUDA-graph rows are for decode sizes")
    if CPU_MODE and impl == "triton" and T > 8:
        pytest.skip("the Triton interpreter is too slow past T = 8")
    impls = cases.experts_impls(layer, T)
    if impl not in impls:
        pytest.skip(f"{impl} is not available here")
    fn = impls[impl]
    baseline = impls.get("grouped_mm") or impls.get("reference")
    if baseline is not None and baseline is not fn and not graph:
        check_close(fn(), baseline(), f"experts {impl} vs baseline")
    x = cases.inputs(layer, T)["x"]
    nbytes = layer.expert_bytes(cases.touched(layer, T)) + x.numel() * (1 + layer.H) * layer.itemsize
    flops = layer.experts_flops(T)
    bench("experts", layer, T, impl, fn, graph, nbytes, flops, layer.expert_bytes(layer.expected_touched(T)), flops)
