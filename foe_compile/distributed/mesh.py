"""Where FoE groups live: which ranks hold which groups, and the process groups between them.

G ranks, H groups, `gpus_per_node` ranks per node (ranks numbered node-major, as torchrun does).
- G <= H: rank r holds the H/G consecutive groups [r*H/G, (r+1)*H/G). Every rank sees every
  token; the per-layer all-reduce spans all G ranks.
- G > H: group h spans s = G/H consecutive ranks [h*s, (h+1)*s), which must lie in one node
  (s divides gpus_per_node), so its intra-group all-to-all never leaves the node. The batch
  is split into s token shards: rank (h, j) = h*s + j runs group h on shard j, its "ring"
  {(h', j) for all h'} all-reduces the cross-group mean of shard j (H ranks, across nodes
  when groups sit on different nodes), and group h's E/H experts are split over its s ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from .accounting import Comm, Ledger


@dataclass(frozen=True)
class Placement:
    world_size: int
    num_groups: int
    gpus_per_node: int

    def __post_init__(self) -> None:
        G, H, g = self.world_size, self.num_groups, self.gpus_per_node
        if G < 1 or H < 1 or g < 1:
            raise ValueError(f"world_size, num_groups and gpus_per_node must be >= 1, got {G}, {H}, {g}")
        if G % g:
            raise ValueError(f"world_size={G} is not a whole number of nodes of gpus_per_node={g}")
        if G <= H and H % G:
            raise ValueError(f"H={H} groups cannot be shared evenly by {G} ranks; use a world size dividing H "
                             f"({[n for n in range(1, H + 1) if H % n == 0]}) or a multiple of H")
        if G > H:
            if G % H:
                raise ValueError(f"{G} ranks cannot be split into H={H} equal groups; use a multiple of H")
            if g % (G // H):
                raise ValueError(f"each of the H={H} groups would span {G // H} ranks, which does not divide "
                                 f"gpus_per_node={g}: a group must stay inside one node")

    @property
    def ranks_per_group(self) -> int:
        return max(1, self.world_size // self.num_groups)

    @property
    def groups_per_rank(self) -> int:
        return max(1, self.num_groups // self.world_size)

    @property
    def num_shards(self) -> int:
        """Token shards: every rank of a ring processes the same shard."""
        return self.ranks_per_group

    def groups_of(self, rank: int) -> list[int]:
        if self.world_size <= self.num_groups:
            n = self.groups_per_rank
            return list(range(rank * n, (rank + 1) * n))
        return [rank // self.ranks_per_group]

    def shard_of(self, rank: int) -> int:
        """The token shard rank `rank` processes (also its index inside its group)."""
        return rank % self.ranks_per_group

    def ring(self, shard: int) -> list[int]:
        """The ranks that all-reduce the cross-group mean of one token shard."""
        s = self.ranks_per_group
        return [h * s + shard for h in range(min(self.num_groups, self.world_size))]

    def group_ranks(self, group: int) -> list[int]:
        s = self.ranks_per_group
        return [group * s + j for j in range(s)] if self.world_size > self.num_groups else \
            [group // self.groups_per_rank]

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node


class FoEMesh:
    """This rank's placement and the two communicators FoE uses: `ring` (the all-reduce) and
    `group` (the intra-group all-to-all; None when a group lives on one rank).

    `pg` is the process group spanning all G ranks (default: the world). All its ranks must
    construct the mesh together (sub-groups are created collectively).
    """

    def __init__(self, num_groups: int, *, pg: dist.ProcessGroup | None = None, gpus_per_node: int | None = None,
                 ledger: Ledger | None = None, timeout_s: float | None = None) -> None:
        pg = pg if pg is not None else dist.group.WORLD
        G = dist.get_world_size(pg)
        self.placement = Placement(G, num_groups, gpus_per_node or G)
        self.rank = dist.get_rank(pg)
        self.ledger = ledger if ledger is not None else Ledger()
        self.world = Comm(pg, self.ledger, "world", timeout_s)
        p = self.placement
        if p.ranks_per_group == 1:
            self.ring, self.group = self.world, None
            return
        global_rank = lambda r: dist.get_global_rank(pg, r)  # noqa: E731
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        self.ring = self.group = None
        for j in range(p.num_shards):  # every rank creates every sub-group, in the same order
            sub = dist.new_group([global_rank(r) for r in p.ring(j)], timeout=timeout)
            if j == p.shard_of(self.rank):
                self.ring = Comm(sub, self.ledger, "ring", timeout_s)
        for h in range(num_groups):
            sub = dist.new_group([global_rank(r) for r in p.group_ranks(h)], timeout=timeout)
            if h == p.groups_of(self.rank)[0]:
                self.group = Comm(sub, self.ledger, "group", timeout_s)

    @property
    def local_groups(self) -> list[int]:
        return self.placement.groups_of(self.rank)

    @property
    def shard(self) -> int:
        return self.placement.shard_of(self.rank)
