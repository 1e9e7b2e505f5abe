"""The one config mechanism: packaged defaults, one-line errors for bad values, plain-data round trips."""
from __future__ import annotations

import math

import pytest

from diffgen.config import packaged_configs, resolve_config
from diffgen.errors import DiffgenError
from diffgen.tasks.dynamics.config import dynamics_config_from_dict, load_dynamics_config
from diffgen.tasks.generation.config import config_from_dict, load_generation_config
from diffgen.tasks.regression.config import load_regression_config, regression_config_from_dict

LOADERS = {"generation": load_generation_config, "regression": load_regression_config,
           "dynamics": load_dynamics_config}
TASK_OF = {"qm9_egnn": "generation", "qm9_egnn_edm": "generation", "qm9_regress": "regression",
           "nbody_egnn": "dynamics", "nbody_egnn_vec": "dynamics", "md_alanine_egnn": "dynamics",
           "md_alanine_eghn": "dynamics"}


def test_every_packaged_config_loads_by_name_outside_the_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: names must resolve inside the package
    assert sorted(packaged_configs()) == sorted(TASK_OF)
    for name, task in TASK_OF.items():
        cfg = LOADERS[task](name)
        assert cfg.model.hidden >= 1
        assert resolve_config(f"configs/{name}.yaml") == resolve_config(name)


def test_unknown_config_name_lists_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DiffgenError, match="packaged configs: .*qm9_egnn"):
        load_generation_config("qm9_egnnn")


@pytest.mark.parametrize("task", sorted(LOADERS))
@pytest.mark.parametrize("override, fragment", [
    ("model.hidden=0", "model.hidden must be >= 1"),
    ("model.n_layers=-2", "model.n_layers must be >= 1"),
    ("optim.lr=nan", "optim.lr must be a finite number"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("trainer.precision=bogus", "trainer.precision must be one of"),
    ("data.batch_size=0", "data.batch_size must be >= 1"),
    ("model.hidden=abc", "model.hidden must be int"),
    ("model.nope=1", "unknown config key model.nope"),
])
def test_bad_values_are_one_line_errors(task, override, fragment):
    with pytest.raises(DiffgenError) as info:
        LOADERS[task](None, [override])
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("override, fragment", [
    ("diffusion.T=0", "diffusion.T must be >= 1"),
    ("diffusion.schedule=linear", "diffusion.schedule must be one of polynomial, cosine"),
    ("optim.ema_decay=1.5", "optim.ema_decay must be <= 1"),
    ("model.graph=radius", "model.cutoff is needed"),
])
def test_generation_specific_errors(override, fragment):
    with pytest.raises(DiffgenError, match=fragment):
        load_generation_config("qm9_egnn", [override])


def test_precision_given_as_a_number_is_accepted():
    assert load_generation_config(None, ["trainer.precision=32"]).trainer.precision == "32"


def test_stored_configs_round_trip_as_plain_data():
    for build, cfg in ((config_from_dict, load_generation_config("qm9_egnn")),
                       (regression_config_from_dict, load_regression_config("qm9_regress")),
                       (dynamics_config_from_dict, load_dynamics_config("md_alanine_eghn"))):
        data = cfg.to_dict()
        assert build(data) == cfg
        assert all(isinstance(v, dict) for v in data.values())  # nested plain dicts, nothing pickled


def test_old_regression_checkpoint_configs_still_load():
    old = {"trainer": {"sample_every_n_epochs": 5, "n_eval_samples": 100, "eval_steps": 100, "max_epochs": 5}}
    assert regression_config_from_dict(old).trainer.max_epochs == 5
    with pytest.raises(DiffgenError, match="unknown config key trainer.sample_every_n_epochs"):
        load_regression_config(None, ["trainer.sample_every_n_epochs=1"])


def test_float_fields_refuse_infinity():
    with pytest.raises(DiffgenError, match="finite"):
        load_dynamics_config(None, [f"optim.lr={math.inf}"])


def test_string_overrides_keep_their_text():
    cfg = load_generation_config(None, ["trainer.out_dir=007", "trainer.max_time=10:00:00:00"])
    assert cfg.trainer.out_dir == "007" and cfg.trainer.max_time == "10:00:00:00"  # not 7, not base-60 2160000
    assert load_generation_config(None, ["trainer.out_dir=yes"]).trainer.out_dir == "yes"
    assert load_generation_config(None, ["trainer.max_time=null"]).trainer.max_time is None


def test_a_base60_number_in_yaml_is_refused_for_a_string_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  max_time: 10:00:00:00\n")  # YAML 1.1 reads this as the integer 2160000
    with pytest.raises(DiffgenError, match="trainer.max_time must be a string, got 2160000 .quote it"):
        load_generation_config(path)


def test_batch_limits_keep_count_or_fraction():
    cfg = load_generation_config(None, ["trainer.limit_train_batches=1", "trainer.limit_val_batches=0.05"])
    assert cfg.trainer.limit_train_batches == 1 and isinstance(cfg.trainer.limit_train_batches, int)
    assert cfg.trainer.limit_val_batches == 0.05 and isinstance(cfg.trainer.limit_val_batches, float)


def test_cosine_schedules_need_an_end():
    with pytest.raises(DiffgenError, match="scheduler=cosine needs"):
        load_regression_config(None, ["trainer.max_epochs=-1", "trainer.max_steps=-1"])
    assert load_regression_config(None, ["trainer.max_epochs=-1", "trainer.max_steps=100"]).trainer.max_steps == 100
    with pytest.raises(DiffgenError, match="lr_schedule=cosine"):
        load_dynamics_config(None, ["optim.lr_schedule=cosine", "trainer.max_epochs=-1"])
