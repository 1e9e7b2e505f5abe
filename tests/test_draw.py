"""``diffgen draw``: captions with index and flags, SVG output, atoms that break their valence highlighted."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from test_cli import assert_one_line_error, run_cli

from diffgen.eval.draw import HIGHLIGHT, caption, depiction, draw_grid

# methane (tetrahedral, C-H 1.09 Å) and water (O-H 0.96 Å, 104.5 degrees)
_T = np.array([[1, 1, 1], [-1, -1, 1], [-1, 1, -1], [1, -1, -1]]) / np.sqrt(3)
METHANE = (np.array([6, 1, 1, 1, 1]), np.vstack([[0, 0, 0], 1.09 * _T]))
_A = np.deg2rad(104.5) / 2
WATER = (np.array([8, 1, 1]), np.array([[0, 0, 0], [0.96 * np.sin(_A), 0.96 * np.cos(_A), 0],
                                          [-0.96 * np.sin(_A), 0.96 * np.cos(_A), 0]]))
METHYL = (METHANE[0][:4], METHANE[1][:4])  # CH3: the carbon has valence 3 of 4
FAR_WATER = (WATER[0], WATER[1] + 10.0)
TWO = (np.concatenate([METHANE[0], FAR_WATER[0]]), np.vstack([METHANE[1], FAR_WATER[1]]))


def test_depiction_flags_and_highlight():
    mol, hl, flags = depiction(*METHANE)
    assert hl == [] and flags["unstable_atoms"] == 0 and mol.GetNumAtoms() == 1  # hydrogens with one bond hidden
    assert caption(3, flags) == "#3 C\nstable, valid"
    mol, hl, flags = depiction(*METHYL)
    assert [mol.GetAtomWithIdx(i).GetSymbol() for i in hl] == ["C"]  # the carbon that breaks its valence
    assert caption(1, flags) == "#1 C\n1 atom unstable, valid +1 H"
    _, hl, flags = depiction(*TWO)
    assert hl == [] and caption(2, flags) == "#2 C\nstable, valid, 2 fragments"  # SMILES of the largest fragment


def test_unbonded_hydrogen_stays_visible_and_highlighted():
    z, pos = METHANE
    lone = (np.append(z, 1), np.vstack([pos, [5.0, 0, 0]]))  # an H with no bond: unstable, kept in the drawing
    mol, hl, flags = depiction(*lone)
    assert [mol.GetAtomWithIdx(i).GetSymbol() for i in hl] == ["H"] and flags["unstable_atoms"] == 1
    assert "1 atom unstable" in caption(1, flags) and "2 fragments" in caption(1, flags)


def _svg_text(path: Path) -> str:
    return "".join(re.findall(r"<text[^>]*>([^<]*)</text>", path.read_text()))


def test_svg_grid_has_captions_and_highlights_only_where_a_valence_breaks(tmp_path: Path):
    colour = "#{:02X}{:02X}{:02X}".format(*(round(255 * c) for c in HIGHLIGHT))
    good = draw_grid([METHANE, WATER], tmp_path / "good.svg", start=5)
    text = _svg_text(good)
    assert "#5 C" in text and "#6 O" in text and "stable, valid" in text
    assert colour not in good.read_text().upper()
    bad = draw_grid([METHANE, METHYL], tmp_path / "bad.svg")
    assert "1 atom unstable, valid +1 H" in _svg_text(bad) and colour in bad.read_text().upper()


def test_draw_cli_png_and_svg(tmp_path: Path):
    sdf = Path(__file__).resolve().parents[1] / "samples" / "samples.sdf"
    res = run_cli("draw", str(sdf), "--out", str(tmp_path / "g.svg"), "--n", "3")
    assert res.returncode == 0, res.stderr
    text = _svg_text(tmp_path / "g.svg")
    assert all(f"#{k} " in text for k in (1, 2, 3)) and "#4 " not in text
    res = run_cli("draw", str(sdf), "--out", str(tmp_path / "g.png"), "--n", "2")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_draw_cli_bad_input(tmp_path: Path):
    bad = tmp_path / "bad.sdf"
    bad.write_text("garbage\nmore garbage\n")
    res = run_cli("draw", str(bad), "--out", str(tmp_path / "g.svg"))
    assert res.returncode == 2
    assert_one_line_error(res, "bad.sdf")
    assert not (tmp_path / "g.svg").exists()
    assert_one_line_error(run_cli("draw", str(bad), "--out", str(tmp_path / "g.jpg")), "must end in .png or .svg")
