"""Session-wide test setup that must run before anything imports Triton."""
import os

import torch

# Triton's CPU interpreter is chosen when `triton` is first imported (its own tl.* helpers are
# built then), so it must be set before foe_compile (which imports Triton when installed) loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
