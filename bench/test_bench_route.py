"""foe::sum_route_dispatch implementations (reference = plain PyTorch ops), per layer shape and T."""
from __future__ import annotations

import pytest

import cases
from conftest import GRAPH_TOKENS, check_close

IMPLS = ("reference", "native", "cupy", "triton")


@pytest.mark.parametrize("impl", IMPLS)
def test_route(bench, layer, T, impl, graph):
    if graph and (T not in GRAPH_TOKENS or impl == "reference"):
        pytest.skip("CUDA-graph rows are for decode sizes; the reference route syncs (bincount)")
    impls = cases.route_impls(layer, T)
    if impl not in impls:
        pytest.skip(f"{impl} is not available here")
    if impl != "reference" and not graph:
        check_close(impls[impl]()[1], impls["reference"]()[1], f"route {impl} xn vs reference")
    nbytes, flops = layer.route_bytes(T), layer.route_flops(T)
    bench("route", layer, T, impl, impls[impl], graph, nbytes, flops, nbytes, flops)
