"""Distributed FoE on torch.distributed: the FoE runtime, the expert-parallel baseline, the exact
(tensor-parallel) variant, collective accounting, group placement and the cost model."""
from .accounting import CollectiveError, Comm, Ledger
from .attention import KVCache
from .base import shard_batch
from .ep_baseline import EPRankModel, build_ep
from .exact_runtime import ExactRankModel, build_exact
from .foe_runtime import FoERankModel, build_foe
from .launch import RankResult, init_from_env, spawn
from .mesh import FoEMesh, Placement

__all__ = ["CollectiveError", "Comm", "EPRankModel", "ExactRankModel", "FoEMesh", "FoERankModel", "KVCache",
           "Ledger", "Placement", "RankResult", "build_ep", "build_exact", "build_foe", "init_from_env",
           "shard_batch", "spawn"]
