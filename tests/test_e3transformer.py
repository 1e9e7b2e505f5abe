"""E(3) transformer backbone (diffgen.models.e3transformer) and its three uses (generator, property regressor,
dynamics): E(3) x permutation equivariance in float64 (tests/equivariance.py) on random and real QM9 graphs, overfitting
real QM9 molecules, one-line config errors, checkpoints, and a tiny `diffgen train` + `sample` through the CLI."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from equivariance import assert_e3_equivariant

from diffgen.data.graphs import fully_connected_edges, radius_edges
from diffgen.diffusion.vp import N_FEATURES, encode_types, remove_mean
from diffgen.errors import DiffgenError
from diffgen.models.e3transformer import E3Transformer, EquivariantLayerNorm, hidden_irreps
from diffgen.tasks.dynamics.checkpoints import build_model as build_dynamics
from diffgen.tasks.dynamics.config import dynamics_config_from_dict, load_dynamics_config
from diffgen.tasks.generation.build import build_diffusion
from diffgen.tasks.generation.config import config_from_dict, load_generation_config
from diffgen.tasks.regression.checkpoints import build_model as build_regressor
from diffgen.tasks.regression.config import load_regression_config, regression_config_from_dict

F64 = torch.float64
#: tiny widths: 8 scalars + 4 vectors per node, 2 heads, 2 layers
TINY = {"backbone": "e3transformer", "hidden": 8, "l_channels": 4, "heads": 2, "n_layers": 2}
BACKBONE_TINY = {k: v for k, v in TINY.items() if k != "backbone"}


@contextlib.contextmanager
def float64_constants():
    """e3nn computes its Clebsch-Gordan coefficients in the default dtype when a module is built: build float64
    models under float64 so the equivariance checks hold to 1e-9 (float32 coefficients give ~1e-8 errors at l = 2)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def make_backbone(seed: int = 0, **kw) -> E3Transformer:
    torch.manual_seed(seed)
    with float64_constants():
        return E3Transformer(**{"in_dim": 5, "out_dim": 3, **BACKBONE_TINY, **kw}).double().eval()


@pytest.fixture
def random_graphs():
    g = torch.Generator().manual_seed(1)
    sizes = torch.tensor([4, 6, 9])
    batch = torch.repeat_interleave(torch.arange(3), sizes)
    n = int(sizes.sum())
    return (torch.randn(n, 5, generator=g, dtype=F64), 2.0 * torch.randn(n, 3, generator=g, dtype=F64), batch,
            torch.randn(n, 3, generator=g, dtype=F64))


# --- the backbone -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"lmax": 2}, {"velocity": True, "edge_dim": 2}, {"invariant": True, "lmax": 2}],
                         ids=["lmax1", "lmax2", "velocity_edge_attr", "invariant"])
def test_backbone_is_e3_and_permutation_equivariant(random_graphs, kw):
    h, pos, batch, vel = random_graphs
    model = make_backbone(**kw)
    edges = fully_connected_edges(batch)
    edge_attr = torch.randn(edges.shape[1], 2, dtype=F64) if kw.get("edge_dim") else None
    vel = vel if kw.get("velocity") else None
    with torch.no_grad():
        h_out, pos_out = assert_e3_equivariant(
            model, [("scalar", h), ("pos", pos), ("edges", edges), ("edge_scalar", edge_attr), ("vec", vel)],
            ["scalar", "pos"])
    assert h_out.shape == (h.shape[0], 3) and h_out.std() > 0.1
    if kw.get("invariant"):
        assert torch.equal(pos_out, pos)
    else:
        assert (pos_out - pos).norm(dim=-1).mean() > 0.05  # the 1o output is large enough to test


def test_backbone_on_a_radius_graph_and_not_for_nonrigid_maps(random_graphs):
    """Sparse edge lists (a radius graph, nodes without neighbours included) work; a shear, which is not an isometry,
    is not followed (control: the check above can fail)."""
    h, pos, batch, _ = random_graphs
    model = make_backbone()
    edges = radius_edges(pos, batch, cutoff=2.5)
    assert 0 < edges.shape[1] < fully_connected_edges(batch).shape[1]
    with torch.no_grad():
        assert_e3_equivariant(model, [("scalar", h), ("pos", pos), ("edges", edges)], ["scalar", "pos"])
        shear = torch.tensor([[1.0, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
        _, moved = model(h, pos @ shear.T, edges)
        _, ref = model(h, pos, edges)
    assert (moved - ref @ shear.T).abs().max() > 1e-3


def test_layer_norm_normalises_each_irrep_and_is_equivariant():
    irreps = hidden_irreps(6, 3, 2)
    norm = EquivariantLayerNorm(irreps).double()
    x = 5.0 * torch.randn(7, irreps.dim, dtype=F64) + 2.0
    y = norm(x)
    for (mul, ir), s in zip(irreps, irreps.slices()):
        block = y[:, s].reshape(7, mul, ir.dim)
        torch.testing.assert_close(block.pow(2).mean(dim=(1, 2)), torch.ones(7, dtype=F64), atol=1e-4, rtol=0)
    q = torch.linalg.qr(torch.randn(3, 3, dtype=F64))[0]
    q = q * torch.sign(torch.det(q)) * -1  # a reflection
    d = irreps.D_from_matrix(q)
    torch.testing.assert_close(norm(x @ d.T), y @ d.T)


def test_backbone_validates_its_arguments_and_inputs(random_graphs):
    h, pos, batch, vel = random_graphs
    for kw, fragment in [({"heads": 3}, "multiples of heads"), ({"lmax": 3}, "lmax <= 2"),
                         ({"l_channels": 0}, "l_channels >= 1"), ({"r_max": 0.0}, "r_max must be positive"),
                         ({"velocity": True, "invariant": True}, "cannot use velocities")]:
        with pytest.raises(ValueError, match=fragment):
            E3Transformer(5, **{**BACKBONE_TINY, **kw})
    edges = fully_connected_edges(batch)
    model = make_backbone()
    with pytest.raises(ValueError, match="velocity=False"):
        model(h, pos, edges, vel=vel)
    with pytest.raises(ValueError, match="edge_dim=0"):
        model(h, pos, edges, edge_attr=torch.ones(edges.shape[1], 1, dtype=F64))
    with pytest.raises(ValueError, match="vel must have shape"):
        make_backbone(velocity=True)(h, pos, edges)
    with pytest.raises(ValueError, match=r"h must have shape \[N, 5\]"):
        model(h[:, :4], pos, edges)


# --- the three uses ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parameterization", ["eps", "x0"])
def test_generator_is_equivariant_on_real_qm9(qm9_batch, parameterization):
    """Position noise rotates/reflects (zero CoM), type noise is invariant, atoms permute within molecules."""
    torch.manual_seed(0)
    cfg = config_from_dict({"model": TINY, "diffusion": {"parameterization": parameterization}})
    with float64_constants():
        diffusion = build_diffusion(cfg).double().eval()
    batch = qm9_batch.batch
    g = torch.Generator().manual_seed(0)
    pos_t = remove_mean(qm9_batch.pos.double() + 0.3 * torch.randn(batch.numel(), 3, generator=g, dtype=F64), batch)
    h_t = encode_types(qm9_batch.z).double() + 0.3 * torch.randn(batch.numel(), N_FEATURES, generator=g, dtype=F64)
    t = torch.rand(qm9_batch.num_graphs, generator=g, dtype=F64)
    inputs = [("pos", pos_t), ("scalar", h_t), ("global", t), ("scalar", batch)]
    with torch.no_grad():
        # eps: translation invariant too; x0 reads the centred z_t, so its domain is zero-CoM positions
        eps_pos, eps_h = assert_e3_equivariant(diffusion.predict_eps, inputs, ["vec", "scalar"], batch=batch,
                                               translate=parameterization == "eps")
    assert eps_pos.abs().mean() > 0.05 and eps_h.shape == h_t.shape
    com = torch.zeros(qm9_batch.num_graphs, 3, dtype=F64).index_add_(0, batch, eps_pos)
    assert com.abs().max() < 1e-10


def test_regressor_output_is_invariant_on_real_qm9(qm9_batch):
    torch.manual_seed(0)
    cfg = regression_config_from_dict({"model": TINY, "task": {"targets": ["gap", "mu"]}})
    with float64_constants():
        model = build_regressor(cfg).double().eval()
    assert model.backbone is model.transformer and model.transformer.invariant
    z, pos, batch = qm9_batch.z, qm9_batch.pos.double(), qm9_batch.batch
    with torch.no_grad():
        out = assert_e3_equivariant(model, [("scalar", z), ("pos", pos), ("scalar", batch)], ["global"], batch=batch)[0]
        total = assert_e3_equivariant(model.predict, [("scalar", z), ("pos", pos), ("scalar", batch)], ["global"],
                                      batch=batch)[0]
    assert out.shape == (qm9_batch.num_graphs, 2) and out.std(0).min() > 1e-3  # molecules differ
    assert total.dtype == F64 and torch.isfinite(total).all()


@pytest.mark.parametrize("kw", [{}, {"n_types": 3}, {"use_velocity": False, "use_charges": False}],
                         ids=["nbody", "types", "positions_only"])
def test_dynamics_prediction_is_equivariant(kw):
    cfg = dynamics_config_from_dict({"model": {**TINY, **kw}})
    torch.manual_seed(0)
    with float64_constants():
        model = build_dynamics(cfg).double().eval()
    g = torch.Generator().manual_seed(0)
    pos, vel = (torch.randn(3, 5, 3, generator=g, dtype=F64) for _ in range(2))
    charges = torch.randint(0, 2, (3, 5), generator=g).double() * 2 - 1
    types = torch.randint(0, 3, (3, 5), generator=g) if kw.get("n_types") else None
    start = pos + vel if cfg.model.use_velocity else pos
    with torch.no_grad():
        assert (model(pos, vel, charges, types) - start).norm(dim=-1).mean() < 0.1  # starts near x + vel_init v
        torch.nn.init.normal_(model.backbone.readout_vec.weight, std=1.0)  # make the network's own update matter
        out = assert_e3_equivariant(model, [("pos", pos), ("vec", vel), ("scalar", charges), ("scalar", types)],
                                    ["pos"], node_dim=1)[0]
    assert (out - start).norm(dim=-1).mean() > 0.05


# --- learning on real molecules ---------------------------------------------------------------------------------


def _real_molecules(qm9_train, n: int):
    from torch_geometric.loader import DataLoader

    rows = torch.arange(0, 96_000, 96_000 // n)[:n]
    return next(iter(DataLoader(qm9_train[rows], batch_size=n, shuffle=False)))


def test_regressor_overfits_a_handful_of_real_molecules(qm9_train):
    from diffgen.tasks.regression.targets import regression_values

    mols = _real_molecules(qm9_train, 8)
    y = regression_values(mols.y, mols.z, mols.batch, ["gap"]).float()  # [8, 1] eV
    stats = {"mean": y.mean(0).tolist(), "mad": (y - y.mean(0)).abs().mean(0).tolist()}
    torch.manual_seed(0)
    cfg = regression_config_from_dict({"model": {**TINY, "hidden": 16, "l_channels": 8}})
    model = build_regressor(cfg, stats)
    target = (y.double() - model.mean) / model.mad
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = (model(mols.z, mols.pos, mols.batch) - target.float()).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]


def test_generator_overfits_a_handful_of_real_molecules(qm9_train):
    """Fixed times and noise on 4 real molecules: the eps-prediction loss of the transformer denoiser must fall."""
    mols = _real_molecules(qm9_train, 4)
    torch.manual_seed(0)
    cfg = config_from_dict({"model": {**TINY, "hidden": 16, "l_channels": 8}, "diffusion": {"parameterization": "eps"}})
    diffusion = build_diffusion(cfg)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7])
    opt = torch.optim.Adam(diffusion.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = diffusion.loss(mols.pos, mols.z, mols.batch, t=t, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]


# --- configuration, checkpoints, CLI ----------------------------------------------------------------------------

LOADERS = {"generation": (load_generation_config, "qm9_egnn"), "regression": (load_regression_config, "qm9_regress"),
           "dynamics": (load_dynamics_config, "nbody_egnn")}


@pytest.mark.parametrize("task", sorted(LOADERS))
@pytest.mark.parametrize("overrides, fragment", [
    (["model.heads=3"], "model.hidden="),  # every packaged width is a multiple of 4, not of 3
    (["model.heads=4", "model.l_channels=6"], "model.l_channels=6 must be a multiple of model.heads=4"),
    (["model.lmax=3"], "model.lmax must be <= 2"),
    (["model.lmax=0"], "model.lmax must be >= 1"),
    (["model.l_channels=0"], "model.l_channels must be >= 1"),
    (["model.num_basis=0"], "model.num_basis must be >= 1"),
    (["model.r_max=-1"], "model.r_max must be > 0"),
    (["model.backbone=se3"], "model.backbone must be one of egnn, e3transformer"),
])
def test_bad_transformer_settings_are_one_line_errors(task, overrides, fragment):
    load, name = LOADERS[task]
    with pytest.raises(DiffgenError) as info:
        load(name, ["model.backbone=e3transformer", *overrides])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_heads_need_not_divide_widths_for_the_egnn():
    assert load_generation_config("qm9_egnn", ["model.heads=3"]).model.backbone == "egnn"


@pytest.mark.parametrize("key", ["vector_channels", "pool_clusters"])
def test_egnn_only_dynamics_options_are_refused(key):
    with pytest.raises(DiffgenError, match=f"model.{key} needs model.backbone=egnn"):
        load_dynamics_config("nbody_egnn", ["model.backbone=e3transformer", f"model.{key}=2"])


def test_regression_and_dynamics_checkpoints_round_trip(qm9_batch, tmp_path):
    from diffgen.tasks.dynamics.checkpoints import load as load_dynamics, save as save_dynamics
    from diffgen.tasks.regression.checkpoints import load as load_regressor, save as save_regressor

    cfg = regression_config_from_dict({"model": TINY})
    model = build_regressor(cfg, {"mean": [5.0], "mad": [1.2]}).eval()
    assert not [k for k in model.state_dict() if "w3j" in k or "output_mask" in k]  # parameters only
    path = save_regressor(model, cfg, tmp_path / "reg.safetensors")
    loaded, loaded_cfg = load_regressor(path)
    assert loaded_cfg.model.backbone == "e3transformer"
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(qm9_batch.z, qm9_batch.pos, qm9_batch.batch),
                                   model.predict(qm9_batch.z, qm9_batch.pos, qm9_batch.batch))
    dcfg = dynamics_config_from_dict({"model": TINY})
    dyn = build_dynamics(dcfg).eval()
    loaded_dyn, _ = load_dynamics(save_dynamics(dyn, dcfg, tmp_path / "dyn.safetensors"))
    pos, vel, q = torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.ones(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded_dyn(pos, vel, q), dyn(pos, vel, q))


def test_cli_trains_exports_and_samples_with_the_transformer(tmp_path: Path):
    from typer.testing import CliRunner

    from diffgen.cli import app
    from diffgen.tasks.generation.checkpoints import load_generator

    run = tmp_path / "run"
    overrides = [f"model.{k}={v}" for k, v in TINY.items()] + [
        "trainer.max_steps=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.sample_every_n_epochs=0", "trainer.accelerator=cpu", "trainer.devices=1", "data.batch_size=8"]
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--config", "qm9_egnn", "--out-dir", str(run), *overrides])
    assert res.exit_code == 0, res.output
    weights = tmp_path / "e3.safetensors"
    res = runner.invoke(app, ["export", str(run / "checkpoints" / "last.ckpt"), str(weights)])
    assert res.exit_code == 0, res.output
    assert "backbone: e3transformer" in weights.with_suffix(".yaml").read_text()
    gen = load_generator(weights)
    assert isinstance(gen.diffusion.denoiser.backbone, E3Transformer)
    out = tmp_path / "samples"
    res = runner.invoke(app, ["sample", "--checkpoint", str(weights), "--n", "2", "--steps", "3", "--out", str(out),
                              "--no-novelty"])
    assert res.exit_code == 0, res.output
    assert (out / "samples.sdf").is_file() and "mol stability" in res.output
