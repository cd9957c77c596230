"""Circuits shipped inside the package, so the README's commands run from a clone alone.

`placement_compile/circuits/<name>/` holds the gzipped Bookshelf files of each built-in circuit,
byte-for-byte copies of `../shared/data/iccad04/<name>/` (every file its .aux names; the reader
gunzips them transparently). They are package data (pyproject.toml), so an installed wheel has
them too. Today: ibm01, the demo's circuit (~0.4 MB gzipped).

The command line accepts a built-in name wherever it takes a circuit's .aux:

    placement-compile place ibm01 --out out/ibm01
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from placement_compile.bookshelf import BookshelfError

BUILTIN_CIRCUITS = ("ibm01",)


def builtin_aux(name: str) -> Path:
    """The .aux path of built-in circuit `name` in the installed package's data.

    The file on disk is `<name>.aux.gz`; `read_bookshelf` resolves the plain name to it.
    """
    if name not in BUILTIN_CIRCUITS:
        raise ValueError(f"{name!r} is not a built-in circuit (built-in: {', '.join(BUILTIN_CIRCUITS)})")
    # files() is a real directory for a regular or editable install (not a zipped package).
    root = Path(str(resources.files("placement_compile") / "circuits"))
    return root / name / f"{name}.aux"


def resolve_circuit(arg: str | Path) -> Path:
    """The .aux to read for a command-line circuit argument: a path or a built-in name.

    An existing file (or its .gz) wins, so a local file called like a built-in is still read; then
    a built-in name; then an existing path that is not a file (the reader refuses it with its own
    message). Anything else raises BookshelfError: not found, with the built-in names.
    """
    path = Path(arg)
    if path.is_file() or (path.name and path.with_name(path.name + ".gz").is_file()):
        return path
    if str(arg) in BUILTIN_CIRCUITS:
        return builtin_aux(str(arg))
    if path.exists():
        return path
    raise BookshelfError(path, 0, f"file not found (nor with .gz), and not a built-in circuit name "
                                  f"(built-in: {', '.join(BUILTIN_CIRCUITS)})")
