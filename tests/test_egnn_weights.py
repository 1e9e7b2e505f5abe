"""Weights saved before EGNNLayer was split into MessageBlock + EquivariantUpdate still load and compute the same.

The references in tests/data/egnn_references.pt were computed by the pre-split code (tests/data/
make_egnn_references.py, commit 29ad0a2): outputs of the shipped weights on fixed inputs, and tiny EGNNs with their
old-named weights. Old names differ from the new ones only by the block prefix (``layers.0.edge_in.src.weight`` is
now ``layers.0.message.edge_in.src.weight``, ``layers.0.coord_mlp.3.weight`` is ``layers.0.update.coord_mlp.3.weight``).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from diffgen.models.egnn import EGNN
from diffgen.tasks.generation.checkpoints import load_generator
from diffgen.tasks.regression.checkpoints import load_regressor

DATA = Path(__file__).with_name("data") / "egnn_references.pt"
PRETRAINED = Path(__file__).resolve().parents[1] / "diffgen" / "pretrained"
EXACT = {"atol": 1e-12, "rtol": 1e-12}  # same operations in the same order: equal up to float64 rounding


@pytest.fixture(scope="module")
def refs() -> dict:
    return torch.load(DATA, weights_only=True)


def pre_split_name(key: str) -> str:
    """The name a parameter had before the split: drop the block prefix."""
    return re.sub(r"\.(message|update)\.", ".", key)


# qm9_egnn was replaced by weights written after the split (its references stay in the data file, unused)
@pytest.mark.parametrize("name", ["qm9_egnn_eps7k", "qm9_regress_gap"])
def test_shipped_weights_reproduce_pre_split_outputs(refs, name):
    path = PRETRAINED / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:  # the shipped file does use the old names: the rename hook is exercised
        assert any(".layers.0.edge_in." in k for k in f.keys()) and not any(".message." in k for k in f.keys())
    ref = refs["shipped"][name]
    with torch.no_grad():
        if name == "qm9_regress_gap":
            out = (load_regressor(path).double()(*ref["inputs"]),)
            expected = (ref["outputs"],)
        else:
            out = load_generator(path).diffusion.double().predict_eps(*ref["inputs"])
            expected = ref["outputs"]
    for got, want in zip(out, expected):
        assert got.abs().max() > 1e-3  # a real, non-zero output
        torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.parametrize("name", ["invariant", "velocity", "vector_channels"])
def test_pre_split_state_dicts_load_strictly_and_reproduce_outputs(refs, name):
    ref = refs["tiny"][name]
    model = EGNN(**ref["kwargs"]).double()
    model.load_state_dict(ref["state"])  # strict: every old name is mapped, every new name is filled
    assert [pre_split_name(k) for k in model.state_dict()] == list(ref["state"])  # same names, same order
    with torch.no_grad():
        for got, want in zip(model(*ref["inputs"]), ref["outputs"]):
            torch.testing.assert_close(got, want, **EXACT)


def test_same_seed_gives_the_pre_split_weights_in_the_pre_split_order(refs):
    """Creation order is unchanged: a seeded model starts from the same weights (the documented runs stay
    reproducible), and ``parameters()`` keeps its order (optimizer states of old Lightning checkpoints line up)."""
    ref = refs["tiny"]["vector_channels"]  # holds every kind of EGNN parameter
    torch.manual_seed(ref["seed"])
    model = EGNN(**ref["kwargs"]).double()
    g = torch.Generator().manual_seed(ref["seed"] + 100)  # the perturbation of make_egnn_references.perturb
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    assert len(list(model.parameters())) == len(ref["state"])
    for (key, p), (old_key, old) in zip(model.named_parameters(), ref["state"].items()):
        assert pre_split_name(key) == old_key
        assert torch.equal(p, old), key


def test_pre_split_lightning_dynamics_checkpoint_loads(tmp_path):
    """A Lightning checkpoint of a dynamics run written before the split (flat layer names, as the ongoing runs
    write them) loads through ``load`` and predicts as the model it was saved from."""
    from diffgen.tasks.dynamics.checkpoints import build_model, load
    from diffgen.tasks.dynamics.config import dynamics_config_from_dict

    cfg = dynamics_config_from_dict({"model": {"hidden": 8, "n_layers": 2, "vector_channels": 2,
                                               "pool_clusters": 2}})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    old_state = {f"model.{pre_split_name(k)}": v for k, v in model.state_dict().items()}
    assert any(".layers.0.coord_mlp." in k for k in old_state)
    torch.save({"hyper_parameters": {"config": cfg.to_dict()}, "state_dict": old_state}, tmp_path / "old.ckpt")
    loaded, _ = load(tmp_path / "old.ckpt")
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g), torch.ones(2, 5))
    with torch.no_grad():
        assert torch.equal(loaded(*args), model(*args))
