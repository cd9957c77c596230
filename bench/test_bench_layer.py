"""One MoE layer (route + experts): the foe:: ops vs the transformers router + grouped_mm experts."""
from __future__ import annotations

import pytest
import torch

import cases
from conftest import CPU_MODE, GRAPH_TOKENS, check_close
from foe_compile.kernels import dispatch

IMPLS = ("foe", "foe-triton", "grouped_mm")


@pytest.mark.parametrize("impl", IMPLS)
def test_layer(bench, layer, T, impl, graph):
    if graph and T not in GRAPH_TOKENS:
        pytest.skip("CUDA-graph rows are for decode sizes")
    if graph and impl.startswith("foe") and dispatch.choose("sum_route_dispatch", torch.device("cuda")) == "reference":
        pytest.skip("the route backend here is the reference, which syncs (bincount)")
    if CPU_MODE and impl == "foe-triton" and T > 8:
        pytest.skip("the Triton interpreter is too slow past T = 8")
    impls = cases.layer_impls(layer, T)
    if impl not in impls:
        pytest.skip(f"{impl} is not available here")
    exact_route = CPU_MODE or dispatch.choose("sum_route_dispatch", torch.device("cuda")) == "reference"
    if impl != "grouped_mm" and "grouped_mm" in impls and not graph and exact_route:  # bf16 ties may pick otherwise
        check_close(impls[impl](), impls["grouped_mm"](), f"layer {impl} vs grouped_mm")
    x = cases.inputs(layer, T)["x"]
    nbytes = (layer.expert_bytes(cases.touched(layer, T)) + layer.route_bytes(T)
              + x.numel() * layer.H * layer.itemsize)
    flops = layer.experts_flops(T) + layer.route_flops(T)
    floor_bytes = layer.expert_bytes(layer.expected_touched(T)) + layer.route_bytes(T)
    bench("layer", layer, T, impl, impls[impl], graph, nbytes, flops, floor_bytes, flops)
