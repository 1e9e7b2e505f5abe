"""Lightning training on real QM9: a few steps, checkpoint, resume, export, and loading the export."""
from __future__ import annotations

import torch

from diffgen.tasks.generation.checkpoints import export_generator, load_generator
from diffgen.tasks.generation.config import load_generation_config as load_config
from diffgen.tasks.generation.build import sample_molecules
from diffgen.tasks.generation.module import train_generation


def tiny_config(out_dir, max_steps):
    return load_config("diffgen/configs/qm9_egnn.yaml", [
        f"trainer.out_dir={out_dir}", f"trainer.max_steps={max_steps}", "trainer.limit_val_batches=2",
        "trainer.ckpt_every_n_steps=2", "trainer.sample_every_n_epochs=1", "trainer.n_eval_samples=3",
        "trainer.eval_steps=2", "trainer.limit_train_batches=2", "trainer.accelerator=cpu", "trainer.devices=1",
        "model.hidden=16", "model.n_layers=2", "data.batch_size=8",
    ])


def test_train_checkpoint_resume_and_export(tmp_path):
    cfg = tiny_config(tmp_path / "run", max_steps=2)
    task = train_generation(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert task.trainer.global_step == 2
    first_ckpt = torch.load(last, weights_only=False)
    # EMA weights differ from the raw weights after training (decay < 1) and are finite
    ema = {k: v for k, v in first_ckpt["state_dict"].items() if k.startswith("ema.module.")}
    assert ema and all(torch.isfinite(v).all() for v in ema.values())

    # resuming continues from step 2 instead of starting over
    cfg2 = tiny_config(tmp_path / "run", max_steps=4)
    task2 = train_generation(cfg2)
    assert task2.trainer.global_step == 4
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == 4
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))  # atomic writes leave no debris

    out = export_generator(last, tmp_path / "tiny.safetensors")
    gen = load_generator(out)
    assert gen.config.model.hidden == 16
    mols = sample_molecules(gen.diffusion, gen.node_dist, 3, steps=3, seed=0)
    assert len(mols) == 3 and all(torch.isfinite(p).all() for _, p in mols)
    # the fp16 export matches the checkpoint's EMA weights to fp16 precision
    sd = gen.diffusion.state_dict()
    ema_last = {k[len("ema.module."):]: v for k, v in resumed["state_dict"].items() if k.startswith("ema.module.")}
    for k, v in ema_last.items():
        torch.testing.assert_close(sd[k], v.half().float())


def test_ema_warmup_tracks_recent_weights():
    from torch.optim.swa_utils import AveragedModel

    from diffgen.tasks.generation.module import ema_with_warmup

    model = torch.nn.Linear(3, 3)
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(0.999), use_buffers=True)
    ema.update_parameters(model)  # first call copies
    for _ in range(50):
        with torch.no_grad():
            model.weight.add_(0.1)
        ema.update_parameters(model)
    # with warm-up the average after 50 updates weights recent steps (d = 51/60); a plain 0.999 EMA would
    # still sit ~4.9 away from the current weights, the warmed-up one is within 1
    gap = (model.weight - ema.module.weight).abs().max().item()
    assert 0.05 < gap < 1.0


def test_single_last_checkpoint(tmp_path):
    """Only one last.ckpt is ever written (two save_last owners would create last-v1.ckpt and resume
    from a stale file), and it holds the final step even when the run stops between periodic saves."""
    cfg = tiny_config(tmp_path / "run", max_steps=3)  # periodic checkpoints every 2 steps
    train_generation(cfg)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "last.ckpt" in names and not any(n.startswith("last-v") for n in names), names
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
