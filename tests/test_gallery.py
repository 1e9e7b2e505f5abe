"""`diffgen view`: the gallery HTML holds every molecule with its flags, loads no external script, opens in a real
headless Chromium without console errors and shows a 3D view of each molecule; bad input is a one-line error."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from diffgen.eval.chem import GenerationMetrics
from diffgen.eval.gallery import gallery_records, write_gallery
from diffgen.io import read_molecules

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "samples.sdf"


def run_cli(*args):
    env = {**os.environ, "COLUMNS": "160", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "diffgen.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def assert_one_line_error(res, fragment: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:") and fragment in lines[0], lines[0]


class _Resources(HTMLParser):
    """Collects the external resources a page would load: <script src>, <link href>, <img src>, <iframe src>."""

    def __init__(self):
        super().__init__()
        self.external: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if attrs.get(key) and tag in ("script", "link", "img", "iframe"):
                self.external.append(f"<{tag} {key}={attrs[key]}>")


@pytest.fixture(scope="module")
def sample_molecules():
    """The first 11 example molecules and the first one the SDF tags as invalid (the filter needs both kinds; with
    the 2026-12-06 default sampler the first 25 are all valid)."""
    from rdkit import Chem

    tags = [m.GetProp("rdkit_valid") for m in Chem.SDMolSupplier(str(SAMPLES), sanitize=False, removeHs=False)]
    molecules = read_molecules(SAMPLES)
    return molecules[:11] + [molecules[tags.index("0")]]


@pytest.fixture(scope="module")
def gallery(sample_molecules, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("view") / "gallery.html"
    counts = write_gallery(sample_molecules, path)
    assert counts["n"] == len(sample_molecules)
    return path


def test_gallery_holds_every_molecule_with_its_flags(sample_molecules, gallery):
    text = gallery.read_text()
    payload = re.search(r'<script type="application/json" id="molecules">(.*?)</script>', text, re.S).group(1)
    records = json.loads(payload.replace("<\\/", "</"))
    assert [r["index"] for r in records] == list(range(1, len(sample_molecules) + 1))
    metrics = GenerationMetrics()
    metrics.update(sample_molecules)
    for rec, ref, (z, _) in zip(records, metrics.per_molecule(), sample_molecules):
        assert rec["smiles"] == ref["smiles"] and rec["valid"] == ref["valid"] and rec["stable"] == ref["mol_stable"]
        counts = rec["molblock"].splitlines()[3]
        assert int(counts[:3]) == z.size == rec["n_atoms"]  # every atom is in the molfile the viewer reads
    assert any(r["stable"] for r in records) and not all(r["valid"] for r in records)  # both kinds for the filter


def test_gallery_loads_no_external_resource(gallery):
    parser = _Resources()
    parser.feed(gallery.read_text())
    assert parser.scripts == 3  # data, the inlined viewer, the page code
    assert parser.external == []
    viewer = (Path(__file__).resolve().parents[1] / "diffgen" / "eval" / "static" / "3Dmol-min.js").read_text()
    assert viewer[200:5000] in gallery.read_text()  # the viewer library itself is inlined


def test_records_reject_unsupported_elements():
    import numpy as np

    from diffgen.errors import DiffgenError

    with pytest.raises(DiffgenError, match="unsupported atomic number"):
        gallery_records([(np.array([6, 16]), np.zeros((2, 3)) + [[0, 0, 0], [1.8, 0, 0]])])


def test_cli_view_and_bad_input(tmp_path):
    out = tmp_path / "g.html"
    res = run_cli("view", str(SAMPLES), "--out", str(out), "--max-molecules", "5")
    assert res.returncode == 0, res.stderr
    assert "5 molecules" in res.stdout and out.is_file()
    before = out.read_bytes()
    assert_one_line_error(run_cli("view", str(SAMPLES), "--out", str(out)), "already exists")
    assert out.read_bytes() == before
    bad = tmp_path / "bad.sdf"
    bad.write_text("garbage\n")
    assert_one_line_error(run_cli("view", str(bad), "--out", str(tmp_path / "h.html")), "could not be parsed")
    assert_one_line_error(run_cli("view", str(SAMPLES), "--out", str(tmp_path / "g.png")), ".html")
    assert not (tmp_path / "h.html").exists()


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_gallery_in_headless_chromium(gallery, sample_molecules):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is not installed")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        # no GPU here: WebGL through SwiftShader, which Chromium only enables on request
        browser = p.chromium.launch(executable_path=browser_path, args=["--enable-unsafe-swiftshader"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(gallery.as_uri())
            page.wait_for_function("document.querySelectorAll('.card canvas').length > 0", timeout=20_000)
            cards = page.locator(".card")
            assert cards.count() == len(sample_molecules)
            for k in range(cards.count()):  # scroll each card into view: its 3D view is created
                cards.nth(k).scroll_into_view_if_needed()
                page.wait_for_function(f"document.querySelector('#mol-{k + 1}').dataset.rendered === '1'",
                                       timeout=10_000)
                assert page.locator(f"#mol-{k + 1} canvas").count() == 1
            records = gallery_records(sample_molecules)
            page.select_option("#filter", "stable")
            assert page.locator(".card:not(.hidden)").count() == sum(r["stable"] for r in records)
            page.select_option("#filter", "invalid")
            assert page.locator(".card:not(.hidden)").count() == sum(not r["valid"] for r in records)
            page.select_option("#filter", "all")
            assert page.locator(".card:not(.hidden)").count() == len(records)
        finally:
            browser.close()
    assert errors == []
