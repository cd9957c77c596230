import copy

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
