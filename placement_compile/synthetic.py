"""Synthetic circuits for training: the generator of Lee et al. (arXiv 2407.12282), v1 and v2.

A circuit is sampled in normalised units (canvas [-1, 1]^2) in four steps:

1. **Objects.** Up to `max_objects` rectangles: long side ~ Exp(scale) clipped to
   [size_min, size_max], short side = aspect * long side with aspect ~ U(0.25, 1), long side
   along x or y with probability 1/2. Sorted by area (largest first), each object gets
   `attempts` uniform candidate centres inside the canvas and takes the first that overlaps
   nothing placed so far (or is dropped). The attempted area, placed or not, is summed and
   generation stops once it reaches a stop density ~ U(0.75, 0.9) of the canvas.
2. **Pins** (Rent's rule): n = max(ceil(c * A^0.65), 4) trials, Binomial(n, 0.5) pins clipped
   to [1, 256], uniform on the object's boundary; each pin is a source with probability 0.3.
3. **Connections.** Every (source pin, sink pin) pair on different objects is connected with
   probability p = min(gamma(s) * exp(-L1 / s), 0.9), gamma(s) = g * s^-1.42, where L1 is the
   pin-to-pin distance in the generated placement and s ~ logU(lo, hi) once per circuit. As in
   the authors' generator, an object left without any connection gets one: its first pin
   becomes a sink of the nearest source pin that already drives something.
4. **Nets.** Each source pin that drives at least one sink is a net: the driver pin plus its
   sinks. Star edges run from the driver's object to every sink's object, both directions,
   with 4-d attributes (source pin offset, destination pin offset).

NOTE: measured mean object counts (seeds 0-29 for v1, 0-7 for v2) are ~276 (v1) and ~1160
(v2), above the paper's ~230 and ~960 by the same factor (~1.2); the distributions and the
placement loop follow the authors' released configs (max 400 / 1600 objects, 10 attempts).

The generated placement is legal and is the ground-truth `positions` of the graph. As in the
authors' generator, no object is a port (`is_port` is all False): synthetic circuits have no
pads, and the denoiser learns the port mask only from its being zero.

`generate_dataset` samples many circuits across processes (circuit i uses the seed
`circuit_seed(seed, i)`, so the result does not depend on the number of workers) and saves
them as shards of `torch.save`d dicts; `load_dataset` reads them back as PlacementGraphs.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from placement_compile.files import atomic_path, load_torch_file
from placement_compile.graph import PlacementGraph


@dataclass(frozen=True)
class GeneratorParams:
    """Distribution parameters of one generator version (normalised units, canvas side 2)."""

    max_objects: int
    size_scale: float  # mean of the exponential long side
    size_min: float
    size_max: float
    rent_constant: float  # c in n = max(ceil(c * A^0.65), 4)
    scale_low: float  # s ~ logU(scale_low, scale_high)
    scale_high: float
    gamma_factor: float  # g in gamma(s) = g * s^-1.42
    aspect_low: float = 0.25
    aspect_high: float = 1.0
    density_low: float = 0.75
    density_high: float = 0.9
    attempts: int = 10
    rent_exponent: float = 0.65
    min_pin_trials: int = 4
    pin_prob: float = 0.5
    max_pins: int = 256
    source_prob: float = 0.3
    gamma_exponent: float = -1.42
    prob_clip: float = 0.9


VERSIONS: dict[str, GeneratorParams] = {
    # v1: ~230 objects per circuit.
    "v1": GeneratorParams(400, 0.08, 0.02, 1.0, 128.0, 0.05, 1.6, 0.0212),
    # v2: ~960 objects; sizes x0.5, so c = 128 * 4^0.65 and gamma rescaled by 2^-1.42.
    "v2": GeneratorParams(1600, 0.04, 0.01, 0.5, 315.0, 0.025, 0.8, 0.00792),
}

# Source pins per block when drawing connections: bounds the [block, sinks] work arrays.
_SOURCE_BLOCK = 512


def _version_key(version: str | int) -> str:
    key = f"v{version}" if isinstance(version, int) else version
    if key not in VERSIONS:
        raise ValueError(f"unknown synthetic version {version!r}; use one of {sorted(VERSIONS)}")
    return key


def circuit_seed(seed: int, index: int) -> int:
    """Seed of circuit `index` in a dataset generated with base seed `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)


def _sample_objects(rng: np.random.Generator, p: GeneratorParams) -> tuple[np.ndarray, np.ndarray]:
    """Sizes and legal centres of the objects, both [V, 2] float64."""
    stop_density = rng.uniform(p.density_low, p.density_high)
    m = p.max_objects
    aspect = rng.uniform(p.aspect_low, p.aspect_high, m)
    long = np.clip(rng.exponential(p.size_scale, m), p.size_min, p.size_max)
    long_x = rng.random(m) < 0.5
    sizes = np.stack([np.where(long_x, long, aspect * long), np.where(long_x, aspect * long, long)], 1)
    sizes = sizes[np.argsort(-sizes.prod(1), kind="stable")]

    centres = np.empty((m, 2))
    placed = np.empty((m, 2))
    n = 0
    density = 0.0
    for size in sizes:
        half = size / 2
        cand = rng.uniform(half - 1.0, 1.0 - half, (p.attempts, 2))  # [attempts, 2]
        gap = np.abs(cand[:, None, :] - centres[None, :n]) - (half + placed[:n] / 2)  # [a, n, 2]
        free = ~np.any(np.all(gap < 0, axis=2), axis=1)  # overlap = negative gap on both axes
        if free.any():
            centres[n] = cand[np.argmax(free)]
            placed[n] = size
            n += 1
        density += size.prod() / 4.0
        if density >= stop_density:
            break
    return placed[:n], centres[:n]


def _sample_pins(
    rng: np.random.Generator, p: GeneratorParams, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pins on object boundaries: object [P] int64, offset from centre [P, 2], is_source [P]."""
    trials = np.maximum(np.ceil(p.rent_constant * sizes.prod(1) ** p.rent_exponent), p.min_pin_trials)
    counts = np.clip(rng.binomial(trials.astype(np.int64), p.pin_prob), 1, p.max_pins)
    obj = np.repeat(np.arange(len(sizes)), counts)
    w, h = sizes[obj, 0], sizes[obj, 1]
    # A point at arc length u along the bottom-then-right half of the boundary, mirrored
    # through the centre with probability 1/2: uniform on the whole boundary.
    u = rng.uniform(0.0, w + h)
    flip = np.where(rng.random(len(obj)) < 0.5, -1.0, 1.0)
    offset = np.stack([np.clip(u, 0, w) - w / 2, np.clip(u - w, 0, h) - h / 2], 1) * flip[:, None]
    is_source = rng.random(len(obj)) < p.source_prob
    return obj, offset, is_source


def _sample_connections(
    rng: np.random.Generator, p: GeneratorParams, obj: np.ndarray, pin_pos: np.ndarray, is_source: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(driver pin [C], sink pin [C]) connections, sorted by driver then sink."""
    s = math.exp(rng.uniform(math.log(p.scale_low), math.log(p.scale_high)))
    gamma = p.gamma_factor * s**p.gamma_exponent
    sources, sinks = np.flatnonzero(is_source), np.flatnonzero(~is_source)
    drivers, loads = [], []
    for start in range(0, len(sources), _SOURCE_BLOCK):
        src = sources[start : start + _SOURCE_BLOCK]
        l1 = np.abs(pin_pos[src, None, :] - pin_pos[None, sinks, :]).sum(-1)  # [b, sinks]
        prob = np.minimum(gamma * np.exp(-l1 / s), p.prob_clip)
        hit = (rng.random(prob.shape) < prob) & (obj[src, None] != obj[None, sinks])
        i, j = np.nonzero(hit)
        drivers.append(src[i])
        loads.append(sinks[j])
    driver = np.concatenate(drivers) if drivers else np.zeros(0, np.int64)
    load = np.concatenate(loads) if loads else np.zeros(0, np.int64)

    # Objects with no connection: first pin becomes a sink of the nearest active driver.
    num_objects = int(obj.max()) + 1
    degree = np.bincount(obj[driver], minlength=num_objects) + np.bincount(obj[load], minlength=num_objects)
    active = np.unique(driver)
    first_pin = np.searchsorted(obj, np.arange(num_objects))
    isolated = np.flatnonzero(degree == 0)
    if len(active) and len(isolated):
        l1 = np.abs(pin_pos[first_pin[isolated], None, :] - pin_pos[None, active, :]).sum(-1)
        driver = np.concatenate([driver, active[np.argmin(l1, axis=1)]])
        load = np.concatenate([load, first_pin[isolated]])
    order = np.lexsort((load, driver))
    return driver[order], load[order]


def generate_circuit(seed: int, version: str | int = "v1") -> PlacementGraph:
    """One synthetic circuit, a deterministic function of (seed, version).

    Returns a PlacementGraph on the canvas [-1, 1]^2 whose `positions` [V, 2] are the
    generated legal placement; pins [P] list each net's driver first, then its sinks.
    """
    p = VERSIONS[_version_key(version)]
    rng = np.random.default_rng(seed)
    sizes, centres = _sample_objects(rng, p)
    obj, offset, is_source = _sample_pins(rng, p, sizes)
    driver, load = _sample_connections(rng, p, obj, centres[obj] + offset, is_source)

    net_driver, net_of_load = np.unique(driver, return_inverse=True)
    num_nets = len(net_driver)
    pin_id = np.concatenate([net_driver, load])  # generator pin of every net pin
    pin_net = np.concatenate([np.arange(num_nets), net_of_load])
    order = np.argsort(pin_net, kind="stable")  # drivers stay ahead of their sinks
    pin_id, pin_net = pin_id[order], pin_net[order]

    src, dst = obj[driver], obj[load]
    attr = np.concatenate([offset[driver], offset[load]], 1)  # [C, 4]
    f32 = torch.float32
    return PlacementGraph(
        sizes=torch.as_tensor(sizes, dtype=f32),
        positions=torch.as_tensor(centres, dtype=f32),
        is_port=torch.zeros(len(sizes), dtype=torch.bool),
        edge_index=torch.as_tensor(np.stack([np.concatenate([src, dst]), np.concatenate([dst, src])])),
        edge_attr=torch.as_tensor(np.concatenate([attr, attr[:, [2, 3, 0, 1]]]), dtype=f32),
        pin_node=torch.as_tensor(obj[pin_id]),
        pin_offset=torch.as_tensor(offset[pin_id], dtype=f32),
        pin_net=torch.as_tensor(pin_net),
        num_nets=num_nets,
    )


def graph_to_dict(graph: PlacementGraph) -> dict:
    """Plain dict of tensors and numbers (loads with `torch.load(weights_only=True)`)."""
    return {k: v for k, v in graph.__dict__.items() if v is not None}


def graph_from_dict(data: dict) -> PlacementGraph:
    data = dict(data)
    data["canvas"] = tuple(data.get("canvas", (-1.0, -1.0, 2.0, 2.0)))
    return PlacementGraph(**data)


def _generate_one(args: tuple[int, str]) -> dict:
    return graph_to_dict(generate_circuit(*args))


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core already


def generate_dataset(
    out_dir: str | Path,
    num_circuits: int,
    version: str | int = "v1",
    seed: int = 0,
    workers: int = 1,
    shard_size: int = 1000,
) -> list[Path]:
    """Generate `num_circuits` circuits into `out_dir` as shards; returns the shard paths.

    Circuit i is `generate_circuit(circuit_seed(seed, i), version)`, whatever `workers` is.
    Writes `shard_XXXXX.pt` (lists of `graph_to_dict` dicts) and `meta.json`.
    """
    version = _version_key(version)
    if num_circuits < 0 or workers < 1 or shard_size < 1:
        raise ValueError(
            f"need num_circuits >= 0, workers >= 1, shard_size >= 1; got {num_circuits}, {workers}, {shard_size}"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is an existing file; give a directory (created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    # meta.json marks a complete set: drop an old one first, so a failed rerun is not taken as complete.
    (out / "meta.json").unlink(missing_ok=True)
    jobs = [(circuit_seed(seed, i), version) for i in range(num_circuits)]
    bar = tqdm(total=num_circuits, desc=f"synthetic {version}", unit="circuit")
    paths: list[Path] = []
    shard: list[dict] = []

    def flush() -> None:
        paths.append(out / f"shard_{len(paths):05d}.pt")
        with atomic_path(paths[-1]) as tmp:
            torch.save(shard, tmp)
        shard.clear()

    if workers == 1:
        results = map(_generate_one, jobs)
        pool = None
    else:
        # spawn: the parent may hold torch/OpenMP threads that a fork would inherit broken.
        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker)
        results = pool.imap(_generate_one, jobs, chunksize=max(1, min(16, num_circuits // (4 * workers))))
    try:
        for item in results:
            shard.append(item)
            bar.update()
            if len(shard) == shard_size:
                flush()
        if shard:
            flush()
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    meta = {"version": version, "seed": seed, "num_circuits": num_circuits, "shards": [p.name for p in paths]}
    with atomic_path(out / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    return paths


def load_dataset(path: str | Path) -> list[PlacementGraph]:
    """Circuits saved by `generate_dataset`: a directory (all shards, in order) or one shard."""
    path = Path(path)
    if path.is_dir():
        meta = path / "meta.json"
        if not meta.exists():
            raise ValueError(f"{path} has no meta.json; is it a generate_dataset output directory?")
        try:
            files = [path / name for name in json.loads(meta.read_text())["shards"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{meta}: not a generate_dataset meta.json ({type(err).__name__}: {err}); "
                             f"generate the set again") from err
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"dataset path {path} does not exist")
    graphs = []
    for f in files:
        shard = load_torch_file(f, "dataset shard")
        if not isinstance(shard, list) or not all(isinstance(d, dict) for d in shard):
            raise ValueError(f"{f}: not a dataset shard (expected a list of circuit dicts); generate the set again")
        try:
            graphs += [graph_from_dict(d) for d in shard]
        except TypeError as err:
            raise ValueError(f"{f}: a circuit in this shard has the wrong fields ({err}); generate the set again") from err
    return graphs
