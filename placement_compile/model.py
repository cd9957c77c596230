"""The AttGNN denoiser (Lee et al., ICML 2025): predicts the noise eps in x_t = a x_0 + s eps.

Batched over B samples of one circuit: x_t [B, V, 2], t [B] -> eps_hat [B, V, 2].

Layout (H = hidden, G = GNN width, A = attention width, T = 32-d time embedding)::

    encoder   Linear([x_t, size, port]) + Linear(cos/sin of [x_t, size] at 16 freqs in [1, 100])
    N times:  GNNBlock(G)    h + Lin(LN(ReLU(FiLM_t(GAT(Lin(LN(ReLU(GAT([h, size])))))))))
              MLP            h + Lin(ReLU(Lin_4H(LN(h))))
              AttnBlock(A)   h + Lin(LN(Transformer(ReLU(FiLM_t(GAT([h, size]))) + Lin([size, x_t]))))
              MLP
    decoder   Linear(H, 2) + x_t

Parameter counts: the authors' code allocates one GroupNorm(1, width) per GNN and attention block
that it never applies; this implementation omits them, so its counts are the published counts
minus 2 x width per block: Small 233,090 (published 233,474), Medium 1,225,026 (1,226,178),
Large 6,281,986 (6,285,058). :func:`published_parameter_count` adds the unused layers back.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from placement_compile.files import atomic_path, load_torch_file
from placement_compile.gatv2 import GATv2, add_self_loops_mean
from placement_compile.graph import PlacementGraph


@dataclass(frozen=True)
class AttGNNConfig:
    hidden: int
    blocks: int
    gnn_width: int
    att_width: int
    heads: int = 4
    time_dim: int = 32
    input_freqs: int = 16
    edge_dim: int = 4
    mlp_factor: int = 4

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


CONFIGS: dict[str, AttGNNConfig] = {
    "small": AttGNNConfig(hidden=64, blocks=2, gnn_width=64, att_width=32),
    "medium": AttGNNConfig(hidden=128, blocks=2, gnn_width=256, att_width=32),
    "large": AttGNNConfig(hidden=256, blocks=3, gnn_width=256, att_width=256),
}


@dataclass
class DenoiserInputs:
    """Per-netlist conditioning, computed once per circuit and reused at every step."""

    sizes: Tensor  # [V, 2]
    is_port: Tensor  # [V] bool
    edge_index: Tensor  # [2, E + V] with one self-loop per node
    edge_attr: Tensor  # [E + V, 4], loop attributes = mean of incoming edge attributes

    @classmethod
    def from_graph(cls, graph: PlacementGraph) -> DenoiserInputs:
        edge_index, edge_attr = add_self_loops_mean(graph.edge_index, graph.edge_attr, graph.num_nodes)
        return cls(graph.sizes.float(), graph.is_port.bool(), edge_index, edge_attr.float())


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """t [B] in [0, 1] -> [B, dim]: cos/sin of 1000 t at geometric frequencies 1 .. 1/max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (1000.0 * t.float()).unsqueeze(-1) * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


class FiLM(nn.Module):
    """x [B, V, C], cond [B, T] -> scale(cond) * x + shift(cond)."""

    def __init__(self, cond_dim: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(cond_dim, 2 * width)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.proj(cond).unsqueeze(1).chunk(2, dim=-1)
        return scale * x + shift


class ResidualMLP(nn.Module):
    """h + Linear(ReLU(Linear(LayerNorm(h)))) with a factor-wide hidden layer."""

    def __init__(self, width: int, factor: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, factor * width)
        self.fc2 = nn.Linear(factor * width, width)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.fc2(F.relu(self.fc1(self.norm(h))))


class GNNBlock(nn.Module):
    """Two GATv2 layers, each followed by ReLU / LayerNorm / Linear; FiLM(t) on the second."""

    def __init__(self, cfg: AttGNNConfig) -> None:
        super().__init__()
        H, G = cfg.hidden, cfg.gnn_width
        self.gat1 = GATv2(H + 2, G, cfg.heads, cfg.edge_dim)
        self.norm1, self.lin1 = nn.LayerNorm(G), nn.Linear(G, G)
        self.gat2 = GATv2(G, G, cfg.heads, cfg.edge_dim)
        self.film = FiLM(cfg.time_dim, G)
        self.norm2, self.lin2 = nn.LayerNorm(G), nn.Linear(G, H)

    def forward(self, h: Tensor, temb: Tensor, inp: DenoiserInputs) -> Tensor:
        sizes = inp.sizes.expand(h.shape[0], -1, -1)
        z = F.relu(self.gat1(torch.cat([h, sizes], dim=-1), inp.edge_index, inp.edge_attr))
        z = F.relu(self.lin1(self.norm1(z)))
        z = F.relu(self.film(self.gat2(z, inp.edge_index, inp.edge_attr), temb))
        return h + self.lin2(self.norm2(z))


class Transformer(nn.Module):
    """Pre-LN multi-head self-attention over all nodes plus a 2-layer feed-forward: [B, V, A]."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} must be divisible by heads={heads}")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.ff1, self.ff2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, z: Tensor) -> Tensor:
        B, V, A = z.shape
        y = self.norm1(z)
        q, k, v = (proj(y).view(B, V, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, V, A)
        z = z + self.out(att)
        return z + self.ff2(F.relu(self.ff1(self.norm2(z))))


class AttentionBlock(nn.Module):
    """GATv2 with FiLM(t), plus Linear([size, x_t]), then a Transformer; LayerNorm, Linear, residual."""

    def __init__(self, cfg: AttGNNConfig) -> None:
        super().__init__()
        H, A = cfg.hidden, cfg.att_width
        self.gat = GATv2(H + 2, A, cfg.heads, cfg.edge_dim)
        self.film = FiLM(cfg.time_dim, A)
        self.coords = nn.Linear(4, A)
        self.transformer = Transformer(A, cfg.heads)
        self.norm, self.lin = nn.LayerNorm(A), nn.Linear(A, H)

    def forward(self, h: Tensor, temb: Tensor, x_t: Tensor, inp: DenoiserInputs) -> Tensor:
        sizes = inp.sizes.expand(h.shape[0], -1, -1)
        z = self.gat(torch.cat([h, sizes], dim=-1), inp.edge_index, inp.edge_attr)
        z = F.relu(self.film(z, temb)) + self.coords(torch.cat([sizes, x_t], dim=-1))
        return h + self.lin(self.norm(self.transformer(z)))


class AttGNN(nn.Module):
    """eps-prediction denoiser: forward(x_t [B, V, 2], t [B], inputs) -> [B, V, 2]."""

    def __init__(self, cfg: AttGNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        self.encode = nn.Linear(5, H)
        self.encode_fourier = nn.Linear(4 * 2 * cfg.input_freqs, H)
        self.register_buffer("freqs", torch.logspace(0, 2, cfg.input_freqs), persistent=False)
        self.stages = nn.ModuleList()
        for _ in range(cfg.blocks):
            self.stages.append(nn.ModuleList([
                GNNBlock(cfg), ResidualMLP(H, cfg.mlp_factor),
                AttentionBlock(cfg), ResidualMLP(H, cfg.mlp_factor),
            ]))
        self.decode = nn.Linear(H, 2)

    def forward(self, x_t: Tensor, t: Tensor, inp: DenoiserInputs) -> Tensor:
        if x_t.dim() != 3 or x_t.shape[-1] != 2 or x_t.shape[1] != inp.sizes.shape[0]:
            raise ValueError(f"x_t must be [B, V={inp.sizes.shape[0]}, 2], got {tuple(x_t.shape)}")
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must be [B={x_t.shape[0]}], got {tuple(t.shape)}")
        B = x_t.shape[0]
        sizes = inp.sizes.expand(B, -1, -1)
        port = inp.is_port.to(x_t.dtype).view(1, -1, 1).expand(B, -1, 1)
        spatial = torch.cat([x_t, sizes], dim=-1)  # [B, V, 4]
        theta = (spatial.unsqueeze(-1) * self.freqs).flatten(2)  # [B, V, 4 * F]
        h = self.encode(torch.cat([spatial, port], dim=-1))
        h = h + self.encode_fourier(torch.cat([theta.cos(), theta.sin()], dim=-1))
        temb = timestep_embedding(t, self.cfg.time_dim)
        for gnn, mlp1, att, mlp2 in self.stages:
            h = mlp1(gnn(h, temb, inp))
            h = mlp2(att(h, temb, x_t, inp))
        return self.decode(h) + x_t


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def published_parameter_count(cfg: AttGNNConfig) -> int:
    """Parameters of the authors' model: ours plus the unused GroupNorm(1, width) per block."""
    return parameter_count(AttGNN(cfg)) + cfg.blocks * 2 * (cfg.gnn_width + cfg.att_width)


def save_model(model: AttGNN, path: str, meta: dict | None = None) -> None:
    """Write {"config", "state_dict" (fp32), "meta"} to path (loads with weights_only=True), atomically."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"config": model.cfg.to_dict(), "state_dict": state, "meta": meta or {}}, tmp)


def _config_from(path: str, config: object) -> AttGNNConfig:
    """The AttGNNConfig of a checkpoint's "config" entry; ValueError naming the file if it is not one."""
    if not isinstance(config, dict):
        raise ValueError(f"{path}: 'config' is a {type(config).__name__}, expected a dict of AttGNNConfig fields")
    known = [f.name for f in fields(AttGNNConfig)]
    unknown = sorted(set(config) - set(known), key=str)
    if unknown:
        raise ValueError(f"{path}: unknown config key(s) {', '.join(map(repr, unknown))} (known: {', '.join(known)}); "
                         f"was it written by another version? re-save it with save_model")
    required = [f.name for f in fields(AttGNNConfig) if f.default is MISSING]
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"{path}: config lacks {', '.join(missing)}; re-save it with save_model")
    bad = [k for k, v in config.items() if type(v) is not int or v < 1]
    if bad:
        raise ValueError(f"{path}: config {bad[0]} = {config[bad[0]]!r}; every AttGNNConfig field is an integer >= 1")
    return AttGNNConfig(**config)


def _check_state(path: str, model: AttGNN, state: object) -> None:
    """ValueError (one line) unless `state` has exactly the model's tensors and shapes."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: 'state_dict' is a {type(state).__name__}, expected a dict of tensors")
    want = model.state_dict()
    missing, unexpected = [k for k in want if k not in state], [k for k in state if k not in want]
    wrong = [k for k in want if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != want[k].shape)]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape or type for", wrong)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise ValueError(f"{path}: weights do not fit its config: {label} {', '.join(map(str, keys[:3]))}{more}")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise ValueError(f"{path}: weight {nonfinite[0]} holds NaN or Inf; use an earlier checkpoint")


def load_model(path: str) -> AttGNN:
    """An AttGNN (eval mode) from a file written by :func:`save_model` or a training checkpoint
    (`last.pt` of `train`). A missing, unreadable or inconsistent file raises one ValueError line."""
    blob = load_torch_file(path, "checkpoint")
    if isinstance(blob, dict) and {"model", "optimizer", "config"} <= blob.keys():  # train()'s last.pt
        size = blob["config"].get("model") if isinstance(blob["config"], dict) else None
        if size not in CONFIGS:
            raise ValueError(f"{path}: training checkpoint with model size {size!r}; expected one of {sorted(CONFIGS)}")
        cfg, state = CONFIGS[size], blob["model"]
    elif not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
        keys = f"keys {sorted(map(str, blob))}" if isinstance(blob, dict) else f"a {type(blob).__name__}"
        raise ValueError(f"{path} is not an AttGNN checkpoint (it holds {keys}; expected keys 'config' and "
                         f"'state_dict'); train one with `placement-compile train` or pass --checkpoint")
    else:
        cfg, state = _config_from(path, blob["config"]), blob["state_dict"]
    try:
        model = AttGNN(cfg)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    _check_state(path, model, state)
    model.load_state_dict(state)
    return model.eval()
