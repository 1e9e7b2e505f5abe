"""The checkpoint contract shared by the three tasks (diffgen.checkpoint_files + tasks/*/checkpoints.py):
``load(path, device) -> (model, config)`` for a Lightning ``.ckpt`` and its ``.safetensors`` export, the overwrite
guard of ``export``, and one-line errors for broken metadata. Tiny models, CPU, no data sets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffgen.errors import DiffgenError
from diffgen.tasks.dynamics import checkpoints as dynamics_ckpt
from diffgen.tasks.generation import checkpoints as generation_ckpt
from diffgen.tasks.regression import checkpoints as regression_ckpt

TASKS = ("generation", "regression", "dynamics")
CHECKPOINTS = {"generation": generation_ckpt, "regression": regression_ckpt, "dynamics": dynamics_ckpt}
CONFIG_CLASS = {"generation": "GenerationConfig", "regression": "RegressionConfig", "dynamics": "DynamicsConfig"}
FORMATS = {"generation": "diffgen-generator-v1", "regression": "diffgen-regressor-v2", "dynamics": "diffgen-dynamics-v1"}
HISTOGRAM = [0, 0, 1, 3, 2]  # atom counts 2, 3, 4


def _lightning_task(task: str) -> torch.nn.Module:
    """A tiny Lightning module of ``task`` with seeded random weights."""
    torch.manual_seed(0)
    if task == "generation":
        from diffgen.tasks.generation.module import GenerationTask

        module = GenerationTask({"model": {"hidden": 8, "n_layers": 1}, "diffusion": {"T": 20}}, HISTOGRAM)
        with torch.no_grad():  # the trained weights drift away from their EMA: the export must take the EMA
            for p in module.diffusion.parameters():
                p.add_(0.1)
        return module
    if task == "regression":
        from diffgen.tasks.regression.module import RegressionTask

        return RegressionTask({"model": {"hidden": 8, "n_layers": 1}}, {"mean": [6800.0], "mad": [1000.0]})
    from diffgen.tasks.dynamics.module import DynamicsTask

    return DynamicsTask({"model": {"hidden": 8, "n_layers": 1}})


def _expected_state(task: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a load must give: the EMA diffusion (generation), the wrapped model (regression, dynamics)."""
    return (module.ema.module if task == "generation" else module.model).state_dict()


def _loaded_state(task: str, model) -> dict[str, torch.Tensor]:
    return (model.diffusion if task == "generation" else model).state_dict()


@pytest.fixture(scope="module", params=TASKS)
def trained(request, tmp_path_factory):
    """``(task, lightning module, path of its .ckpt)``: what ``torch.load`` of a Lightning checkpoint reads back."""
    task = request.param
    module = _lightning_task(task)
    path = tmp_path_factory.mktemp(task) / "last.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(), "global_step": 7}, path)
    return task, module, path


def _assert_one_line(exc: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(exc.value)
    assert "\n" not in text and text, text
    for needle in needles:
        assert needle in text, text


def test_ckpt_and_export_load_as_the_trained_model(trained, tmp_path):
    task, module, ckpt = trained
    ckpts = CHECKPOINTS[task]
    want = _expected_state(task, module)
    out = ckpts.export(ckpt, tmp_path / "m.safetensors", dtype=torch.float32)
    assert out == tmp_path / "m.safetensors"
    for path in (ckpt, out):
        model, cfg = ckpts.load(path)
        assert type(cfg).__name__ == CONFIG_CLASS[task] and cfg.to_dict() == module.cfg.to_dict()
        got = _loaded_state(task, model)
        assert list(got) == list(want)
        for key, value in want.items():
            assert torch.equal(got[key], value), (path.suffix, key)
        assert not (model.diffusion if task == "generation" else model).training  # eval mode
    if task == "generation":
        assert model.config is cfg and model.source == out
        assert model.node_dist.histogram.tolist() == HISTOGRAM
        raw = module.diffusion.state_dict()  # the trained (non-EMA) weights were not taken
        assert any(not torch.equal(got[k], v) for k, v in raw.items() if v.is_floating_point())
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMATS[task]
    assert json.loads(meta["config"]) == module.cfg.to_dict()  # the config as plain JSON


def test_half_precision_export_loads_back_in_float32(trained, tmp_path):
    task, module, ckpt = trained
    ckpts = CHECKPOINTS[task]
    model, _ = ckpts.load(ckpts.export(ckpt, tmp_path / "h.safetensors", dtype=torch.float16))
    got, want = _loaded_state(task, model), _expected_state(task, module)
    for key, value in want.items():
        if key in ("mean", "mad"):  # the regression statistics are never rounded
            assert got[key].dtype == torch.float64 and torch.equal(got[key], value)
        elif value.is_floating_point():
            assert got[key].dtype == value.dtype
            torch.testing.assert_close(got[key], value, rtol=1e-3, atol=1e-4)  # fp16: 11-bit mantissa


def test_export_refuses_to_overwrite(trained, tmp_path):
    task, _, ckpt = trained
    ckpts = CHECKPOINTS[task]
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(DiffgenError) as exc:
        ckpts.export(ckpt, out)
    _assert_one_line(exc, str(out), "already exists", "overwrite")
    assert out.read_bytes() == b"keep me"
    assert ckpts.export(ckpt, out, overwrite=True) == out
    ckpts.load(out)
    with pytest.raises(DiffgenError) as exc:
        ckpts.export(ckpt, tmp_path / "m.pt")
    _assert_one_line(exc, "must end in .safetensors")


def test_generator_export_refuses_to_overwrite_the_yaml_beside_it(tmp_path):
    module = _lightning_task("generation")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ckpt)
    out = tmp_path / "gen.safetensors"
    out.with_suffix(".yaml").write_text("mine: 1\n")
    with pytest.raises(DiffgenError) as exc:
        generation_ckpt.export(ckpt, out)
    _assert_one_line(exc, "gen.yaml", "already exists")
    assert not out.exists() and out.with_suffix(".yaml").read_text() == "mine: 1\n"
    generation_ckpt.export(ckpt, out, overwrite=True)
    import yaml

    assert yaml.safe_load(out.with_suffix(".yaml").read_text()) == module.cfg.to_dict()


def _rewrite_metadata(src: Path, dst: Path, change: dict) -> Path:
    """A copy of the safetensors ``src`` whose metadata entries are replaced by ``change`` (None removes one)."""
    with safe_open(str(src), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    for key, value in change.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_file(tensors, str(dst), metadata=meta)
    return dst


BROKEN = {
    "missing config": ({"config": None}, "'config' is missing"),
    "config not JSON": ({"config": '{"model": {"hidden": 8,'}, "not valid JSON"),
    "config not an object": ({"config": "[1, 2]"}, "not the expected type"),
    "unknown config key": ({"config": json.dumps({"model": {"widht": 8}})}, "unknown config key model.widht"),
    "foreign format": ({"format": "something-else"}, "is not a diffgen"),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_broken_metadata_is_a_one_line_error(trained, tmp_path, broken):
    task, _, ckpt = trained
    ckpts = CHECKPOINTS[task]
    good = ckpts.export(ckpt, tmp_path / "good.safetensors")
    change, needle = BROKEN[broken]
    bad = _rewrite_metadata(good, tmp_path / "bad.safetensors", change)
    with pytest.raises(DiffgenError) as exc:
        ckpts.load(bad)
    _assert_one_line(exc, needle, str(bad))


@pytest.mark.parametrize("histogram", [None, "[0, 1", "[]", '[1, -2]'])
def test_generator_broken_node_histogram_is_a_one_line_error(tmp_path, histogram):
    module = _lightning_task("generation")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ckpt)
    good = generation_ckpt.export(ckpt, tmp_path / "good.safetensors")
    bad = _rewrite_metadata(good, tmp_path / "bad.safetensors", {"node_histogram": histogram})
    with pytest.raises(DiffgenError) as exc:
        generation_ckpt.load(bad)
    _assert_one_line(exc, "node_histogram", str(bad))


def test_weights_that_do_not_fit_the_config_are_a_one_line_error(trained, tmp_path):
    task, module, ckpt = trained
    ckpts = CHECKPOINTS[task]
    good = ckpts.export(ckpt, tmp_path / "good.safetensors")
    bigger = module.cfg.to_dict()
    bigger["model"]["hidden"] = 16
    bad = _rewrite_metadata(good, tmp_path / "bad.safetensors", {"config": json.dumps(bigger)})
    with pytest.raises(DiffgenError) as exc:
        ckpts.load(bad)
    _assert_one_line(exc, "does not match its config")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_or_foreign_files_are_one_line_errors(tmp_path, content, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(content)
    for ckpts in CHECKPOINTS.values():
        with pytest.raises(DiffgenError) as exc:
            ckpts.load(path)
        _assert_one_line(exc, str(path))
    with pytest.raises(DiffgenError) as exc:
        dynamics_ckpt.load(tmp_path / "missing.ckpt")
    _assert_one_line(exc, "not found")


def test_inference_imports_no_lightning():
    """Loading and running each task's model (and the CLI module tree) does not import Lightning."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "import diffgen.cli\n"
        "from diffgen.tasks.generation.checkpoints import load as load_gen\n"
        "from diffgen.tasks.regression.checkpoints import load as load_reg\n"
        "from diffgen.tasks.regression.predict import predict\n"
        "import diffgen.tasks.dynamics.checkpoints, diffgen.tasks.dynamics.evaluate, diffgen.tasks.dynamics.predict\n"
        "gen, _ = load_gen()\n"
        "reg, _ = load_reg()\n"
        "out = predict(reg, [([6, 1, 1, 1, 1], [[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63],"
        " [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]])])\n"
        "assert out.shape == (1, 1)\n"
        "assert 'pytorch_lightning' not in sys.modules and 'lightning' not in sys.modules, 'Lightning imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_generator_export_with_raw_weights_restarts_training_where_it_was(tmp_path):
    """An export made with ``with_raw`` carries both weight sets: ``init_from`` puts the EMA weights into the EMA
    model and the trained ones into the trained model (a plain export starts both at the EMA weights); sampling
    from the file still uses the EMA weights."""
    import torch

    from diffgen.tasks.generation.checkpoints import export, load_generator
    from diffgen.tasks.generation.config import config_from_dict
    from diffgen.tasks.generation.module import GenerationTask

    cfg = config_from_dict({"model": {"hidden": 8, "n_layers": 1}})
    hist = [0, 0, 0, 5, 5]
    task = GenerationTask(cfg.to_dict(), hist)
    with torch.no_grad():
        for p in task.diffusion.parameters():
            p.add_(torch.randn_like(p))  # trained weights and EMA weights now differ
    ckpt = tmp_path / "run.ckpt"
    torch.save({"hyper_parameters": {"config": cfg.to_dict(), "node_histogram": hist},
                "state_dict": task.state_dict(), "global_step": 7}, ckpt)
    both = export(ckpt, tmp_path / "both.safetensors", dtype=torch.float32, with_raw=True)
    ema_only = export(ckpt, tmp_path / "ema.safetensors", dtype=torch.float32)

    fresh = GenerationTask(cfg.to_dict(), hist)
    fresh.init_weights_from(str(both))
    for name, module in (("diffusion", task.diffusion), ("ema", task.ema.module)):
        got = (fresh.diffusion if name == "diffusion" else fresh.ema.module).state_dict()
        for k, v in module.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=f"{name} {k}")
    plain = GenerationTask(cfg.to_dict(), hist)
    plain.init_weights_from(str(ema_only))
    for k, v in task.ema.module.state_dict().items():
        torch.testing.assert_close(plain.diffusion.state_dict()[k], v, rtol=0, atol=0)
    sampled = load_generator(both).diffusion.state_dict()
    for k, v in task.ema.module.state_dict().items():
        torch.testing.assert_close(sampled[k], v, rtol=0, atol=0)
    # the loaded average survives the first EMA updates (blended at the configured decay, not overwritten)
    fresh.ema.update_parameters(fresh.diffusion)
    d = cfg.optim.ema_decay
    for k, v in fresh.ema.module.state_dict().items():
        if v.is_floating_point() and k in dict(fresh.diffusion.named_parameters()):
            expected = d * task.ema.module.state_dict()[k] + (1 - d) * task.diffusion.state_dict()[k]
            torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-6, msg=k)


def _generation_ckpt(path: Path, shift: float, config: dict | None = None, histogram: list | None = None) -> Path:
    """A tiny generator ``.ckpt`` whose EMA weights are the seeded weights plus ``shift`` (trained weights + 1 more)."""
    from diffgen.tasks.generation.module import GenerationTask

    torch.manual_seed(0)
    module = GenerationTask(config or {"model": {"hidden": 8, "n_layers": 1}, "diffusion": {"T": 20}},
                            histogram or HISTOGRAM)
    with torch.no_grad():
        for p in module.ema.module.parameters():
            p.add_(shift)
        for p in module.diffusion.parameters():
            p.add_(shift + 1.0)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(), "global_step": 7}, path)
    return path


def test_generator_export_of_several_checkpoints_writes_the_mean_of_their_ema_weights(tmp_path):
    paths = [_generation_ckpt(tmp_path / f"s{i}.ckpt", shift) for i, shift in enumerate((0.0, 0.3, 0.9))]
    emas = [generation_ckpt.load(p)[0].diffusion.state_dict() for p in paths]
    out = generation_ckpt.export(paths, tmp_path / "avg.safetensors", dtype=torch.float32)
    gen, cfg = generation_ckpt.load(out)
    got = gen.diffusion.state_dict()
    assert list(got) == list(emas[0])
    floating = [k for k, v in emas[0].items() if v.is_floating_point()]
    assert floating
    for k in floating:  # the mean of the EMA weights (shift 0.4), not of the trained ones (shift 1.4)
        torch.testing.assert_close(got[k], (emas[0][k] + emas[1][k] + emas[2][k]) / 3, rtol=0, atol=1e-6)
    assert any(not torch.equal(got[k], emas[1][k]) for k in floating)
    assert cfg.to_dict() == generation_ckpt.load(paths[0])[1].to_dict()
    assert gen.node_dist.histogram.tolist() == HISTOGRAM
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["averaged_from"]) == ["s0.ckpt", "s1.ckpt", "s2.ckpt"]
    # one checkpoint given as a list is a plain export
    single = generation_ckpt.export([paths[1]], tmp_path / "one.safetensors", dtype=torch.float32)
    for k, v in generation_ckpt.load(single)[0].diffusion.state_dict().items():
        assert torch.equal(v, emas[1][k])


@pytest.mark.parametrize("other, fragment", [
    ({"config": {"model": {"hidden": 16, "n_layers": 1}, "diffusion": {"T": 20}}}, "model configs differ"),
    ({"config": {"model": {"hidden": 8, "n_layers": 1}, "diffusion": {"T": 30}}}, "diffusion configs differ"),
    ({"histogram": [0, 0, 2, 3, 2]}, "atom-count histograms differ"),
])
def test_generator_average_of_checkpoints_of_different_models_is_a_one_line_error(tmp_path, other, fragment):
    a = _generation_ckpt(tmp_path / "a.ckpt", 0.0)
    b = _generation_ckpt(tmp_path / "b.ckpt", 0.1, other.get("config"), other.get("histogram"))
    out = tmp_path / "avg.safetensors"
    with pytest.raises(DiffgenError) as exc:
        generation_ckpt.export([a, b], out)
    _assert_one_line(exc, "cannot average", str(b), fragment)
    assert not out.exists() and not out.with_suffix(".yaml").exists()


def test_generator_average_error_paths(tmp_path):
    a = _generation_ckpt(tmp_path / "a.ckpt", 0.0)
    out = tmp_path / "avg.safetensors"
    for paths, fragment in (([a, tmp_path / "missing.ckpt"], "not found"), ([], "at least one checkpoint")):
        with pytest.raises(DiffgenError) as exc:
            generation_ckpt.export(paths, out)
        _assert_one_line(exc, fragment)
    with pytest.raises(DiffgenError) as exc:
        generation_ckpt.export([a, a], out, with_raw=True)
    _assert_one_line(exc, "--with-raw takes one checkpoint")
    assert not out.exists()


def test_average_states_checks_keys_shapes_and_integer_buffers():
    from diffgen.checkpoint_files import average_states

    paths = [Path("a.ckpt"), Path("b.ckpt")]
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16), "n": torch.tensor([3]), "s": torch.tensor([1.0],
                                                                                                    dtype=torch.float64)}
    b = {"w": torch.tensor([2.0, 5.0], dtype=torch.float16), "n": torch.tensor([3]), "s": torch.tensor([2.0],
                                                                                                    dtype=torch.float64)}
    mean = average_states([a, b], paths)
    assert mean["w"].dtype == torch.float32 and mean["w"].tolist() == [1.5, 3.5]  # averaged and returned in fp32
    assert mean["s"].dtype == torch.float64 and mean["s"].tolist() == [1.5]
    assert torch.equal(mean["n"], a["n"])
    for broken, fragment in (({**b, "n": torch.tensor([4])}, "n differs"),
                             ({**b, "w": torch.zeros(3)}, "w has shape (3,), not (2,)"),
                             ({"w": b["w"], "n": b["n"]}, "different weights (s)")):
        with pytest.raises(DiffgenError) as exc:
            average_states([a, broken], paths)
        _assert_one_line(exc, "cannot average b.ckpt with a.ckpt", fragment)
    with pytest.raises(ValueError):
        average_states([a, b], paths[:1])


def test_generator_average_takes_exports_and_ckpts_in_any_order_and_runs_with_other_training_settings(tmp_path):
    """An fp32 average is the same whichever comes first, an fp16 export or a ``.ckpt`` (nothing is rounded to the
    first file's dtype); checkpoints that differ only in training settings (here ``optim.lr``) are averaged, with
    the config of the first."""
    a = _generation_ckpt(tmp_path / "a.ckpt", 0.0)
    b = _generation_ckpt(tmp_path / "b.ckpt", 0.25, {"model": {"hidden": 8, "n_layers": 1}, "diffusion": {"T": 20},
                                                     "optim": {"lr": 3.0e-4}})
    a16 = generation_ckpt.export(a, tmp_path / "a16.safetensors", dtype=torch.float16)
    ab = generation_ckpt.export([a16, b], tmp_path / "ab.safetensors", dtype=torch.float32)
    ba = generation_ckpt.export([b, a16], tmp_path / "ba.safetensors", dtype=torch.float32)
    (gen_ab, cfg_ab), (gen_ba, cfg_ba) = generation_ckpt.load(ab), generation_ckpt.load(ba)
    want = {k: (generation_ckpt.load(a16)[0].diffusion.state_dict()[k] + v) / 2
            for k, v in generation_ckpt.load(b)[0].diffusion.state_dict().items()}
    for k, v in gen_ab.diffusion.state_dict().items():
        assert torch.equal(v, gen_ba.diffusion.state_dict()[k]), k
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)
    assert cfg_ab.optim.lr != cfg_ba.optim.lr and cfg_ba.optim.lr == 3.0e-4
