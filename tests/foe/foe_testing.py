import copy

import pytest
import torch

# Declared tolerances (fp32). Exact mode differs from the source only by summation order.
EXACT_MAX_REL = 1e-5


def fresh_copy(model):
    return copy.deepcopy(model)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def tokens(batch: int, length: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def gpu_backend_params(backends, extra_reason=None):
    """pytest params for the GPU backends, marked gpu, each skipped with the reason it cannot run here.

    extra_reason(backend) may give one more reason (or None), checked after the common ones."""
    from foe_compile.kernels import cupy_runtime, native

    out = []
    for backend in backends:
        reason = None
        if not torch.cuda.is_available():
            reason = "needs a CUDA device"
        elif backend == "native" and not native.has_cuda():
            reason = "foe_compile._C built without CUDA"
        elif backend == "cupy" and cupy_runtime.UNAVAILABLE_REASON is not None:
            reason = cupy_runtime.UNAVAILABLE_REASON
        elif extra_reason is not None:
            reason = extra_reason(backend)
        marks = [pytest.mark.gpu] + ([pytest.mark.skip(reason=reason)] if reason else [])
        out.append(pytest.param(backend, id=backend, marks=marks))
    return out
