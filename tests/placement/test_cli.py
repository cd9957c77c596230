import json

import numpy as np
import pytest

from placement_compile.bookshelf import iccad04_aux, read_bookshelf
from placement_compile.cli import main

TINY = ["--steps", "3", "--samples", "2", "--guidance-steps", "2", "--legalizer-steps", "100", "--quiet"]


def test_place_ibm01_writes_pl_png_json_and_pl_reads_back(tmp_path, capsys):
    aux = iccad04_aux("ibm01")
    assert main(["place", str(aux), "--out", str(tmp_path), *TINY]) == 0
    report = json.loads((tmp_path / "ibm01.json").read_text())
    assert (tmp_path / "ibm01.png").stat().st_size > 10_000
    placed = report["placed"]
    assert placed["num_macros"] == 246
    for key in ("hpwl_full_bookshelf_units", "hpwl_macro_only_bookshelf_units", "hpwl_macro_view_normalised",
                "macro_legality", "macro_overlap_area_bookshelf_units"):
        assert np.isfinite(placed[key]), key
    assert {"denoiser_seconds", "guidance_seconds", "legalizer_seconds", "total_seconds"} <= set(report["times"])

    original = read_bookshelf(aux)
    back = read_bookshelf(aux, pl=tmp_path / "ibm01.pl")
    fixed_or_cell = ~original.is_macro
    np.testing.assert_array_equal(back.positions[fixed_or_cell], original.positions[fixed_or_cell])
    assert not np.array_equal(back.positions[original.is_macro], original.positions[original.is_macro])

    capsys.readouterr()
    assert main(["evaluate", str(aux), str(tmp_path / "ibm01.pl")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    for key, value in placed.items():
        assert evaluated[key] == pytest.approx(value, rel=1e-9), key


def test_place_ibm05_without_macros_is_a_valid_empty_result(tmp_path):
    aux = iccad04_aux("ibm05")
    assert main(["place", str(aux), "--out", str(tmp_path), *TINY]) == 0
    report = json.loads((tmp_path / "ibm05.json").read_text())
    assert report["placed"]["num_macros"] == 0
    assert report["placed"]["macro_legality"] == 1.0
    assert report["warnings"] == ["ibm05 has no macros (no movable node taller than a row, 16): nothing was placed; "
                                  "the .pl repeats the input placement"]
    assert report["placed"]["hpwl_full_bookshelf_units"] == pytest.approx(
        report["input_placement"]["hpwl_full_bookshelf_units"])
    back = read_bookshelf(aux, pl=tmp_path / "ibm05.pl")
    np.testing.assert_array_equal(back.positions, read_bookshelf(aux).positions)


def test_bad_input_gives_an_error_message(tmp_path, capsys):
    assert main(["place", str(tmp_path / "missing.aux"), "--out", str(tmp_path), *TINY]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["place", str(iccad04_aux("ibm01")), "--checkpoint", str(tmp_path / "none.pt"), *TINY]) == 2
    assert "checkpoint" in capsys.readouterr().err
