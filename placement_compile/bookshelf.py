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
ValueError) whose message starts with `file:line:` (line 0: the file as a whole). Refused: a
directory or a corrupt/truncated .gz where a file is expected, non-finite numbers (nan, inf),
a node defined twice, a .pl that lists a node twice, omits one, names one the .nodes lacks or
ends mid-line (truncated), rows of non-positive height or site spacing, an empty canvas.
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from placement_compile.files import atomic_path


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


def _read_text(path: Path) -> str:
    """The file's text, gunzipped when it is gzip data (whatever its name)."""
    if path.is_dir():
        raise BookshelfError(path, 0, "is a directory; expected a Bookshelf file")
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as err:
            raise BookshelfError(path, 0, f"corrupt or truncated gzip data ({err}); re-copy or re-compress the file") from err
    return data.decode("ascii", errors="replace")


def _records_of(text: str):
    """(line number, tokens) of every non-empty, non-comment, non-header line of `text`."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        tok = line.split("#", 1)[0].split()
        if tok and tok[0] != "UCLA":
            yield lineno, tok


def _records(path: Path):
    return _records_of(_read_text(path))


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


def _check_finite(values: np.ndarray, path: Path) -> None:
    """BookshelfError at the first line of `path` with a nan/inf number, if `values` hold any.

    NOTE: checked once per file on the parsed array; only a failing file is scanned again for
    the line (a per-number check made reading ibm06 ~7% slower: 0.44 -> 0.46 s CPU).
    """
    if np.isfinite(values).all():
        return
    for lineno, tok in _records(path):
        for t in tok[1:]:  # tok[0] is a name or a keyword (a node may be called "inf")
            try:
                bad = not math.isfinite(float(t))
            except ValueError:
                continue
            if bad:
                raise BookshelfError(path, lineno, f"non-finite number in {' '.join(tok)!r}; every size, "
                                                   f"position and offset must be finite")
    raise BookshelfError(path, 0, "non-finite number (nan or inf); every size, position and offset must be finite")


def _read_nodes(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names: list[str] = []
    sizes: list[list[float]] = []
    terminal: list[bool] = []
    declared: dict[str, int] = {}
    line_of: dict[str, int] = {}
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
        first = line_of.setdefault(tok[0], lineno)
        if first != lineno:
            raise BookshelfError(path, lineno, f"node {tok[0]} is defined twice (first at line {first}); node names must be unique")
        names.append(tok[0])
        sizes.append([w, h])
        terminal.append(len(tok) > 3 and tok[3].startswith("terminal"))
    counts = {"NumNodes": len(names), "NumTerminals": sum(terminal)}
    for key, want in declared.items():
        if counts[key] != want:
            raise BookshelfError(path, last, f"{key} is {want} but the file has {counts[key]} (truncated?)")
    size_array = np.array(sizes, dtype=np.float64).reshape(-1, 2)
    _check_finite(size_array, path)
    return names, size_array, np.array(terminal, dtype=bool)


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
    offsets = np.array(pin_offset, dtype=np.float64).reshape(-1, 2)
    _check_finite(offsets, path)
    counts = {"NumNets": len(net_names), "NumPins": len(pin_node)}
    for key, want in declared.items():
        if counts[key] != want:
            raise BookshelfError(path, last, f"{key} is {want} but the file has {counts[key]} (truncated?)")
    return (
        net_names,
        np.array(pin_node, dtype=np.int64),
        offsets,
        np.array(pin_dir, dtype="<U1"),
        np.array(pin_net, dtype=np.int64),
    )


def _read_pl(path: Path, index: dict[str, int], circuit: str):
    """read_pl's arrays plus the line of every node's record [N] (int64)."""
    n = len(index)
    pos = np.zeros((n, 2), dtype=np.float64)
    orient = ["N"] * n
    fixed = np.zeros(n, dtype=bool)
    line = np.zeros(n, dtype=np.int64)  # 0: not listed
    unknown: list[tuple[int, str]] = []
    text = _read_text(path)
    # NOTE: a record cut inside a number ("a7 10 23" for "a7 10 2304 : N") would parse; a last line
    # with no newline after it and without its ": orient" is how such a cut shows.
    cut_line = 0 if text.endswith(("\n", "\r")) else len(text.splitlines())
    last = 0
    for lineno, tok in _records_of(text):
        last = lineno
        if lineno == cut_line and (len(tok) < 5 or tok[3] != ":"):
            raise BookshelfError(path, lineno, f"the file ends mid-line at {' '.join(tok)!r} (truncated?)")
        node = index.get(tok[0])
        if node is None:
            unknown.append((lineno, tok[0]))
            continue
        if line[node]:
            raise BookshelfError(path, lineno, f"node {tok[0]} is listed twice (first at line {line[node]})")
        if len(tok) < 3:
            raise BookshelfError(path, lineno, f"expected 'name x y : orient', got {' '.join(tok)!r} (truncated?)")
        pos[node] = _floats(tok[1:3], path, lineno)
        line[node] = lineno
        rest = [t for t in tok[3:] if t != ":"]
        if rest and not rest[0].startswith("/"):
            orient[node] = rest[0]
        fixed[node] = any(t.startswith("/FIXED") for t in rest)
    _check_finite(pos, path)
    if unknown:
        lineno, name = unknown[0]
        more = f" (and {len(unknown) - 1} more names)" if len(unknown) > 1 else ""
        raise BookshelfError(path, lineno, f"unknown node {name!r}{more}: not a node of {circuit}; "
                                           f"is this .pl from another circuit?")
    missing = np.flatnonzero(line == 0)
    if len(missing):
        names = list(index)
        first = ", ".join(names[i] for i in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise BookshelfError(path, last, f"{len(missing)} of the {n} nodes of {circuit} are not listed ({first}); "
                                         f"a .pl must place every node: is it truncated or from another circuit?")
    return pos, orient, fixed, line


def read_pl(path: str | Path, index: dict[str, int], circuit: str = "the circuit") -> tuple[np.ndarray, list[str], np.ndarray]:
    """Lower-left positions [N, 2], orientations [N] and /FIXED flags [N] from a .pl file.

    `index` maps node names to rows. The file must list every node once, and no other name
    (BookshelfError otherwise; `circuit` names the circuit in the message).
    """
    pos, orient, fixed, _ = _read_pl(Path(path), index, circuit)
    return pos, orient, fixed


_ROW_KEYS = {"coordinate", "height", "sitespacing", "subroworigin", "numsites"}


def _read_scl(path: Path) -> tuple[tuple[float, float, float, float], float]:
    """Canvas (x0, y0, w, h) and row height from the rows of a .scl file."""
    rows: list[dict[str, float]] = []
    row: dict[str, float] | None = None
    declared, last, start = None, 0, 0
    for lineno, tok in _records(path):
        last = lineno
        if tok[0].lower() == "numrows":
            declared = _header(tok, path, lineno)
        elif tok[0] == "CoreRow":
            row, start = {}, lineno
        elif tok[0] == "End":
            if row is None:
                raise BookshelfError(path, lineno, "End without CoreRow")
            missing = {"coordinate", "height", "subroworigin", "numsites"} - row.keys()
            if missing:
                raise BookshelfError(path, lineno, f"row lacks {', '.join(sorted(missing))}")
            if row["height"] <= 0:
                raise BookshelfError(path, start, f"row has Height {row['height']:g}; rows need a positive height "
                                                  f"(the row height decides which nodes are macros)")
            if row.get("sitespacing", 1.0) <= 0 or row["numsites"] < 0:
                raise BookshelfError(path, start, f"row has Sitespacing {row.get('sitespacing', 1.0):g} and Numsites "
                                                  f"{row['numsites']:g}; both must be positive")
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
    _check_finite(np.array([v for r in rows for v in r.values()]), path)
    x0 = min(r["subroworigin"] for r in rows)
    x1 = max(r["subroworigin"] + r["numsites"] * r.get("sitespacing", 1.0) for r in rows)
    y0 = min(r["coordinate"] for r in rows)
    y1 = max(r["coordinate"] + r["height"] for r in rows)
    if x1 <= x0:
        raise BookshelfError(path, last, f"the rows span an empty canvas (x from {x0:g} to {x1:g})")
    return (x0, y0, x1 - x0, y1 - y0), min(r["height"] for r in rows)


_REQUIRED = {".nodes", ".nets", ".pl", ".scl"}


def read_bookshelf(aux: str | Path, pl: str | Path | None = None, check_fixed: bool = False) -> Circuit:
    """Read a Bookshelf circuit from its .aux (or .aux.gz); `pl` overrides the .pl it names.

    With `pl`, positions and orientations come from that file, but which nodes are fixed comes
    from the circuit's own .pl. With `check_fixed`, every fixed node (pad) must also sit where
    the circuit's own .pl puts it (BookshelfError otherwise: such a .pl is another circuit's, or
    moves pads; what `placement-compile evaluate` needs).
    """
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
    name = aux_file.name.split(".")[0]
    names, sizes, terminal = _read_nodes(files[".nodes"])
    index = {n: i for i, n in enumerate(names)}
    net_names, pin_node, pin_offset, pin_dir, pin_net = _read_nets(files[".nets"], index)
    canvas, row_height = _read_scl(files[".scl"])
    positions, orient, fixed, _ = _read_pl(files[".pl"], index, name)
    if pl is not None:
        pl_file = _resolve(Path(pl))
        if pl_file is None:
            raise BookshelfError(pl, 0, "file not found (nor with .gz)")
        own = positions
        positions, orient, _, line = _read_pl(pl_file, index, name)
        pads = (terminal | fixed) if check_fixed else np.zeros_like(fixed)
        tol = 1e-6 * max(canvas[2], canvas[3])
        moved = np.flatnonzero(pads & (np.abs(positions - own) > tol).any(1))
        if len(moved):
            i = moved[0]
            raise BookshelfError(pl_file, int(line[i]), (
                f"fixed node {names[i]} is at ({positions[i, 0]:g}, {positions[i, 1]:g}) but {files['.pl'].name} "
                f"of {name} fixes it at ({own[i, 0]:g}, {own[i, 1]:g}) ({len(moved)} fixed nodes moved); "
                f"fixed nodes cannot move: is this .pl from another circuit?"))
    return Circuit(
        name, names, sizes, positions, orient, terminal, terminal | fixed,
        net_names, pin_node, pin_offset, pin_dir, pin_net, canvas, row_height,
    )  # fmt: skip


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def write_pl(circuit: Circuit, path: str | Path, lower_left: np.ndarray | None = None) -> Path:
    """Write a UCLA pl 1.0 file: `name x y : orient`, `/FIXED` on fixed nodes; returns the path.

    Positions are lower-left corners [N, 2] (default: circuit.positions), written exactly; they
    must be finite. The file appears complete or not at all (written under a temporary name).
    """
    ll = circuit.positions if lower_left is None else circuit.with_positions(lower_left).positions
    if not np.isfinite(ll).all():
        bad = int(np.flatnonzero(~np.isfinite(ll).all(1))[0])
        raise ValueError(f"position of node {circuit.node_names[bad]} is {ll[bad].tolist()}; a .pl needs finite positions")
    lines = ["UCLA pl 1.0", "# written by placement_compile", ""]
    for i, name in enumerate(circuit.node_names):
        fixed = " /FIXED" if circuit.is_fixed[i] else ""
        lines.append(f"{name} {_num(ll[i, 0])} {_num(ll[i, 1])} : {circuit.orient[i]}{fixed}")
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
