"""The generator's training on one GPU, in chunks of one device call each, continuing the long CPU run.

Starts on a bare machine with PyTorch, Lightning and PyG (the device image): it runs diffgen from the source tree
(``PYTHONPATH=.``, no install) and reads QM9 from a packed tensor file (``diffgen pack-qm9``, 28.5 MB), so neither
qm9pack nor RDKit is needed there. Each chunk trains for ``--minutes`` (then Ctrl-C: the step in flight finishes
and ``last.ckpt`` is saved), exports the EMA weights as fp16 safetensors and copies ``last.ckpt`` (12 MB for the
4 x 128 network: weights, EMA, optimizer) to ``--out``; the next chunk resumes from it (``--resume``).
Scoring happens back on the CPU machine (RDKit).

One chunk through the device tool (the repo is sent as the working tree; ``.gpu/`` is git-ignored and carried)::

    diffgen pack-qm9 .gpu/qm9_packed.safetensors           # once, here
    # run(command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_run.py --minutes 8 --out $OUT", carry=[".gpu"])
    # next chunks: copy files_at/last.ckpt to .gpu/last.ckpt, and the same command with --resume .gpu/last.ckpt

The recipe is ``configs/qm9_egnn.yaml`` with the long run's 4 x 128 network and lr 5e-4, bf16 autocast, TF32 matmuls, the split resident on the GPU
(``data.loader=resident``), batch ``--batch-size`` (default 256) and, with ``--compile``, the compiled backbone.
Without ``--resume`` it starts from the long run's training state (``--init``, EMA + trained weights) with a
300-step learning-rate warm-up. ``--out/gpu_run.json`` records steps, wall time, molecules/s and the command.

Tested on the CPU with a tiny budget (``tests/test_gpu_run.py``: ``--accelerator cpu --max-steps 2``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=8.0, help="training wall time of this chunk")
    ap.add_argument("--out", required=True, help="folder for last.ckpt, the fp16 export and gpu_run.json")
    ap.add_argument("--data", default=".gpu/qm9_packed.safetensors", help="packed QM9 (diffgen pack-qm9)")
    ap.add_argument("--init", default="benchmarks/state/qm9_egnn_long.safetensors",
                    help="starting weights when not resuming (export with --with-raw)")
    ap.add_argument("--resume", default=None, help="last.ckpt of the previous chunk")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    ap.add_argument("--accelerator", default="gpu")
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--max-steps", type=int, default=-1, help="stop after this many global steps (tests)")
    ap.add_argument("--run-dir", default=None, help="training folder (default: a fresh one under /tmp)")
    ap.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    args = ap.parse_args()

    def fail(msg: str) -> None:
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

    if args.minutes <= 0 or args.batch_size < 1:
        fail("--minutes and --batch-size must be positive")
    for name in ("data", "resume") + (() if args.resume else ("init",)):
        value = getattr(args, name)
        if value is not None and not Path(value).is_file():
            fail(f"--{name}: file not found: {value}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Path(args.run_dir or f"/tmp/diffgen-gpu-run-{os.getpid()}")
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    if args.resume:
        shutil.copyfile(args.resume, run / "checkpoints" / "last.ckpt")
    overrides = [
        f"data.packed={Path(args.data).resolve()}", f"data.batch_size={args.batch_size}",
        f"trainer.accelerator={args.accelerator}", "trainer.devices=1", f"trainer.precision={args.precision}",
        "trainer.matmul_precision=high", f"trainer.compile={str(args.compile).lower()}",
        f"trainer.max_steps={args.max_steps}", "trainer.max_time=null", "trainer.max_epochs=-1",
        "trainer.sample_every_n_epochs=0", "trainer.limit_val_batches=4", "trainer.ckpt_every_n_steps=1000",
        # the long run's network and rate (it continues that run; benchmarks/long_run_settings.sh), not the
        # config's from-scratch defaults
        "model.hidden=128", "model.n_layers=4", "optim.lr=5.0e-4",
        *([] if args.resume else [f"optim.init_from={Path(args.init).resolve()}", "optim.warmup_steps=300"]),
        *args.set,
    ]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "diffgen.cli", "train", "--config", "qm9_egnn", "--out-dir", str(run), *overrides]
    step0 = _global_step(run / "checkpoints" / "last.ckpt")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    try:
        rc = proc.wait(timeout=args.minutes * 60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # diffgen saves last.ckpt at the current step and exits 130
        rc = proc.wait(timeout=300)
    wall = time.perf_counter() - t0
    last = run / "checkpoints" / "last.ckpt"
    if rc not in (0, 130) or not last.is_file():
        fail(f"training exited with code {rc}")
    step1 = _global_step(last)
    shutil.copyfile(last, out / "last.ckpt")
    export = out / "qm9_egnn_gpu.safetensors"
    subprocess.run([sys.executable, "-m", "diffgen.cli", "export", str(last), str(export), "--dtype", "fp16",
                    "--overwrite"], env=env, cwd=REPO, check=True)
    report = {"command": " ".join(sys.argv), "train_command": " ".join(cmd), "global_step_start": step0,
              "global_step_end": step1, "wall_s": round(wall, 1), "batch_size": args.batch_size,
              "molecules_per_s_incl_startup": round((step1 - step0) * args.batch_size / wall, 1),
              "device": _device_name()}
    (out / "gpu_run.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


def _global_step(path: Path) -> int:
    if not path.is_file():
        return 0
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
