"""The circuits shipped in the package (placement_compile/circuits/): the demo's ibm01 runs from a
clone of the repository alone, by name, and is the shared ICCAD04 copy node for node."""
import gzip
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from placement_compile.bookshelf import read_bookshelf
from placement_compile.builtin_circuits import BUILTIN_CIRCUITS, builtin_aux, resolve_circuit
from placement_compile.cli import main

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "placement_compile"
SHARED_IBM01 = REPO.parent / "shared" / "data" / "iccad04" / "ibm01"
TINY = ["--steps", "2", "--samples", "2", "--guidance-steps", "1", "--legalizer-steps", "20", "--quiet"]


def _aux_files(aux: Path) -> list[str]:
    """The file names the (gzipped) .aux lists."""
    text = gzip.decompress(aux.with_name(aux.name + ".gz").read_bytes()).decode()
    return text.split(":", 1)[1].split()


def test_ibm01_resolves_to_the_installed_package_data():
    package_dir = Path(str(resources.files("placement_compile")))
    aux = resolve_circuit("ibm01")
    assert aux == builtin_aux("ibm01") == package_dir / "circuits" / "ibm01" / "ibm01.aux"
    names = _aux_files(aux)
    assert names == ["ibm01.nodes", "ibm01.nets", "ibm01.wts", "ibm01.pl", "ibm01.scl"]
    for name in names:  # every file the .aux names ships (gzipped)
        assert (aux.parent / f"{name}.gz").is_file(), name
    circuit = read_bookshelf(aux)
    assert (circuit.name, circuit.num_nodes, circuit.num_nets, circuit.num_macros) == ("ibm01", 12752, 14111, 246)


def test_package_data_globs_ship_every_circuit_file():
    """A non-editable wheel includes what [tool.setuptools.package-data] matches: all of circuits/."""
    tomllib = pytest.importorskip("tomllib")
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["placement_compile"]
    matched = {p for g in globs for p in PACKAGE.glob(g) if p.is_file()}
    shipped = {p for p in (PACKAGE / "circuits").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert shipped and shipped <= matched, sorted(str(p) for p in shipped - matched)
    assert {p.parent.name for p in shipped} == set(BUILTIN_CIRCUITS)


@pytest.mark.skipif(not SHARED_IBM01.is_dir(), reason="no ../shared/data/iccad04/ibm01 beside the repository")
def test_builtin_ibm01_equals_the_shared_copy_node_for_node():
    ours, shared = builtin_aux("ibm01"), SHARED_IBM01 / "ibm01.aux"
    assert sorted(p.name for p in ours.parent.iterdir()) == sorted(p.name for p in SHARED_IBM01.iterdir())
    for path in SHARED_IBM01.iterdir():
        assert gzip.decompress((ours.parent / path.name).read_bytes()) == gzip.decompress(path.read_bytes()), path.name
    a, b = read_bookshelf(ours), read_bookshelf(shared)
    assert a.name == b.name and a.node_names == b.node_names and a.net_names == b.net_names and a.orient == b.orient
    assert a.canvas == b.canvas and a.row_height == b.row_height
    for field in ("sizes", "positions", "is_terminal", "is_fixed", "pin_node", "pin_offset", "pin_dir", "pin_net"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_an_existing_file_wins_over_a_builtin_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ibm01").mkdir()  # a directory of that name is not a circuit file: the built-in is meant
    assert resolve_circuit("ibm01") == builtin_aux("ibm01")
    (tmp_path / "ibm01").rmdir()
    (tmp_path / "ibm01").write_text("RowBasedPlacement : x.nodes\n")
    assert resolve_circuit("ibm01") == Path("ibm01")
    assert resolve_circuit(tmp_path / "ibm01") == tmp_path / "ibm01"


@pytest.mark.parametrize("command", ["place", "evaluate"])
def test_unknown_name_is_one_error_line_listing_the_builtins(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ["--out", str(tmp_path / "out"), *TINY] if command == "place" else []
    assert main([command, "ibm99", *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"placement-compile {command}: error: ibm99:"), captured.err
    assert "not found" in lines[0] and "built-in: ibm01" in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_place_and_evaluate_accept_the_builtin_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file called ibm01 here: the name is the built-in circuit
    assert main(["place", "ibm01", "--out", "out/ibm01", *TINY]) == 0
    report = json.loads((tmp_path / "out" / "ibm01" / "ibm01.json").read_text())
    assert report["circuit"] == str(builtin_aux("ibm01"))
    assert report["placed"]["num_macros"] == 246
    capsys.readouterr()
    assert main(["evaluate", "ibm01", "out/ibm01/ibm01.pl"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    for key, value in report["placed"].items():
        assert evaluated[key] == pytest.approx(value, rel=1e-9), key
    assert main(["evaluate", "ibm01"]) == 0  # the circuit's own .pl
    assert json.loads(capsys.readouterr().out)["hpwl_full_bookshelf_units"] == pytest.approx(
        report["input_placement"]["hpwl_full_bookshelf_units"], rel=1e-9)
