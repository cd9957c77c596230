"""Parameters that are views of the source model's weights (zero-copy conversion)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def view_parameter(tensor: Tensor) -> nn.Parameter:
    """A Parameter sharing storage with `tensor` (a slice of a source weight): no copy."""
    return nn.Parameter(tensor, requires_grad=tensor.requires_grad)


class LinearSlice(nn.Module):
    """y = x W[rows or cols]^T + b: a linear layer over a slice of a source nn.Linear."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.weight = view_parameter(weight)  # [out, in] view
        self.bias = view_parameter(bias) if bias is not None else None

    @classmethod
    def rows(cls, linear: nn.Linear, start: int, stop: int) -> LinearSlice:
        """Output features [start, stop) of `linear` (a column-parallel shard)."""
        bias = linear.bias[start:stop] if linear.bias is not None else None
        return cls(linear.weight[start:stop], bias)

    @classmethod
    def cols(cls, linear: nn.Linear, start: int, stop: int, with_bias: bool) -> LinearSlice:
        """Input features [start, stop) of `linear` (a row-parallel shard); bias only if asked."""
        bias = linear.bias if (with_bias and linear.bias is not None) else None
        return cls(linear.weight[:, start:stop], bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, bias={self.bias is not None}"
