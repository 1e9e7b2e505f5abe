"""Tests of molecule file I/O (SDF / XYZ) and its one-line error messages."""
from __future__ import annotations

import numpy as np
import pytest
from rdkit import Chem

from diffgen.errors import DiffgenError
from diffgen.eval.bonds import bond_orders
from diffgen.io import ensure_new, read_molecules, write_sdf, write_xyz

TET = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=float) / np.sqrt(3.0)


def molecules():
    rng = np.random.default_rng(1)
    methane = (np.array([6, 1, 1, 1, 1]), np.vstack([np.zeros(3), 1.09 * TET]) + rng.normal(0, 0.01, (5, 3)))
    # C=O at 1.18 Å: the experimental CO2 1.16 Å is already below the EDM triple threshold (113 + 3 pm)
    co2 = (np.array([8, 6, 8]), np.array([[-1.18, 0.0, 0.0], [0.0, 0.0, 0.0], [1.18, 0.0, 0.0]]) + 0.123456)
    # a chemically invalid sample (pentavalent carbon) must still be written and read back
    dirs = np.array([[0, 0, 1], [0, 0, -1], [1, 0, 0], [-0.5, np.sqrt(3) / 2, 0], [-0.5, -np.sqrt(3) / 2, 0]])
    bad = (np.array([6, 1, 1, 1, 1, 1]), np.vstack([np.zeros(3), 1.09 * dirs]) - 3.3)
    hf = (np.array([9, 1]), np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 1.22]]))
    return [methane, co2, bad, hf]


def assert_single_line_error(excinfo, *fragments):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_sdf_round_trip(tmp_path):
    mols = molecules()
    path = tmp_path / "out.sdf"
    props = [{"idx": i, "note": "line1\nline2" if i == 0 else "x", "skip": None} for i in range(len(mols))]
    write_sdf(path, mols, props=props)

    back = read_molecules(path)
    assert len(back) == len(mols)
    for (z, pos), (z2, pos2) in zip(mols, back):
        assert z2.dtype == np.int64 and pos2.dtype == np.float64
        assert np.array_equal(z, z2)
        np.testing.assert_allclose(pos2, pos, atol=1e-4)

    # plain RDKit reads it too, with the EDM bonds and the property tags
    supplier = Chem.SDMolSupplier(str(path), sanitize=False, removeHs=False)
    rd = list(supplier)
    assert all(m is not None for m in rd) and len(rd) == len(mols)
    for i, (m, (z, pos)) in enumerate(zip(rd, mols)):
        assert m.GetConformer().Is3D()
        b = bond_orders(z, pos)
        assert m.GetNumBonds() == int(np.count_nonzero(np.triu(b)))
        for bond in m.GetBonds():
            assert bond.GetBondTypeAsDouble() == b[bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()]
        assert m.GetProp("idx") == str(i)
        assert not m.HasProp("skip")
    assert rd[0].GetProp("note") == "line1 line2"
    # CO2 came out with two double bonds
    assert [b.GetBondType() for b in rd[1].GetBonds()] == [Chem.BondType.DOUBLE] * 2


def test_xyz_round_trip(tmp_path):
    mols = molecules()
    path = tmp_path / "out.xyz"
    write_xyz(path, mols, comments=[f"sample {i}\nx" for i in range(len(mols))])
    lines = path.read_text().splitlines()
    assert lines[0] == "5" and lines[1] == "sample 0 x"
    assert lines[2].split()[0] == "C" and len(lines[2].split()[1]) - lines[2].split()[1].index(".") - 1 == 6
    back = read_molecules(path)
    assert len(back) == len(mols)
    for (z, pos), (z2, pos2) in zip(mols, back):
        assert np.array_equal(z, z2)
        np.testing.assert_allclose(pos2, pos, atol=1e-6)


def test_xyz_reader_tolerates_blank_lines_extra_columns_and_atomic_numbers(tmp_path):
    path = tmp_path / "a.XYZ"
    path.write_text("\n2\ncomment\nc 0 0 0 0.5\n8 0 0 1.2\n\n\n1\n\nH 1e-1 -2 3.5\n\n")
    (z1, p1), (z2, p2) = read_molecules(path)
    assert z1.tolist() == [6, 8] and z2.tolist() == [1]
    np.testing.assert_allclose(p1, [[0, 0, 0], [0, 0, 1.2]])
    np.testing.assert_allclose(p2, [[0.1, -2, 3.5]])


def test_write_accepts_torch_and_rejects_bad_molecules(tmp_path):
    import torch

    z, pos = molecules()[0]
    write_xyz(tmp_path / "t.xyz", [(torch.tensor(z), torch.tensor(pos, dtype=torch.float32))])
    assert read_molecules(tmp_path / "t.xyz")[0][0].tolist() == z.tolist()
    with pytest.raises(DiffgenError) as e:
        write_sdf(tmp_path / "nan.sdf", [(z, np.full_like(pos, np.nan))])
    assert_single_line_error(e, "molecule 1", "non-finite")
    assert not (tmp_path / "nan.sdf").exists()
    with pytest.raises(DiffgenError) as e:
        write_xyz(tmp_path / "s.xyz", [(np.array([16]), np.zeros((1, 3)))])
    assert_single_line_error(e, "molecule 1", "unsupported")
    with pytest.raises(DiffgenError) as e:
        write_sdf(tmp_path / "p.sdf", [(z, pos)], props=[{}, {}])
    assert_single_line_error(e, "2 property dicts for 1 molecules")
    with pytest.raises(DiffgenError) as e:
        write_xyz(tmp_path / "missing_dir" / "a.xyz", [(z, pos)])
    assert_single_line_error(e, "does not exist")


def test_ensure_new(tmp_path):
    path = tmp_path / "a.sdf"
    assert ensure_new(path) == path
    write_sdf(path, molecules()[:1])
    with pytest.raises(DiffgenError) as e:
        ensure_new(path)
    assert_single_line_error(e, "already exists")
    with pytest.raises(DiffgenError):
        write_sdf(path, molecules()[:1], overwrite=False)
    with pytest.raises(DiffgenError):
        ensure_new(tmp_path)  # directories count too


# ---------------------------------------------------------------- read errors


def test_missing_file(tmp_path):
    with pytest.raises(DiffgenError) as e:
        read_molecules(tmp_path / "nope.sdf")
    assert_single_line_error(e, "no such file")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "mol.pdb"
    path.write_text("ATOM\n")
    with pytest.raises(DiffgenError) as e:
        read_molecules(path)
    assert_single_line_error(e, "unsupported file type", ".pdb")
    with pytest.raises(DiffgenError) as e:
        read_molecules(tmp_path / "noext")
    assert_single_line_error(e, "unsupported file type")


@pytest.mark.parametrize("suffix", [".sdf", ".xyz"])
def test_empty_directory_and_garbage(tmp_path, suffix):
    empty = tmp_path / f"empty{suffix}"
    empty.write_text("  \n\n")
    with pytest.raises(DiffgenError) as e:
        read_molecules(empty)
    assert_single_line_error(e, "is empty")

    d = tmp_path / f"dir{suffix}"
    d.mkdir()
    with pytest.raises(DiffgenError) as e:
        read_molecules(d)
    assert_single_line_error(e, "directory")

    for k, data in enumerate([np.random.default_rng(0).bytes(4000), bytes(range(1, 256)) * 10]):
        garbage = tmp_path / f"garbage{k}{suffix}"
        garbage.write_bytes(data)
        with pytest.raises(DiffgenError) as e:
            read_molecules(garbage)
        assert_single_line_error(e, str(garbage))

    text = tmp_path / f"text{suffix}"
    text.write_text("hello world\nthis is not a molecule file\n")
    with pytest.raises(DiffgenError) as e:
        read_molecules(text)
    assert_single_line_error(e, str(text))


def test_xyz_unknown_element(tmp_path):
    path = tmp_path / "x.xyz"
    path.write_text("2\n\nC 0 0 0\nXx 0 0 1.5\n")
    with pytest.raises(DiffgenError) as e:
        read_molecules(path)
    assert_single_line_error(e, "line 4", "'Xx'")


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("3\ncomment\nC 0 0 0\nH 0 0 1.09\n", ["declares 3 atoms", "only 2"]),
        ("1\ncomment\nC 0 0 0\nH 0 0 1.09\n", ["more atom lines", "1"]),
        ("2\ncomment\nC 0 0 0\nH 0 zero 1.09\n", ["line 4", "'zero'", "not a number"]),
        ("2\ncomment\nC 0 0 0\nH 0 nan 1.09\n", ["line 4", "not finite"]),
        ("two\ncomment\nC 0 0 0\n", ["line 1", "expected an atom count"]),
        ("0\ncomment\n", ["declares 0 atoms"]),
        ("2\ncomment\nC 0 0 0\nH 0\n", ["line 4", "2 fields"]),
        ("2\n", ["no comment line"]),
    ],
)
def test_xyz_malformed(tmp_path, text, fragments):
    path = tmp_path / "bad.xyz"
    path.write_text(text)
    with pytest.raises(DiffgenError) as e:
        read_molecules(path)
    assert_single_line_error(e, *fragments)


MOLBLOCK_2D = """ethane
  handmade          2D

  2  1  0  0  0  0  0  0  0  0999 V2000
    0.0000    0.0000    0.0000 C   0  0  0  0  0  0  0  0  0  0  0  0
    1.5400    0.0000    0.0000 C   0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
M  END
$$$$
"""

MOLBLOCK_ZERO = """zeros
  handmade          3D

  2  1  0  0  0  0  0  0  0  0999 V2000
    0.0000    0.0000    0.0000 C   0  0  0  0  0  0  0  0  0  0  0  0
    0.0000    0.0000    0.0000 C   0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
M  END
$$$$
"""


def test_sdf_without_3d_coordinates(tmp_path):
    good = tmp_path / "good.sdf"
    write_sdf(good, molecules()[:1])
    for name, block in (("2d", MOLBLOCK_2D), ("zero", MOLBLOCK_ZERO)):
        path = tmp_path / f"{name}.sdf"
        path.write_text(good.read_text() + block)  # the bad record is the second one
        with pytest.raises(DiffgenError) as e:
            read_molecules(path)
        assert_single_line_error(e, "record 2", "has no 3D coordinates")


def test_sdf_unparsable_record_is_named(tmp_path):
    good = tmp_path / "good.sdf"
    write_sdf(good, molecules()[:2])
    broken = MOLBLOCK_2D.replace("  2  1  0  0", " xx  1  0  0")
    path = tmp_path / "broken.sdf"
    path.write_text(good.read_text() + broken)
    with pytest.raises(DiffgenError) as e:
        read_molecules(path)
    assert_single_line_error(e, "record 3", "could not be parsed")


def test_sdf_unsupported_element(tmp_path):
    mol = Chem.AddHs(Chem.MolFromSmiles("CS"))
    from rdkit.Chem import AllChem

    AllChem.EmbedMolecule(mol, randomSeed=0)
    path = tmp_path / "s.sdf"
    with Chem.SDWriter(str(path)) as w:
        w.write(mol)
    with pytest.raises(DiffgenError) as e:
        read_molecules(path)
    assert_single_line_error(e, "record 1", "unsupported element 'S'")


@pytest.mark.parametrize("tail", ["garbage line\nmore garbage\n", "x"])
def test_sdf_garbage_last_record_is_reported_not_dropped(tmp_path, tail):
    good = tmp_path / "good.sdf"
    write_sdf(good, molecules()[:2])
    path = tmp_path / "tail.sdf"
    path.write_text(good.read_text() + tail)  # RDKit's iterator would silently yield only the 2 good records
    with pytest.raises(DiffgenError) as e:
        read_molecules(path)
    assert_single_line_error(e, "record 3 of 3", "could not be parsed")
    assert len(read_molecules(good)) == 2
