"""Sampling precision (``diffgen sample --precision``, ``precision=`` of the API): bf16 autocast gives nearly the
molecules of fp32 (same seed, same sampler), keeps seeds independent of the batch size, ``auto`` picks bf16 only
where the device computes it natively, and unknown names are one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import run_cli

import diffgen.devices as devices
from diffgen.errors import DiffgenError
from diffgen.tasks.generation.build import sample_molecules
from diffgen.tasks.generation.checkpoints import load_generator


@pytest.fixture(scope="module")
def shipped():
    return load_generator(None)


def _draw(gen, precision: str, batch_size: int = 6, steps: int = 4):
    return sample_molecules(gen.diffusion, gen.node_dist, 6, steps=steps, batch_size=batch_size, seed=3,
                            precision=precision)


def test_bf16_samples_are_close_to_fp32_but_not_identical(shipped):
    fp32, bf16 = _draw(shipped, "fp32"), _draw(shipped, "bf16")
    same_types = [torch.equal(za, zb) for (za, _), (zb, _) in zip(fp32, bf16)]
    assert sum(same_types) >= 4, same_types  # a bf16 rounding can flip the argmax of a close type
    gaps = [float((pa - pb).abs().max()) for (za, pa), (zb, pb) in zip(fp32, bf16) if torch.equal(za, zb)]
    assert max(gaps) < 0.15, gaps  # Å, after 4 steps (measured 0.008-0.046)
    assert max(gaps) > 0, "bf16 gave bit-identical positions: autocast did not run"
    assert all(pos.dtype == torch.float32 for _, pos in bf16)


def test_bf16_seeds_do_not_depend_on_the_batch_size(shipped):
    whole, split = _draw(shipped, "bf16", batch_size=6), _draw(shipped, "bf16", batch_size=2)
    for (za, pa), (zb, pb) in zip(whole, split):
        assert torch.equal(za, zb)
        torch.testing.assert_close(pa, pb, atol=2e-3, rtol=0)


def test_auto_uses_bf16_only_with_native_support(monkeypatch):
    monkeypatch.setattr(devices, "native_bf16", lambda device="cpu": True)
    assert devices.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(devices, "native_bf16", lambda device="cpu": False)
    assert devices.resolve_precision("auto") == "fp32"
    assert devices.resolve_precision("bf16") == "bf16" and devices.resolve_precision("fp32") == "fp32"


def test_unknown_precision_is_a_user_error(shipped):
    with pytest.raises(DiffgenError, match="unknown precision 'fp16': choose auto, fp32, bf16"):
        _draw(shipped, "fp16")
    with pytest.raises(DiffgenError, match="unknown precision"):
        import diffgen

        diffgen.load_pretrained("qm9").sample(2, steps=2, precision="half")


def test_metrics_json_records_the_precision(tmp_path: Path):
    res = run_cli("sample", "--n", "2", "--steps", "2", "--precision", "fp32", "--out", str(tmp_path / "o"),
                  "--no-novelty")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["precision"] == "fp32"
    assert "(fp32)" in res.stdout
