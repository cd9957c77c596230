"""Every collective of the distributed runtimes goes through `Comm`, which counts it.

Counted per (layer, kind): calls, *logical* bytes sent by this rank, and wall time.

Logical bytes follow the algorithm the runtime assumes, not what a backend happens to do:
- all-reduce = ring reduce-scatter + all-gather: each rank sends 2(n-1)/n of the tensor
  (n ranks), the volume `comm.all_reduce_volume` prices. gloo picks its own algorithm
  (ring, halving-doubling or bcube by size) and NCCL ring or tree; the wire bytes of those
  differ by small factors, the logical count does not, so counts compare across backends.
- all-to-all: the rows sent to *other* ranks (the rows a rank keeps are free), exactly.
- the split sizes exchanged before an uneven all-to-all are counted under their own kind
  ("<kind>_counts"), as are the expert ids sent beside the rows, so payload volumes match
  the formulas and the metadata stays visible.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

FINAL = -1  # layer index for collectives after the last layer (FoE's final mean over groups)


class CollectiveError(RuntimeError):
    """A collective failed on this rank: a peer raised, died or missed the timeout."""


@dataclass
class Stat:
    calls: int = 0
    bytes: float = 0.0
    seconds: float = 0.0


class Ledger:
    """Counts per (layer, kind); `rows()` flattens them for reports and JSON."""

    def __init__(self) -> None:
        self.stats: dict[tuple[int, str], Stat] = defaultdict(Stat)

    def add(self, layer: int, kind: str, nbytes: float, seconds: float) -> None:
        s = self.stats[(layer, kind)]
        s.calls += 1
        s.bytes += nbytes
        s.seconds += seconds

    def reset(self) -> None:
        self.stats.clear()

    def bytes(self, layer: int | None = None, kinds: tuple[str, ...] | None = None) -> float:
        return sum(s.bytes for (lay, k), s in self.stats.items()
                   if (layer is None or lay == layer) and (kinds is None or k in kinds))

    def calls(self, layer: int | None = None, kinds: tuple[str, ...] | None = None) -> int:
        return sum(s.calls for (lay, k), s in self.stats.items()
                   if (layer is None or lay == layer) and (kinds is None or k in kinds))

    def rows(self) -> list[dict]:
        return [dict(layer=lay, kind=k, calls=s.calls, bytes=s.bytes, seconds=s.seconds)
                for (lay, k), s in sorted(self.stats.items())]

    def __iter__(self) -> Iterator[tuple[tuple[int, str], Stat]]:
        return iter(sorted(self.stats.items()))


def ring_all_reduce_bytes(numel: int, element_size: int, ranks: int) -> float:
    """Bytes one rank sends in a ring all-reduce: 2(n-1)/n of the tensor."""
    return 2.0 * (ranks - 1) / ranks * numel * element_size


class Comm:
    """A process group plus the ledger its collectives are counted in.

    Wraps failures (peer exceptions, dead peers, timeouts) in CollectiveError naming this
    rank, the layer and the collective, so every rank reports where it stopped.
    """

    def __init__(self, group: dist.ProcessGroup, ledger: Ledger, name: str, timeout_s: float | None = None) -> None:
        self.group, self.ledger, self.name, self.timeout_s = group, ledger, name, timeout_s
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_reduce(self, tensor: Tensor, *, layer: int, kind: str) -> Tensor:
        """In-place sum over the group; returns `tensor`. A one-rank group is a no-op (0 bytes)."""
        if self.size == 1:
            return tensor
        nbytes = ring_all_reduce_bytes(tensor.numel(), tensor.element_size(), self.size)
        self._run(lambda: dist.all_reduce(tensor, group=self.group), layer, kind, nbytes, tensor)
        return tensor

    def exchange_counts(self, send_counts: Tensor, *, layer: int, kind: str) -> Tensor:
        """send_counts [n] int64 (rows for each rank) -> recv_counts [n] (rows from each rank)."""
        recv = torch.empty_like(send_counts)
        nbytes = (self.size - 1) * send_counts.element_size()
        self._run(lambda: dist.all_to_all_single(recv, send_counts, group=self.group),
                  layer, f"{kind}_counts", nbytes, send_counts)
        return recv

    def all_to_all(self, rows: Tensor, send_counts: list[int], recv_counts: list[int], *, layer: int,
                   kind: str) -> Tensor:
        """Uneven all_to_all_single over dim 0: rows [sum(send_counts), ...] -> [sum(recv_counts), ...]."""
        out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
        row_bytes = rows[0:1].numel() * rows.element_size() if rows.dim() > 1 else rows.element_size()
        sent = sum(c for j, c in enumerate(send_counts) if j != self.rank)
        self._run(lambda: dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts, group=self.group),
                  layer, kind, sent * row_bytes, rows)
        return out

    def _run(self, op, layer: int, kind: str, nbytes: float, like: Tensor) -> None:
        cuda = like.is_cuda
        if cuda:
            torch.cuda.synchronize(like.device)
        start = time.perf_counter()
        try:
            op()
            if cuda:
                torch.cuda.synchronize(like.device)
        except Exception as err:  # backend errors differ by backend and version
            where = "after the last layer" if layer == FINAL else f"in layer {layer}"
            limit = f" within the {self.timeout_s:g} s timeout" if self.timeout_s else ""
            raise CollectiveError(
                f"rank {dist.get_rank()}: {kind} ({self.name}, {self.size} ranks) {where} failed: a peer rank "
                f"raised, exited or did not arrive{limit}. Check the other ranks' errors. Backend said: {err}"
            ) from err
        self.ledger.add(layer, kind, nbytes, time.perf_counter() - start)
