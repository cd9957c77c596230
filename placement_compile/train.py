"""Training the AttGNN denoiser on synthetic circuits (resumable, checkpointed, with a loss curve).

One step = one circuit (drawn uniformly with a seeded generator) with `batch` noisy copies at
independent t ~ U(0, 1); AdamW with linear warm-up and gradient clipping. The run directory holds::

    last.pt        model, optimiser, step, generator state, loss history (resume point)
    model.pt       weights only (save_model format), rewritten at every checkpoint
    loss.png       training (smoothed) and validation loss against step
    log.json       the config and the loss history

Example::

    cfg = TrainConfig(steps=2000)
    train(load_dataset("data/v1-train"), load_dataset("data/v1-val"), "runs/small", cfg)
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from placement_compile.diffusion import denoising_loss
from placement_compile.files import atomic_path, load_torch_file
from placement_compile.graph import PlacementGraph
from placement_compile.model import CONFIGS, AttGNN, DenoiserInputs, save_model


_RESUME_KEYS = {"model", "optimizer", "generator", "history", "step", "config"}


@dataclass(frozen=True)
class TrainConfig:
    model: str = "small"
    steps: int = 10_000
    batch: int = 16  # noisy copies (independent t and noise) of the step's circuit
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup: int = 200
    grad_clip: float = 1.0
    seed: int = 0
    val_every: int = 250
    ckpt_every: int = 250
    val_batch: int = 16

    def __post_init__(self) -> None:
        positive = {"batch": self.batch, "warmup": self.warmup, "val_every": self.val_every,
                    "ckpt_every": self.ckpt_every, "val_batch": self.val_batch}
        bad = [f"{k} = {v!r}" for k, v in positive.items() if not isinstance(v, int) or v < 1]
        if not isinstance(self.steps, int) or self.steps < 0:
            bad.append(f"steps = {self.steps!r}")
        for k, v in {"lr": self.lr, "weight_decay": self.weight_decay, "grad_clip": self.grad_clip}.items():
            if not math.isfinite(v) or v < 0 or (v == 0 and k != "weight_decay"):
                bad.append(f"{k} = {v!r}")
        if bad:
            raise ValueError(f"TrainConfig: {', '.join(bad)}; steps must be >= 0, batch, warmup, val_every, "
                             f"ckpt_every and val_batch >= 1, lr and grad_clip > 0, weight_decay >= 0 (all finite)")


def _prepared(graphs: list[PlacementGraph]) -> list[tuple[DenoiserInputs, torch.Tensor]]:
    return [(DenoiserInputs.from_graph(g), g.positions.float()) for g in graphs]


@torch.no_grad()
def validation_loss(model: AttGNN, data: list[tuple[DenoiserInputs, torch.Tensor]], batch: int, seed: int = 1234) -> float:
    """Mean eps-MSE over the held-out circuits at stratified t = (k + 0.5) / batch, fixed noise."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    t = (torch.arange(batch) + 0.5) / batch
    total = 0.0
    for inputs, x0 in data:
        x0b = x0.expand(batch, -1, -1)
        total += float(denoising_loss(model, inputs, x0b, t, torch.randn(x0b.shape, generator=gen)))
    model.train()
    return total / max(len(data), 1)


def plot_losses(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps, losses = history["train_step"], history["train_loss"]
    if losses:
        k = max(len(losses) // 50, 1)
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, label=f"train (running mean of {k})")
    if history["val_loss"]:
        ax.plot(history["val_step"], history["val_loss"], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("eps MSE")
    ax.set_yscale("log")
    if losses or history["val_loss"]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))


def train(train_graphs: list[PlacementGraph], val_graphs: list[PlacementGraph], out_dir: str | Path,
          cfg: TrainConfig = TrainConfig(), resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume with resume=True) until cfg.steps; returns the final summary dict."""
    if not train_graphs:
        raise ValueError("no training circuits: generate some with `placement-compile generate`")
    if cfg.model not in CONFIGS:
        raise ValueError(f"unknown model size {cfg.model!r}; choose one of {sorted(CONFIGS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"run directory {out} is an existing file; give a directory (created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = AttGNN(CONFIGS[cfg.model])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: dict = {"train_step": [], "train_loss": [], "val_step": [], "val_loss": []}
    step = 0
    if resume:
        ckpt_path = out / "last.pt"
        if not ckpt_path.exists():
            raise ValueError(f"--resume given but {ckpt_path} does not exist")
        ckpt = load_torch_file(ckpt_path, "training checkpoint")
        missing = sorted(_RESUME_KEYS - ckpt.keys()) if isinstance(ckpt, dict) else sorted(_RESUME_KEYS)
        if missing:
            raise ValueError(f"{ckpt_path} is not a training checkpoint (it lacks {', '.join(missing)}); "
                             f"start a new run without --resume or in another directory")
        if not isinstance(ckpt["config"], dict) or ckpt["config"] != asdict(cfg) | {"steps": ckpt["config"].get("steps")}:
            raise ValueError(f"{ckpt_path} was trained with a different config: {ckpt['config']}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        history, step = ckpt["history"], ckpt["step"]
    train_data, val_data = _prepared(train_graphs), _prepared(val_graphs)
    model.train()

    def checkpoint() -> None:
        # Every file is replaced atomically: an interrupted run leaves the previous complete set.
        with atomic_path(out / "last.pt") as tmp:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                        "history": history, "step": step, "config": asdict(cfg)}, tmp)
        save_model(model, str(out / "model.pt"), {"step": step, "train_config": asdict(cfg)})
        with atomic_path(out / "log.json") as tmp:
            tmp.write_text(json.dumps({"config": asdict(cfg), "history": history}))
        with atomic_path(out / "loss.png") as tmp:
            plot_losses(history, tmp)

    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not progress)
    while step < cfg.steps:
        inputs, x0 = train_data[int(torch.randint(len(train_data), (1,), generator=gen))]
        x0b = x0.expand(cfg.batch, -1, -1)
        t = torch.rand(cfg.batch, generator=gen)
        noise = torch.randn(x0b.shape, generator=gen)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = denoising_loss(model, inputs, x0b, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        history["train_step"].append(step)
        history["train_loss"].append(float(loss.detach()))
        bar.update()
        if val_data and (step % cfg.val_every == 0 or step == cfg.steps):
            history["val_step"].append(step)
            history["val_loss"].append(validation_loss(model, val_data, cfg.val_batch))
            bar.set_postfix(val=f"{history['val_loss'][-1]:.4f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            checkpoint()
    bar.close()
    if not (out / "last.pt").exists():
        checkpoint()
    tail = history["train_loss"][-100:]
    return {"step": step, "train_loss": sum(tail) / max(len(tail), 1),
            "val_loss": history["val_loss"][-1] if history["val_loss"] else math.nan}
