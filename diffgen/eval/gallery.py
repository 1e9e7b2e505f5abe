"""Self-contained HTML gallery of 3D molecules (``diffgen view``).

One HTML file, no network needed to open it: the 3D viewer 3Dmol.js (Rego & Koes 2015, Bioinformatics 31, 1322;
BSD-3-Clause; vendored from the npm package ``3dmol``, see ``diffgen/eval/static/README.md``) is inlined in a
``<script>`` element, and so is every molecule, as an MDL molfile holding the EDM distance-inferred bonds
(:func:`diffgen.eval.chem.to_rdkit`) so that the picture shows the bonds the evaluation used.

Each molecule gets a card with a rotatable 3D view (drag to rotate, wheel to zoom), its 1-based index, the EDM
SMILES (canonical SMILES of the largest fragment, or "invalid"), its EDM stability and validity
(:mod:`diffgen.eval.stability`, :mod:`diffgen.eval.chem`), and the page has a filter by those flags. Browsers keep
only about 16 live WebGL contexts, so the 3D views are created when their card first scrolls near the viewport;
3Dmol.js restores a view whose context the browser dropped when it becomes visible again.
"""
from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from rdkit import Chem

from diffgen.errors import DiffgenError
from diffgen.eval.bonds import as_numpy_molecule, bond_orders, type_indices
from diffgen.eval.chem import to_rdkit, valid_smiles
from diffgen.eval.stability import molecule_stable

__all__ = ["VIEWER_JS", "gallery_records", "gallery_html", "write_gallery"]

#: The vendored viewer file inside the package (3Dmol.js, minified).
VIEWER_JS = "3Dmol-min.js"


def _viewer_js() -> str:
    try:
        text = resources.files("diffgen.eval").joinpath("static", VIEWER_JS).read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):
        raise DiffgenError(f"the packaged 3D viewer diffgen/eval/static/{VIEWER_JS} is missing: reinstall diffgen") from None
    return text.replace("</script", "<\\/script")  # cannot end the inline <script> element early


def gallery_records(molecules: Iterable) -> list[dict]:
    """One record per molecule: ``index`` (1-based), ``n_atoms``, ``smiles`` (EDM, None if invalid), ``stable``,
    ``valid`` (EDM flags) and ``molblock`` (V2000 molfile with EDM bonds, coordinates in Å).

    Args:
        molecules: iterable of ``(z, pos)``: z (n,) int, pos (n, 3) Å.

    Raises:
        DiffgenError: malformed molecules or elements outside H, C, N, O, F.
    """
    out = []
    for k, (z, pos) in enumerate(molecules, start=1):
        z, pos = as_numpy_molecule(z, pos)
        type_indices(z)
        bonds = bond_orders(z, pos)
        stable = molecule_stable(z, pos, bonds)[0]
        mol = to_rdkit(z, pos, bonds)
        smiles = valid_smiles(mol)
        mol.UpdatePropertyCache(strict=False)
        mol.SetProp("_Name", f"mol_{k}")
        block = Chem.MolToMolBlock(mol, kekulize=False)
        out.append({"index": k, "n_atoms": int(z.size), "smiles": smiles, "stable": bool(stable),
                    "valid": smiles is not None, "molblock": block})
    return out


_CSS = """
body{font-family:system-ui,sans-serif;margin:16px;background:#f4f5f7;color:#222}
h1{font-size:20px;margin:0 0 4px}
#bar{margin:8px 0 14px;display:flex;gap:16px;align-items:center;flex-wrap:wrap}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ccd;border-radius:6px;padding:6px}
.card.hidden{display:none}
.viewer{position:relative;width:100%;height:240px}
.cap{font-size:12px;margin-top:4px;word-break:break-all}
.smi{font-family:ui-monospace,monospace}
.tag{display:inline-block;padding:0 6px;border-radius:8px;font-size:11px;margin-right:4px}
.ok{background:#d8f5dc;color:#155d27}.bad{background:#fbe0e0;color:#8a1c1c}
"""

# Plain JS, no external resources. Cards are filtered with the select; 3D views are created lazily.
_JS = """
(function(){
  const data = JSON.parse(document.getElementById('molecules').textContent);
  const grid = document.getElementById('grid');
  const tag = (ok, yes, no) => '<span class="tag ' + (ok ? 'ok">' + yes : 'bad">' + no) + '</span>';
  const cards = data.map(function(m){
    const card = document.createElement('div');
    card.className = 'card';
    card.id = 'mol-' + m.index;
    card.dataset.index = m.index;
    card.dataset.stable = m.stable ? '1' : '0';
    card.dataset.valid = m.valid ? '1' : '0';
    const view = document.createElement('div');
    view.className = 'viewer';
    card.appendChild(view);
    const cap = document.createElement('div');
    cap.className = 'cap';
    cap.innerHTML = '<b>#' + m.index + '</b> ' + m.n_atoms + ' atoms ' + tag(m.stable, 'stable', 'unstable') +
      tag(m.valid, 'valid', 'invalid') + '<br><span class="smi"></span>';
    cap.querySelector('.smi').textContent = m.smiles === null ? '(no SMILES: invalid)' : m.smiles;
    card.appendChild(cap);
    grid.appendChild(card);
    return card;
  });
  function show(card){
    if (card.dataset.rendered === '1') return;
    const m = data[Number(card.dataset.index) - 1];
    const viewer = $3Dmol.createViewer(card.querySelector('.viewer'), {backgroundColor: 'white'});
    viewer.addModel(m.molblock, 'sdf');
    viewer.setStyle({}, {stick: {radius: 0.14}, sphere: {scale: 0.22}});
    viewer.zoomTo();
    viewer.render();
    card.dataset.rendered = '1';
  }
  const observer = new IntersectionObserver(function(entries){
    entries.forEach(function(e){ if (e.isIntersecting) show(e.target); });
  }, {rootMargin: '300px'});
  cards.forEach(function(c){ observer.observe(c); });
  const select = document.getElementById('filter');
  const count = document.getElementById('count');
  function apply(){
    const f = select.value;
    let shown = 0;
    cards.forEach(function(c){
      const s = c.dataset.stable === '1', v = c.dataset.valid === '1';
      const keep = f === 'all' || (f === 'stable' && s) || (f === 'valid' && v) || (f === 'stable-valid' && s && v) ||
        (f === 'unstable' && !s) || (f === 'invalid' && !v);
      c.classList.toggle('hidden', !keep);
      if (keep) shown += 1;
    });
    count.textContent = shown + ' of ' + cards.length + ' shown';
  }
  select.addEventListener('change', apply);
  apply();
})();
"""


def gallery_html(records: list[dict], title: str = "diffgen gallery") -> str:
    """The gallery page for :func:`gallery_records` output, as one HTML string with everything inlined."""
    n_stable = sum(r["stable"] for r in records)
    n_valid = sum(r["valid"] for r in records)
    payload = json.dumps(records).replace("</", "<\\/")  # JSON inside <script type="application/json">
    options = [("all", "all"), ("stable", "stable"), ("valid", "valid"), ("stable-valid", "stable and valid"),
               ("unstable", "unstable"), ("invalid", "invalid")]
    opts = "".join(f'<option value="{v}">{label}</option>' for v, label in options)
    t = html.escape(title)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{t}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{t}</h1><div>{len(records)} molecules: {n_stable} stable, {n_valid} valid (EDM bonds and flags). "
        "Drag to rotate, wheel to zoom.</div>\n"
        f"<div id=\"bar\"><label>show <select id=\"filter\">{opts}</select></label><span id=\"count\"></span></div>\n"
        "<div id=\"grid\"></div>\n"
        f"<script type=\"application/json\" id=\"molecules\">{payload}</script>\n"
        f"<script>{_viewer_js()}</script>\n"
        f"<script>{_JS}</script>\n</body></html>\n"
    )


def write_gallery(molecules: Iterable, path: str | os.PathLike, title: str = "diffgen gallery") -> dict:
    """Write the self-contained gallery HTML of ``molecules`` (iterable of ``(z, pos)``, Å) to ``path``.

    The caller checks ``path`` (overwrite guard) first.

    Returns:
        ``{"n": molecules, "stable": stable ones, "valid": valid ones}``.

    Raises:
        DiffgenError: malformed molecules, no molecules, unwritable path.
    """
    records = gallery_records(molecules)
    if not records:
        raise DiffgenError("no molecules to show")
    text = gallery_html(records, title=title)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise DiffgenError(f"cannot write {path}: {exc.strerror or exc}") from None
    return {"n": len(records), "stable": sum(r["stable"] for r in records), "valid": sum(r["valid"] for r in records)}
