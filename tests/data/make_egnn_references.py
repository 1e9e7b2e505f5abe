"""Freeze outputs of the EGNN as it was before the message block / coordinate update split (commit 29ad0a2).

The weights-compatibility tests (tests/test_egnn_weights.py) load old-named weights into the current code and
compare with these outputs; the reference cannot be recomputed after the refactor, hence a frozen file.
It was written once, with the pre-refactor code, by

    git checkout 29ad0a2 -- diffgen && OMP_NUM_THREADS=1 PYTHONPATH=. python tests/data/make_egnn_references.py

and holds (all tensors float64, parameter names as in the pre-refactor code, dicts in registration order):

- ``tiny``: per tiny EGNN configuration: constructor ``kwargs``, ``seed``, the weights ``state`` (the initial
  weights after ``torch.manual_seed(seed)``, then :func:`perturb`, so that every weight matters), fixed
  ``inputs`` ``(h, pos, edge_index, edge_attr, vel)`` and the ``outputs`` ``(h', pos')`` of that model;
- ``shipped``: per shipped weights file (``diffgen/pretrained``): fixed inputs and the outputs of the model loaded
  through the package's own loader and cast to float64.
"""
from __future__ import annotations

from pathlib import Path

import torch

from diffgen.data.graphs import fully_connected_edges
from diffgen.diffusion.vp import encode_types
from diffgen.models.egnn import EGNN
from diffgen.tasks.generation.checkpoints import load_generator
from diffgen.tasks.regression.checkpoints import load_regressor

F64 = torch.float64
PRETRAINED = Path(__file__).resolve().parents[2] / "diffgen" / "pretrained"
OUT = Path(__file__).with_name("egnn_references.pt")

# the plain (generator) configuration is covered by the shipped weights; the vector-channel one holds every kind of
# parameter (attention, coordinate, velocity and vector-channel weights)
TINY = {
    "invariant": dict(in_dim=3, hidden=4, out_dim=2, n_layers=2, invariant=True, attention=False, norm_factor=5.0),
    "velocity": dict(in_dim=3, hidden=4, out_dim=2, n_layers=2, edge_dim=1, attention=False, velocity=True),
    "vector_channels": dict(in_dim=3, hidden=4, out_dim=2, n_layers=2, edge_dim=1, velocity=True,
                            vector_channels=2, norm_factor=3.0, coords_range=2.0),
}


def tiny_inputs(kwargs: dict) -> tuple:
    g = torch.Generator().manual_seed(7)
    batch = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    ei = fully_connected_edges(batch)
    h = torch.randn(7, kwargs["in_dim"], generator=g, dtype=F64)
    pos = 1.5 * torch.randn(7, 3, generator=g, dtype=F64)
    edge_attr = torch.randn(ei.shape[1], kwargs["edge_dim"], generator=g, dtype=F64) if kwargs.get("edge_dim") else None
    vel = torch.randn(7, 3, generator=g, dtype=F64) if kwargs.get("velocity") else None
    return h, pos, ei, edge_attr, vel


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Add ``0.3 N(0, 1)`` noise to every parameter, drawn in ``model.parameters()`` order (registration order)."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def tiny_reference(name: str, seed: int) -> dict:
    kwargs = TINY[name]
    torch.manual_seed(seed)
    model = EGNN(**kwargs).double()
    perturb(model, seed)
    inputs = tiny_inputs(kwargs)
    with torch.no_grad():
        outputs = model(*inputs)
    return {"kwargs": kwargs, "seed": seed, "state": dict(model.state_dict()), "inputs": inputs,
            "outputs": outputs}


def molecules() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    batch = torch.tensor([0] * 4 + [1] * 7)
    z = torch.tensor([1, 6, 7, 8, 9])[torch.randint(0, 5, (batch.numel(),), generator=g)]
    pos = 1.5 * torch.randn(batch.numel(), 3, generator=g, dtype=F64)
    return z, pos, batch


def shipped_references() -> dict:
    z, pos, batch = molecules()
    g = torch.Generator().manual_seed(4)
    centre = torch.zeros(2, 3, dtype=F64).index_add_(0, batch, pos) / torch.bincount(batch).unsqueeze(-1)
    pos_t = pos - centre[batch]
    h_t = encode_types(z).double() + 0.3 * torch.randn(batch.numel(), 6, generator=g, dtype=F64)
    t = torch.tensor([0.3, 0.8], dtype=F64)
    out = {}
    with torch.no_grad():
        for name in ("qm9_egnn", "qm9_egnn_eps7k"):
            diffusion = load_generator(PRETRAINED / f"{name}.safetensors").diffusion.double()
            out[name] = {"inputs": (pos_t, h_t, t, batch), "outputs": diffusion.predict_eps(pos_t, h_t, t, batch)}
        task = load_regressor(PRETRAINED / "qm9_regress_gap.safetensors").double()
        out["qm9_regress_gap"] = {"inputs": (z, pos, batch), "outputs": task(z, pos, batch)}
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    refs = {"tiny": {name: tiny_reference(name, seed) for seed, name in enumerate(TINY)},
            "shipped": shipped_references()}
    torch.save(refs, OUT, _use_new_zipfile_serialization=False)  # the legacy format is smaller for many tiny tensors
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
