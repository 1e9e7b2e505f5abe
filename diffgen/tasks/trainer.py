"""Shared Lightning training for every task: loggers, atomic checkpoints, safe resume, Ctrl-C handling.

Every task (generation, regression, dynamics) trains through :func:`fit`, so all of them get

* CSV + TensorBoard logs and a progress bar;
* periodic, best and last checkpoints written atomically (temporary file + ``os.replace``), always under the same
  names (no ``last-v1.ckpt``: Lightning's version counter is off); with ``trainer.keep_every_n_steps`` also
  ``checkpoints/kept/stepN.ckpt``, none deleted (a generator's can be averaged: ``diffgen export``);
* automatic resume from the **newest** checkpoint of ``out_dir/checkpoints`` (by global step), read with
  ``torch.load(weights_only=True)`` (a checkpoint is never unpickled) and checked against the model before
  training starts, so a truncated file or one of another model size is a one-line error;
* an exact resume (:class:`ExactResume`): checkpoints carry the random-number states (torch CPU/CUDA, numpy,
  ``random``), restored just before the first resumed training batch, and validation does not draw from the
  training stream; a run stopped at the end of an epoch and resumed gives the same losses and weights as an
  uninterrupted one (single process; a resume mid-epoch restarts the epoch's data order, as Lightning does);
* Ctrl-C (SIGINT, single process): the current training step is finished, ``last.ckpt`` is saved at that step
  and :class:`KeyboardInterrupt` propagates (the CLI exits with code 130); a second Ctrl-C stops at once;
* multi-GPU / multi-process DDP via ``accelerator`` / ``devices``.
"""
from __future__ import annotations

import inspect
import os
import random
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, RichProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from diffgen.checkpoint_files import first_line, read_lightning
from diffgen.config import TrainerConfig
from diffgen.errors import DiffgenError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to ``<path>.tmp`` then renames it, so a crash never leaves a torn file; reads with
    ``weights_only=True`` (tensors and plain data only), so resuming never runs code stored in a file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return read_lightning(Path(path))


def _cuda_rng_state() -> list[torch.Tensor]:
    """The current CUDA device's generator state (a list: empty where CUDA is not in use, so never initialised
    here; DDP runs one device per process)."""
    return [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []


def rng_states() -> dict:
    """The random-number states of torch (CPU and the current CUDA device), numpy and ``random``, as tensors and
    plain numbers only (a checkpoint holding them still loads with ``torch.load(weights_only=True)``)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": _cuda_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def set_rng_states(states: dict) -> None:
    """Restore states from :func:`rng_states` (the CUDA one where CUDA is available; applied on its first use)."""
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda[0])
    npy = states["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    py = states["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))


def _raw_rng_states() -> tuple:
    return torch.get_rng_state(), _cuda_rng_state(), np.random.get_state(), random.getstate()


def _set_raw_rng_states(states: tuple) -> None:
    cpu, cuda, npy, py = states
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state(cuda[0])
    np.random.set_state(npy)
    random.setstate(py)


class ExactResume(Callback):
    """Makes a resumed run continue the uninterrupted one, not just its weights.

    * Every checkpoint stores :func:`rng_states` (key ``rng_states``); after a resume they are restored in
      ``on_train_start``: after the checkpoint is loaded and the sanity-check validation (which Lightning runs
      with the random states isolated), before the first resumed batch is drawn.
    * From ``on_train_start`` on, the training and validation ``DataLoader`` objects draw the seed they make for
      each new iterator (a seed for their workers) from generators of their own, not from torch's global one: on a
      resume Lightning makes a different number of iterators before the first batch (one or two, depending on
      where the checkpoint was saved, and a validation one to fast-forward the validation loop), which would
      shift the global stream. The shuffling sampler still draws each epoch's order from the global generator at
      the epoch's first batch, so the order is part of the restored stream.
    * Validation (and the sampling some tasks run in it) does not advance the training stream: the states of the
      last training batch end are put back when validation ends, so training does not depend on when validation
      runs (a resumed run skips the validation its checkpoint was saved before).
    * A checkpoint saved after the last batch of an epoch by ``on_train_end`` (``max_steps`` reached) records a
      finished epoch whose batch counter Lightning does not reset on resume, so it would run an empty epoch;
      the counter is reset on load. The step Lightning logs under is set back to the global step (Lightning
      shifts it by one on a resume).

    Single process: in DDP every rank gets rank 0's states.
    """

    def __init__(self):
        self._pending: dict | None = None  # loaded states, restored in on_train_start
        self._fix_log_step = False
        self._stream: tuple | None = None  # raw states at the last training batch end

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # before they are restored (e.g. Ctrl-C in a resumed run's setup) the loaded states are the right ones
        checkpoint["rng_states"] = self._pending if self._pending is not None else rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._pending = checkpoint.get("rng_states")
        self._fix_log_step = True
        _reset_finished_epoch_batches(checkpoint)

    def on_train_start(self, trainer, pl_module) -> None:
        for loader in _flatten([trainer.train_dataloader, trainer.val_dataloaders]):
            if isinstance(loader, torch.utils.data.DataLoader) and loader.generator is None:
                loader.generator = torch.Generator().manual_seed(torch.initial_seed())
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._fix_log_step:  # after Lightning's restart bookkeeping, before the first resumed step is logged
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
            self._fix_log_step = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stream = _raw_rng_states()  # cheap copies; converted only when a checkpoint is written

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._stream is None and not trainer.sanity_checking:  # validation before any batch of this run
            self._stream = _raw_rng_states()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._stream is not None and not trainer.sanity_checking:  # Lightning isolates the sanity check itself
            _set_raw_rng_states(self._stream)
            self._stream = None


def _flatten(loaders) -> list:
    if isinstance(loaders, dict):
        return [x for v in loaders.values() for x in _flatten(v)]
    if isinstance(loaders, (list, tuple)):
        return [x for v in loaders for x in _flatten(v)]
    return [loaders]


def _reset_finished_epoch_batches(checkpoint: dict) -> None:
    """Reset the current-epoch batch counter of a checkpoint whose epoch finished (see :class:`ExactResume`)."""
    loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epoch = (loop.get("epoch_progress") or {}).get("current") or {}
    batches = loop.get("epoch_loop.batch_progress") or {}
    current = batches.get("current")
    finished = epoch and len({epoch.get(k) for k in ("ready", "started", "processed", "completed")}) == 1
    if finished and isinstance(current, dict) and current.get("completed", 0) > 0:
        batches["current"] = {k: 0 for k in current}
        batches["is_last_batch"] = False


class SaveLastCheckpoint(Callback):
    """Refresh ``last.ckpt`` when fitting ends (``max_time``/``max_steps``/``max_epochs``) and on Ctrl-C, so a resume
    never repeats the steps done since the last periodic checkpoint. Only one ModelCheckpoint may own ``save_last``
    (two would write ``last-v1.ckpt``), hence this separate callback.

    Ctrl-C (single process, main thread): the first SIGINT only asks to stop; the running training step finishes,
    ``last.ckpt`` is written at its end (the same point as a periodic checkpoint, so no half-applied optimizer
    step and the EMA matches the weights), and :class:`KeyboardInterrupt` is raised once that step is logged.
    A second SIGINT interrupts at once (``last.ckpt`` is then saved wherever training stood).
    """

    def __init__(self, path: Path):
        self.path = path
        self.stop_requested = False
        self._stop_now = False
        self._saved_step = 0  # global step last.ckpt was last written at (or resumed from)
        self._previous_handler = None

    # --- Ctrl-C ---------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size == 1 and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def _on_sigint(self, signum, frame) -> None:
        if self.stop_requested:
            self._restore_handler()
            raise KeyboardInterrupt
        self.stop_requested = True
        print("\nCtrl-C: stopping after this training step (press again to stop at once)", file=sys.stderr,
              flush=True)

    def _raise_if_stopping(self) -> None:
        if self._stop_now:
            self._stop_now = False
            raise KeyboardInterrupt

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._raise_if_stopping()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._raise_if_stopping()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._raise_if_stopping()

    # --- saving ----------------------------------------------------------------------------
    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._saved_step = int(checkpoint.get("global_step", 0))

    def _save(self, trainer: pl.Trainer) -> None:
        # weights_only here is Lightning's "save the weights only" switch (off: the full training state)
        trainer.save_checkpoint(str(self.path), weights_only=False)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stop_requested and not self._stop_now:
            self._save(trainer)
            self._stop_now = True  # raised at the next hook, after Lightning has logged this step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stop_now:  # Ctrl-C on the very last step: last.ckpt is already written
            self._raise_if_stopping()
        self._save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if isinstance(exception, KeyboardInterrupt) and trainer.global_step > self._saved_step:
            self._save(trainer)


class KeptCheckpoints(ModelCheckpoint):
    """Every N-th step's checkpoint in ``checkpoints/kept/``, none deleted (``trainer.keep_every_n_steps``). A class
    of its own: Lightning keys a callback's saved state by class name and settings, so it may save at the same
    interval as the periodic checkpoint (two ModelCheckpoints with one key are refused)."""


def make_trainer(tc: TrainerConfig, monitor: str = "val/loss", extra_callbacks: list | None = None) -> pl.Trainer:
    """A ``pl.Trainer`` writing to ``tc.out_dir`` (``checkpoints/``, ``csv/``, ``tb/``)."""
    out = Path(tc.out_dir)
    ckpt_dir = out / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", every_n_train_steps=tc.ckpt_every_n_steps,
                        save_last=True, save_top_k=1, monitor=None, auto_insert_metric_name=False,
                        enable_version_counter=False),
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="min", save_top_k=1,
                        auto_insert_metric_name=False, enable_version_counter=False),
        SaveLastCheckpoint(ckpt_dir / "last.ckpt"),
        ExactResume(),
        LearningRateMonitor(),
        RichProgressBar(),
        *(extra_callbacks or []),
    ]
    if tc.keep_every_n_steps:  # a subfolder: resume_path looks at checkpoints/*.ckpt only
        callbacks.append(KeptCheckpoints(dirpath=ckpt_dir / "kept", filename="step{step}", monitor=None,
                                         every_n_train_steps=tc.keep_every_n_steps, save_top_k=-1,
                                         auto_insert_metric_name=False, enable_version_counter=False))
    return pl.Trainer(
        default_root_dir=str(out),
        max_epochs=tc.max_epochs,
        max_steps=tc.max_steps,
        max_time=tc.max_time,
        accelerator=tc.accelerator,
        devices=tc.devices,
        strategy=tc.strategy,
        num_nodes=tc.num_nodes,
        precision=tc.precision,
        log_every_n_steps=tc.log_every_n_steps,
        limit_train_batches=tc.limit_train_batches,
        limit_val_batches=tc.limit_val_batches,
        # metrics.csv is written at every logging step (Lightning's default: every 100 steps), so it is current
        logger=[CSVLogger(str(out), name="csv", flush_logs_every_n_steps=tc.log_every_n_steps),
                TensorBoardLogger(str(out), name="tb")],
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )


def resume_path(tc: TrainerConfig) -> str | None:
    """The checkpoint in ``out_dir/checkpoints`` with the highest global step, or None.

    Every ``*.ckpt`` there is considered (``last.ckpt``, periodic ``stepN.ckpt``, ``best.ckpt``), so a stale
    ``last.ckpt`` never sends a run back. The step is read from the file (``weights_only=True``). On a tie
    ``last.ckpt`` wins, then a periodic one, then ``best.ckpt`` (the same step, saved after validation), then the
    name, so the choice never depends on the order the folder is listed in.

    Raises:
        DiffgenError: a checkpoint there cannot be read (truncated, corrupt, not a Lightning checkpoint).
    """
    folder = Path(tc.out_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    best: tuple | None = None
    for path in folder.glob("*.ckpt"):
        step = read_lightning(path).get("global_step")
        if not isinstance(step, int):
            raise DiffgenError(f"cannot resume from {path}: it holds no global_step (not a Lightning checkpoint)")
        key = (step, path.name == "last.ckpt", path.name != "best.ckpt", path.name)
        if best is None or key > best[0]:
            best = (key, path)
    return None if best is None else str(best[1])


def check_resumable(task: pl.LightningModule, path: str) -> None:
    """Raise a one-line DiffgenError if the weights in checkpoint ``path`` do not fit ``task`` (e.g. another model
    size in the config than the run was started with); the message names the first differing tensor. The weights
    are loaded into ``task`` (as resuming will)."""
    state = read_lightning(Path(path)).get("state_dict")
    if not isinstance(state, dict):
        raise DiffgenError(f"cannot resume from {path}: it holds no state_dict")
    try:  # load_state_dict runs the modules' pre-hooks (e.g. EGNN weights saved under their pre-split names)
        task.load_state_dict(state, strict=True)
        return
    except RuntimeError as exc:
        detail = first_line(exc)
    own = task.state_dict()
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
              if isinstance(state.get(k), torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if shapes:
        key, theirs, ours = shapes[0]
        detail = (f"{key} has shape {list(theirs)} in the checkpoint, {list(ours)} in the model"
                  + (f", and {len(shapes) - 1} more tensors differ" if len(shapes) > 1 else ""))
    elif missing or extra:
        detail = f"{len(missing)} tensors missing, {len(extra)} unexpected, e.g. {(missing or extra)[0]}"
    raise DiffgenError(f"cannot resume from {path}: it does not fit the configured model ({detail}); "
                       "use the run's own config or another --out-dir")


def seed_everything(seed: int) -> None:
    """``pl.seed_everything(seed, workers=True)`` without its "Seed set to N" line on stderr (which would precede
    a one-line error raised before training)."""
    if "verbose" in inspect.signature(pl.seed_everything).parameters:
        pl.seed_everything(seed, workers=True, verbose=False)
    else:  # older Lightning
        pl.seed_everything(seed, workers=True)


def warn_emulated_bf16(tc: TrainerConfig) -> bool:
    """Print a one-line warning (stderr) and return True when ``tc`` asks for bf16 training on a CPU that has no
    native bf16 matrix products (no AVX512-BF16 / AMX): there oneDNN emulates them, and a training step of the
    default generator took 6.9x longer than in fp32 (9.06 against 1.32 s, batch 64, 1 thread, 2-core AVX2 EPYC,
    `python benchmarks/generation.py train-throughput --resident [--bf16]`)."""
    from diffgen.devices import native_bf16

    on_cpu = tc.accelerator == "cpu" or (tc.accelerator == "auto" and not torch.cuda.is_available())
    if not (str(tc.precision).startswith("bf16") and on_cpu) or native_bf16("cpu"):
        return False
    print(f"warning: trainer.precision={tc.precision} on a CPU without native bf16 (AVX512-BF16/AMX) is emulated "
          "and several times slower than trainer.precision=32-true", file=sys.stderr, flush=True)
    return True


def fit(task: pl.LightningModule, datamodule: pl.LightningDataModule, tc: TrainerConfig,
        monitor: str = "val/loss", init: Callable[[pl.LightningModule], None] | None = None) -> pl.Trainer:
    """Train ``task`` on ``datamodule``: resume from the newest checkpoint in ``tc.out_dir`` if there is one, else call
    ``init(task)`` (e.g. load starting weights) and start fresh.

    Raises:
        DiffgenError: unreadable checkpoint or one that does not fit ``task``; with ``tc.keep_every_n_steps``, kept
            checkpoints of an earlier run but none to resume from (all before any training step).
        KeyboardInterrupt: Ctrl-C during training, after ``last.ckpt`` was saved at the current step.
    """
    ckpt = resume_path(tc)
    kept = Path(tc.out_dir) / "checkpoints" / "kept"
    if ckpt is None and tc.keep_every_n_steps and kept.is_dir() and any(kept.glob("*.ckpt")):
        raise DiffgenError(f"{kept} holds checkpoints of an earlier run but there is none to resume from: a fresh run "
                           "would mix its kept checkpoints with them; move that folder away first")
    if ckpt is not None:
        check_resumable(task, ckpt)
    elif init is not None:
        init(task)
    torch.set_float32_matmul_precision(tc.matmul_precision)
    warn_emulated_bf16(tc)
    trainer = make_trainer(tc, monitor=monitor)
    main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into sys.exit(1) after the on_exception hooks ran
            raise KeyboardInterrupt from None
        raise
    finally:
        if main_thread:  # Lightning ignores SIGINT after a Ctrl-C; give the caller its handler back
            signal.signal(signal.SIGINT, sigint)
    return trainer
