"""Session-wide test setup that must run before anything imports Triton."""
import os

import torch

# Triton's CPU interpreter is chosen when `triton` is first imported (its own tl.* helpers are
# built then), so it must be set before foe_compile (which imports Triton when installed) loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# NOTE: on the 2-core CI machine, one intra-op thread keeps the suite fast when anything else
# runs beside it (placement tests: 3 min 48 s at 2 threads under load, 20 s at 1).
torch.set_num_threads(1)
