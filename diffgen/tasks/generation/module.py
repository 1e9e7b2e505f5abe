"""Generation task: the LightningModule that trains an EGNN denoiser inside the EDM diffusion.

Training recipe (Hoogeboom et al. 2022, App. B): AdamW, EMA of the weights, gradient-norm clipping
adaptive to the recent norms (clip at mean + 2 std of the last 50 norms, after a 1.5x margin),
eps-prediction L2 loss. Validation: the same loss on the valid split every epoch, and every
``sample_every_n_epochs`` the EDM metrics of a few molecules sampled from the EMA weights.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.optim.swa_utils import AveragedModel

from diffgen.tasks.generation.config import GenerationConfig, config_from_dict
from diffgen.tasks.generation.build import build_diffusion
from diffgen.tasks.lr_schedule import step_scheduler
from diffgen.diffusion.samplers import NodeCountDistribution, ancestral_sample


class GenerationTask(pl.LightningModule):
    """Lightning wrapper: ``training_step`` = EDM loss; ``self.ema`` holds the EMA weights used for sampling.

    Args:
        config: nested dict of a :class:`~diffgen.tasks.generation.config.GenerationConfig` (stored in the checkpoint).
        node_histogram: training atom-count histogram ``[max_n + 1]`` (stored in the checkpoint).
    """

    def __init__(self, config: dict, node_histogram: list[int]):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = config_from_dict(config)
        self.diffusion = build_diffusion(self.cfg)
        self.ema = AveragedModel(self.diffusion, multi_avg_fn=ema_with_warmup(self.cfg.optim.ema_decay),
                                 use_buffers=True)
        self.ema.requires_grad_(False)
        self.node_dist = NodeCountDistribution(node_histogram)
        self._grad_norms: deque[float] = deque(maxlen=50)

    # --- training -----------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        loss = self.diffusion.loss(batch.pos, batch.z, batch.batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.num_graphs)
        self.log("train/molecules", float(batch.num_graphs), reduce_fx="sum", batch_size=batch.num_graphs)
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # the EMA follows each optimizer step here, not in on_train_batch_end: callbacks run before the module's
        # batch-end hook, so a checkpoint saved at a batch end would hold an EMA one update behind its weights
        self.ema.update_parameters(self.diffusion)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["grad_norms"] = list(self._grad_norms)  # the adaptive clipping's history, so a resume clips alike

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._grad_norms = deque((float(v) for v in checkpoint.get("grad_norms", [])), maxlen=self._grad_norms.maxlen)

    def validation_step(self, batch, batch_idx):
        # the same times, noise and self-conditioning coin every epoch, so val/loss moves only with the weights
        gen = torch.Generator(device="cpu").manual_seed(batch_idx)
        t = torch.rand(batch.num_graphs, generator=gen).to(batch.pos.device)
        noise_gen = torch.Generator(device=batch.pos.device)
        noise_seed = 1_000_003 + batch_idx
        loss = self.ema.module.loss(batch.pos, batch.z, batch.batch, t=t, generator=noise_gen.manual_seed(noise_seed))
        self.log("val/loss", loss, prog_bar=True, batch_size=batch.num_graphs, sync_dist=True)
        d = self.cfg.diffusion
        if d.loss_weight != "uniform" or d.type_loss != "mse":  # the plain eps-MSE, comparable across recipes
            plain = self.ema.module.loss(batch.pos, batch.z, batch.batch, t=t, weighted=False,
                                         generator=noise_gen.manual_seed(noise_seed))
            self.log("val/eps_mse", plain, batch_size=batch.num_graphs, sync_dist=True)

    def on_validation_epoch_end(self):
        tc = self.cfg.trainer
        if self.trainer.sanity_checking or tc.sample_every_n_epochs <= 0 or tc.n_eval_samples <= 0:
            return
        if (self.current_epoch + 1) % tc.sample_every_n_epochs != 0 or not self.trainer.is_global_zero:
            return
        from diffgen.eval.chem import GenerationMetrics

        gen = torch.Generator().manual_seed(1234)
        n_atoms = self.node_dist.sample(tc.n_eval_samples, gen)
        out = ancestral_sample(self.ema.module.eval(), n_atoms, steps=tc.eval_steps, generator=gen)
        metrics = GenerationMetrics()
        metrics.update(out.molecules())
        for key, value in metrics.compute().items():
            if isinstance(value, float):
                self.log(f"sample/{key}", value, rank_zero_only=True)

    def configure_optimizers(self):
        o = self.cfg.optim
        opt = torch.optim.AdamW(self.diffusion.parameters(), lr=o.lr, weight_decay=o.weight_decay, amsgrad=True)
        return step_scheduler(opt, o.lr_factor)

    def init_weights_from(self, path: str) -> None:
        """Start from the weights of a generator checkpoint: its EMA weights into the EMA model, its trained weights
        (a Lightning ``.ckpt``, or an export made with ``with_raw``) into the trained model, else the EMA ones.

        Raises:
            DiffgenError: unreadable checkpoint, or weights that do not fit this task's model config.
        """
        from diffgen.checkpoint_files import load_weights
        from diffgen.tasks.generation.checkpoints import read_training_weights

        ema, raw = read_training_weights(path)
        load_weights(self.ema.module, ema, Path(path))
        load_weights(self.diffusion, raw or ema, Path(path))
        # AveragedModel copies the trained weights over the average while its count is 0: count the loaded average
        # as long-established, so the next updates blend in at the configured decay instead of replacing it
        self.ema.n_averaged.fill_(EMA_WARM_COUNT)
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        o = self.cfg.optim
        params = [p for p in self.diffusion.parameters() if p.grad is not None]
        if o.clip_adaptive:
            if len(self._grad_norms) < 2:
                max_norm = float("inf")  # not enough history yet
            else:
                hist = torch.tensor(list(self._grad_norms))
                max_norm = float(1.5 * hist.mean() + 2 * hist.std())
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            self._grad_norms.append(min(norm, max_norm))
            self.log("train/grad_norm", norm, batch_size=1)
        elif o.clip_value > 0:
            torch.nn.utils.clip_grad_norm_(params, o.clip_value)


#: EMA update count given to an average loaded with ``optim.init_from``: past the warm-up, the decay is the config's.
EMA_WARM_COUNT = 10_000


def ema_with_warmup(decay: float):
    """EMA update ``ema <- d ema + (1 - d) w`` with ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates.

    The warm-up keeps the average close to the current weights early in training, when averaging
    in the random initial weights would make the EMA model useless for thousands of steps.
    For ``torch.optim.swa_utils.AveragedModel(multi_avg_fn=...)``.
    """

    @torch.no_grad()
    def update(ema_params, params, num_averaged):
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(ema_params, params, 1 - d)

    return update


def train_generation(cfg: GenerationConfig) -> GenerationTask:
    """Train (or resume from the newest checkpoint in ``cfg.trainer.out_dir``) the generator on QM9
    (:func:`diffgen.tasks.trainer.fit`); ``optim.init_from`` gives starting weights for a fresh run.

    Returns the trained task; the best/last checkpoints are in ``cfg.trainer.out_dir/checkpoints``.
    """
    from diffgen.data.datamodule import PackedQM9DataModule, QM9DataModule
    from diffgen.tasks.trainer import fit, seed_everything

    seed_everything(cfg.trainer.seed)
    d = cfg.data
    if d.loader == "resident" or d.packed:
        dm = PackedQM9DataModule(d.packed, d.root, d.batch_size, seed=cfg.trainer.seed, remove_h=d.remove_h)
    else:
        dm = QM9DataModule(d.root, d.batch_size, d.remove_h, d.num_workers, d.subset)
    task = GenerationTask(cfg.to_dict(), dm.node_histogram().tolist())
    if cfg.trainer.compile:
        # in place (nn.Module.compile): parameter names, hence checkpoints, stay those of the eager model; the EMA
        # copy used for validation and sampling stays eager. Only the backbone: the loss has data-dependent shapes.
        task.diffusion.denoiser.backbone.compile(dynamic=True)
    init = None if cfg.optim.init_from is None else (lambda t: t.init_weights_from(cfg.optim.init_from))
    fit(task, dm, cfg.trainer, init=init)
    return task
