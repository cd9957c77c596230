"""foe:: custom ops (torch.library) and their kernels; see ops.py and dispatch.py."""
from . import ops  # noqa: F401  defines the foe:: ops (schema, fake, reference, autograd)
from . import native  # noqa: F401  registers the "native" backend when foe_compile._C is built
from . import cupy_runtime  # noqa: F401  registers the "cupy" backend when CuPy is installed
from . import triton_experts  # noqa: F401  registers the "triton" backend where Triton can launch
from .dispatch import BACKENDS, available, use_backend

__all__ = ["BACKENDS", "available", "use_backend"]
