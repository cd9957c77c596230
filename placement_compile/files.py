"""Files: atomic output (write under a temporary name in the destination folder, rename when
complete) and checked reading of torch-saved files (one clear error for a broken file).

A reader (or a later run) therefore sees either the previous complete file or the new complete
file, never a half-written one; on failure the temporary file is removed. Temporary names are
hidden and end in `.partial` (`.ibm01.pl.<pid>-<token>.partial`), so even one left behind by a
killed process does not look like a result.

Example::

    with atomic_path(out / "ibm01.json") as tmp:
        tmp.write_text(text)          # renamed to out/ibm01.json when the block succeeds
    blob = load_torch_file("runs/small/last.pt", "training checkpoint")
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def partial_name(path: Path) -> Path:
    """The temporary sibling of `path` that atomic_path writes to."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds, else delete it.

    Refuses (ValueError) a `path` that is an existing directory, or whose folder does not exist,
    before anything is written.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a file name to write")
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: {path.parent} is not an existing directory")
    tmp = partial_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to {tmp} for {path}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _unreadable(head: bytes, err: Exception) -> str:
    """Why torch.load failed, in words: the file's first bytes `head` and the exception it raised."""
    msg = str(err)
    if not head:
        return "the file is empty"
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive (old format: a pickle)
        return f"not a torch.save file (it starts with {head[:8]!r})"
    if "zip archive" in msg or "central directory" in msg or isinstance(err, EOFError):
        return "the file is truncated or damaged (incomplete archive)"
    if "Weights only load failed" in msg:
        return "it holds Python objects, not only tensors and plain containers"
    return f"{type(err).__name__}: {(msg.strip().splitlines() or [''])[0][:120]}"


def load_torch_file(path: str | Path, what: str) -> Any:
    """torch.load(path, weights_only=True) on CPU; a missing, directory, empty, truncated or non-torch
    file raises one ValueError line that names the file, says what is wrong and what to do.

    `what` names the file's role in messages ("checkpoint", "dataset shard", ...).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; expected a file")
    if not path.is_file():
        raise ValueError(f"{what} {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the unpickler or zip reader says, the file is unusable
        with open(path, "rb") as f:
            head = f.read(8)
        raise ValueError(f"{path}: cannot read this {what}: {_unreadable(head, err)}; "
                         f"write it again or pass another file") from err
