"""Bookshelf netlists (UCLA .aux/.nodes/.nets/.pl/.scl, optionally gzipped): reader and .pl writer.

Conventions (those of the ICCAD04 IBM benchmarks):
- `.nodes`: `name width height [terminal]`; terminals are the fixed pads.
- `.nets`: `NetDegree : k [name]` blocks of k pin lines `node [I|O|B] [: dx dy]`, offsets from
  the node's *centre* (a pin without offsets sits at the centre).
- `.pl`: `name x y : orient [/FIXED]` with (x, y) the lower-left corner.
- `.scl`: rows; the canvas spans x from the smallest SubrowOrigin to the largest
  SubrowOrigin + Numsites * Sitespacing, y from the smallest Coordinate to the largest
  Coordinate + Height.
- Macros are the movable nodes (not terminals, not /FIXED) taller than the row height.

Every file may be gzipped: `ibm01.aux` resolves to `ibm01.aux.gz` when only that exists, and
the files the .aux names resolve the same way. Malformed input raises `BookshelfError` (a
ValueError) whose message starts with `file:line:`.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


class BookshelfError(ValueError):
    """Malformed or missing Bookshelf input; the message names the file and line."""

    def __init__(self, path: str | Path, line: int, message: str):
        super().__init__(f"{path}:{line}: {message}")
        self.path, self.line = str(path), line


@dataclass
class Circuit:
    """A placement netlist in Bookshelf units. N nodes, P pins, M nets."""

    name: str
    node_names: list[str]  # [N]
    sizes: np.ndarray  # [N, 2] float64: (width, height)
    positions: np.ndarray  # [N, 2] float64: lower-left corners
    orient: list[str]  # [N] orientation from the .pl ("N" when absent)
    is_terminal: np.ndarray  # [N] bool: pads ("terminal" in .nodes)
    is_fixed: np.ndarray  # [N] bool: terminals and /FIXED nodes: they never move
    net_names: list[str]  # [M]
    pin_node: np.ndarray  # [P] int64: node of every pin
    pin_offset: np.ndarray  # [P, 2] float64: offset from the node's centre
    pin_dir: np.ndarray  # [P] str: "I", "O", "B" or "" (not given)
    pin_net: np.ndarray  # [P] int64: net of every pin; pins of a net are contiguous, in file order
    canvas: tuple[float, float, float, float]  # (x0, y0, width, height)
    row_height: float
    # [N] index of every node in the circuit this one was cut from (macro view); None if not cut.
    source_index: np.ndarray | None = None

    @property
    def num_nodes(self) -> int:
        return len(self.node_names)

    @property
    def num_nets(self) -> int:
        return len(self.net_names)

    @property
    def num_pins(self) -> int:
        return len(self.pin_node)

    @property
    def is_macro(self) -> np.ndarray:
        """[N] bool: movable nodes taller than one row."""
        return ~self.is_fixed & (self.sizes[:, 1] > self.row_height)

    @property
    def num_macros(self) -> int:
        return int(self.is_macro.sum())

    def with_positions(self, lower_left: np.ndarray) -> Circuit:
        """A copy placed at `lower_left` [N, 2] (the netlist arrays are shared, not copied)."""
        ll = np.asarray(lower_left, dtype=np.float64)
        if ll.shape != self.positions.shape:
            raise ValueError(f"lower_left must be [{self.num_nodes}, 2], got {ll.shape}")
        return replace(self, positions=ll.copy())


def default_data_dir() -> Path:
    """$FOE_DATA_DIR, else the nearest `shared/data` beside the repository or one of its parents
    (the checkout's `../shared/data`, also for clones made deeper in the workspace)."""
    env = os.environ.get("FOE_DATA_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    candidates = [parent / "shared" / "data" for parent in repo.parents]
    return next((c for c in candidates if (c / "iccad04").is_dir()), candidates[0])


def iccad04_aux(circuit: str) -> Path:
    """Path of an ICCAD04 benchmark's .aux, e.g. `iccad04_aux("ibm01")`."""
    return default_data_dir() / "iccad04" / circuit / f"{circuit}.aux"


def _resolve(path: Path) -> Path | None:
    if path.exists():
        return path
    gz = path.with_name(path.name + ".gz")
    return gz if gz.exists() else None


def _read_lines(path: Path) -> list[str]:
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("ascii", errors="replace").splitlines()


def _records(path: Path):
    """(line number, tokens) of every non-empty, non-comment, non-header line."""
    for lineno, line in enumerate(_read_lines(path), start=1):
        tok = line.split("#", 1)[0].split()
        if tok and tok[0] != "UCLA":
            yield lineno, tok


def _header(tok: list[str], path: Path, lineno: int) -> int:
    try:
        return int(tok[-1])
    except ValueError:
        raise BookshelfError(path, lineno, f"bad count in {' '.join(tok)!r}") from None


def _floats(tok: list[str], path: Path, lineno: int) -> list[float]:
    try:
        return [float(t) for t in tok]
    except ValueError:
        raise BookshelfError(path, lineno, f"expected numbers, got {' '.join(tok)!r}") from None


def _read_nodes(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names: list[str] = []
    sizes: list[list[float]] = []
    terminal: list[bool] = []
    declared: dict[str, int] = {}
    last = 0
    for lineno, tok in _records(path):
        last = lineno
        if tok[0] in ("NumNodes", "NumTerminals"):
            declared[tok[0]] = _header(tok, path, lineno)
            continue
        if len(tok) < 3:
            raise BookshelfError(path, lineno, f"expected 'name width height [terminal]', got {' '.join(tok)!r}")
        w, h = _floats(tok[1:3], path, lineno)
        if w < 0 or h < 0:
            raise BookshelfError(path, lineno, f"node {tok[0]} has a negative size {w} x {h}")
        names.append(tok[0])
        sizes.append([w, h])
        terminal.append(len(tok) > 3 and tok[3].startswith("terminal"))
    counts = {"NumNodes": len(names), "NumTerminals": sum(terminal)}
    for key, want in declared.items():
        if counts[key] != want:
            raise BookshelfError(path, last, f"{key} is {want} but the file has {counts[key]} (truncated?)")
    return names, np.array(sizes, dtype=np.float64).reshape(-1, 2), np.array(terminal, dtype=bool)


def _read_nets(path: Path, index: dict[str, int]):
    net_names: list[str] = []
    pin_node: list[int] = []
    pin_offset: list[tuple[float, float]] = []
    pin_dir: list[str] = []
    pin_net: list[int] = []
    declared: dict[str, int] = {}
    remaining, degree, start, last = 0, 0, 0, 0

    def short(lineno: int) -> BookshelfError:
        got = degree - remaining
        return BookshelfError(path, lineno, f"net {net_names[-1]} (line {start}) has NetDegree {degree} but {got} pins")

    for lineno, tok in _records(path):
        last = lineno
        head = tok[0]
        if head == "NetDegree":
            if remaining:
                raise short(lineno)
            nums = [t for t in tok[1:] if t != ":"]
            if not nums:
                raise BookshelfError(path, lineno, "NetDegree without a count")
            degree = remaining = _header(nums[:1], path, lineno)
            if degree < 0:
                raise BookshelfError(path, lineno, f"negative NetDegree {degree}")
            start = lineno
            net_names.append(nums[1] if len(nums) > 1 else f"net{len(net_names)}")
        elif head in ("NumNets", "NumPins"):
            declared[head] = _header(tok, path, lineno)
        else:
            if not remaining:
                raise BookshelfError(path, lineno, f"pin {head} outside a NetDegree block (more pins than declared?)")
            node = index.get(head)
            if node is None:
                raise BookshelfError(path, lineno, f"unknown node {head!r}")
            colon = tok.index(":") if ":" in tok else len(tok)
            if colon < len(tok):
                if len(tok) < colon + 3:
                    raise BookshelfError(path, lineno, f"pin offset needs 'dx dy' after ':', got {' '.join(tok)!r}")
                pin_offset.append(tuple(_floats(tok[colon + 1 : colon + 3], path, lineno)))
            else:
                pin_offset.append((0.0, 0.0))
            pin_dir.append(tok[1] if colon > 1 else "")
            pin_node.append(node)
            pin_net.append(len(net_names) - 1)
            remaining -= 1
    if remaining:
        raise short(last)
    counts = {"NumNets": len(net_names), "NumPins": len(pin_node)}
    for key, want in declared.items():
        if counts[key] != want:
            raise BookshelfError(path, last, f"{key} is {want} but the file has {counts[key]} (truncated?)")
    return (
        net_names,
        np.array(pin_node, dtype=np.int64),
        np.array(pin_offset, dtype=np.float64).reshape(-1, 2),
        np.array(pin_dir, dtype="<U1"),
        np.array(pin_net, dtype=np.int64),
    )


def read_pl(path: str | Path, index: dict[str, int]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Lower-left positions [N, 2], orientations [N] and /FIXED flags [N] from a .pl file.

    `index` maps node names to rows; nodes the file does not list stay at (0, 0), "N".
    """
    path = Path(path)
    n = len(index)
    pos = np.zeros((n, 2), dtype=np.float64)
    orient = ["N"] * n
    fixed = np.zeros(n, dtype=bool)
    for lineno, tok in _records(path):
        node = index.get(tok[0])
        if node is None:
            raise BookshelfError(path, lineno, f"unknown node {tok[0]!r}")
        if len(tok) < 3:
            raise BookshelfError(path, lineno, f"expected 'name x y : orient', got {' '.join(tok)!r}")
        pos[node] = _floats(tok[1:3], path, lineno)
        rest = [t for t in tok[3:] if t != ":"]
        if rest and not rest[0].startswith("/"):
            orient[node] = rest[0]
        fixed[node] = any(t.startswith("/FIXED") for t in rest)
    return pos, orient, fixed


_ROW_KEYS = {"coordinate", "height", "sitespacing", "subroworigin", "numsites"}


def _read_scl(path: Path) -> tuple[tuple[float, float, float, float], float]:
    """Canvas (x0, y0, w, h) and row height from the rows of a .scl file."""
    rows: list[dict[str, float]] = []
    row: dict[str, float] | None = None
    declared, last = None, 0
    for lineno, tok in _records(path):
        last = lineno
        if tok[0].lower() == "numrows":
            declared = _header(tok, path, lineno)
        elif tok[0] == "CoreRow":
            row = {}
        elif tok[0] == "End":
            if row is None:
                raise BookshelfError(path, lineno, "End without CoreRow")
            missing = {"coordinate", "height", "subroworigin", "numsites"} - row.keys()
            if missing:
                raise BookshelfError(path, lineno, f"row lacks {', '.join(sorted(missing))}")
            rows.append(row)
            row = None
        elif row is not None:
            tok = " ".join(tok).replace(":", " : ").split()
            for i in range(len(tok) - 2):
                if tok[i + 1] == ":" and tok[i].lower() in _ROW_KEYS:
                    row[tok[i].lower()] = _floats(tok[i + 2 : i + 3], path, lineno)[0]
    if row is not None:
        raise BookshelfError(path, last, "file ends inside a CoreRow (truncated?)")
    if not rows or (declared is not None and declared != len(rows)):
        raise BookshelfError(path, last, f"Numrows is {declared} but the file has {len(rows)} rows")
    x0 = min(r["subroworigin"] for r in rows)
    x1 = max(r["subroworigin"] + r["numsites"] * r.get("sitespacing", 1.0) for r in rows)
    y0 = min(r["coordinate"] for r in rows)
    y1 = max(r["coordinate"] + r["height"] for r in rows)
    return (x0, y0, x1 - x0, y1 - y0), min(r["height"] for r in rows)


_REQUIRED = {".nodes", ".nets", ".pl", ".scl"}


def read_bookshelf(aux: str | Path, pl: str | Path | None = None) -> Circuit:
    """Read a Bookshelf circuit from its .aux (or .aux.gz); `pl` overrides the .pl it names."""
    aux = Path(aux)
    aux_file = _resolve(aux)
    if aux_file is None:
        raise BookshelfError(aux, 0, "file not found (nor with .gz)")
    files: dict[str, Path] = {}
    for lineno, tok in _records(aux_file):
        if ":" not in tok:
            raise BookshelfError(aux_file, lineno, "expected 'RowBasedPlacement : files...'")
        for name in tok[tok.index(":") + 1 :]:
            if Path(name).suffix not in _REQUIRED:
                continue  # .wts and the like: not needed for placement
            path = _resolve(aux_file.parent / name)
            if path is None:
                raise BookshelfError(aux_file, lineno, f"{name} not found in {aux_file.parent} (nor with .gz)")
            files[Path(name).suffix] = path
    missing = _REQUIRED - files.keys()
    if missing:
        raise BookshelfError(aux_file, 1, f"the .aux names no {', '.join(sorted(missing))} file")
    names, sizes, terminal = _read_nodes(files[".nodes"])
    index = {n: i for i, n in enumerate(names)}
    net_names, pin_node, pin_offset, pin_dir, pin_net = _read_nets(files[".nets"], index)
    pl_file = files[".pl"] if pl is None else Path(pl)
    positions, orient, fixed = read_pl(pl_file, index)
    canvas, row_height = _read_scl(files[".scl"])
    name = aux_file.name.split(".")[0]
    return Circuit(
        name, names, sizes, positions, orient, terminal, terminal | fixed,
        net_names, pin_node, pin_offset, pin_dir, pin_net, canvas, row_height,
    )  # fmt: skip


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def write_pl(circuit: Circuit, path: str | Path, lower_left: np.ndarray | None = None) -> Path:
    """Write a UCLA pl 1.0 file: `name x y : orient`, `/FIXED` on fixed nodes; returns the path.

    Positions are lower-left corners [N, 2] (default: circuit.positions), written exactly.
    """
    ll = circuit.positions if lower_left is None else circuit.with_positions(lower_left).positions
    lines = ["UCLA pl 1.0", "# written by placement_compile", ""]
    for i, name in enumerate(circuit.node_names):
        fixed = " /FIXED" if circuit.is_fixed[i] else ""
        lines.append(f"{name} {_num(ll[i, 0])} {_num(ll[i, 1])} : {circuit.orient[i]}{fixed}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
