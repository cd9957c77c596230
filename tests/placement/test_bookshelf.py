"""Bookshelf reader and .pl writer: IBM counts, round trip, gzip, malformed input."""
from __future__ import annotations

import functools
import gzip
import shutil

import numpy as np
import pytest

from placement_compile.bookshelf import BookshelfError, Circuit, iccad04_aux, read_bookshelf, write_pl
from tests.placement.tiny_circuit import FILES, write_tiny

# Checked against the headers (NumNodes, NumTerminals, NumNets, NumPins) of each file;
# macros = movable nodes taller than the 16-unit rows; canvas from the .scl rows.
IBM = {
    # name: (nodes, nets, pins, terminals, macros, canvas)
    "ibm01": (12752, 14111, 50566, 246, 246, (0.0, 0.0, 2295.0, 2304.0)),
    "ibm02": (19601, 19584, 81199, 259, 271, (0.0, 0.0, 3256.0, 3248.0)),
    "ibm03": (23136, 27401, 93573, 283, 290, (0.0, 0.0, 3512.0, 3504.0)),
    "ibm04": (27507, 31970, 105859, 287, 295, (0.0, 0.0, 3409.0, 3408.0)),
    "ibm05": (29347, 28446, 126308, 1201, 0, (0.0, 0.0, 2360.0, 2368.0)),
    "ibm06": (32498, 34826, 128182, 166, 178, (0.0, 0.0, 3265.0, 3264.0)),
}


@functools.lru_cache(maxsize=None)
def ibm(name: str) -> Circuit:
    aux = iccad04_aux(name)
    if not aux.with_name(aux.name + ".gz").exists():
        pytest.skip(f"{aux}.gz not found: set FOE_DATA_DIR to the folder holding iccad04/")
    return read_bookshelf(aux)


def _equal(a: Circuit, b: Circuit) -> bool:
    return all(
        np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
        for x, y in zip(a.__dict__.values(), b.__dict__.values())
    )


@pytest.mark.parametrize("name", sorted(IBM))
def test_ibm_counts(name):
    c = ibm(name)
    nodes, nets, pins, terminals, macros, canvas = IBM[name]
    assert (c.num_nodes, c.num_nets, c.num_pins) == (nodes, nets, pins)
    assert (int(c.is_terminal.sum()), c.num_macros, c.canvas, c.row_height) == (terminals, macros, canvas, 16.0)
    assert np.array_equal(c.is_fixed, c.is_terminal)
    assert c.pin_net.min() == 0 and c.pin_net.max() == nets - 1 and np.all(np.diff(c.pin_net) >= 0)


def test_tiny_circuit_fields(tmp_path):
    c = read_bookshelf(write_tiny(tmp_path))
    assert c.node_names == ["A", "B", "c", "P"]
    assert c.sizes.tolist() == [[2, 2], [2, 3], [1, 1], [1, 1]]
    assert c.positions.tolist() == [[0, 0], [5, 5], [3, 0], [9, 9]]
    assert c.is_fixed.tolist() == [False, False, False, True]
    assert c.is_macro.tolist() == [True, True, False, False]
    assert c.net_names == ["n0", "n1", "n2", "n3"]
    assert c.pin_node.tolist() == [0, 1, 2, 1, 3, 2, 3, 0, 0]
    assert c.pin_dir.tolist() == ["O", "I", "I", "O", "I", "O", "I", "B", "B"]
    assert c.pin_offset[[0, 1, 2, 8]].tolist() == [[1, 0], [-1, 1.5], [0, 0], [1, 1]]
    assert c.canvas == (0.0, 0.0, 10.0, 10.0) and c.row_height == 1.0


def test_gzip_is_transparent(tmp_path):
    plain = read_bookshelf(write_tiny(tmp_path / "plain"))
    aux = write_tiny(tmp_path / "gz", gz=True)
    assert not aux.exists()  # only tiny.aux.gz, named as tiny.aux
    assert _equal(read_bookshelf(aux), plain)


def test_pl_round_trip_ibm01(tmp_path):
    c = ibm("ibm01")
    back = read_bookshelf(iccad04_aux("ibm01"), pl=write_pl(c, tmp_path / "a.pl"))
    assert _equal(back, c)
    # Arbitrary (non-integer) positions survive exactly, and rewriting gives the same bytes.
    moved = c.positions + np.random.default_rng(0).uniform(-0.5, 0.5, c.positions.shape)
    back = read_bookshelf(iccad04_aux("ibm01"), pl=write_pl(c, tmp_path / "b.pl", moved))
    assert np.array_equal(back.positions, moved)
    write_pl(back, tmp_path / "c.pl")
    assert (tmp_path / "b.pl").read_bytes() == (tmp_path / "c.pl").read_bytes()
    lines = (tmp_path / "a.pl").read_text().splitlines()
    assert lines[0] == "UCLA pl 1.0" and lines[3] == "p1 0 2303 : N /FIXED"


def _error(tmp_path, **replace) -> BookshelfError:
    with pytest.raises(BookshelfError) as info:
        read_bookshelf(write_tiny(tmp_path, **replace))
    assert isinstance(info.value, ValueError)
    return info.value


@pytest.mark.parametrize(
    "replace,file,line,words",
    [
        ({"tiny_nodes": FILES["tiny.nodes"].replace("B 2 3", "B -2 3")}, "tiny.nodes", 6, "negative size"),
        ({"tiny_nodes": FILES["tiny.nodes"].replace("P 1 1 terminal\n", "")}, "tiny.nodes", 7, "NumNodes is 4"),
        ({"tiny_nodes": FILES["tiny.nodes"].replace("B 2 3", "B 2 x")}, "tiny.nodes", 6, "expected numbers"),
        ({"tiny_nets": FILES["tiny.nets"].replace("3 n0", "4 n0")}, "tiny.nets", 9, "NetDegree 4 but 3 pins"),
        ({"tiny_nets": FILES["tiny.nets"].replace("3 n0", "2 n0")}, "tiny.nets", 8, "outside a NetDegree"),
        ({"tiny_nets": FILES["tiny.nets"].replace("  c I\n", "  zz I\n")}, "tiny.nets", 8, "unknown node 'zz'"),
        ({"tiny_nets": FILES["tiny.nets"].rsplit("  A B", 1)[0]}, "tiny.nets", 16, "NetDegree 2 but 1 pins"),
        ({"tiny_nets": FILES["tiny.nets"].replace("NumPins : 9", "NumPins : 10")}, "tiny.nets", 17, "NumPins is 10"),
        ({"tiny_pl": FILES["tiny.pl"].replace("c 3 0", "q 3 0")}, "tiny.pl", 5, "unknown node 'q'"),
        ({"tiny_scl": FILES["tiny.scl"].rsplit("End", 1)[0]}, "tiny.scl", 91, "inside a CoreRow"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, replace, file, line, words):
    err = _error(tmp_path, **replace)
    assert str(err).startswith(f"{tmp_path / file}:{line}: ") and words in str(err)
    assert (err.path, err.line) == (str(tmp_path / file), line)


def test_missing_files(tmp_path):
    aux = write_tiny(tmp_path)
    (tmp_path / "tiny.scl").unlink()
    with pytest.raises(BookshelfError, match=r"tiny\.aux:1: tiny\.scl not found"):
        read_bookshelf(aux)
    with pytest.raises(BookshelfError, match="nope.aux:0: file not found"):
        read_bookshelf(tmp_path / "nope.aux")


def test_truncated_ibm_nets(tmp_path):
    src = iccad04_aux("ibm01").parent
    ibm("ibm01")  # skips without the data
    for ext in ("aux", "nodes", "pl", "scl"):
        shutil.copy(src / f"ibm01.{ext}.gz", tmp_path)
    lines = gzip.decompress((src / "ibm01.nets.gz").read_bytes()).decode().splitlines()
    (tmp_path / "ibm01.nets").write_text("\n".join(lines[:5000]) + "\n")
    with pytest.raises(BookshelfError) as info:
        read_bookshelf(tmp_path / "ibm01.aux")
    assert str(info.value).startswith(f"{tmp_path / 'ibm01.nets'}:")
    assert 4990 <= info.value.line <= 5000
