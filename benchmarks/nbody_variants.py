"""N-body model variants on an equal epoch budget: a plain PyTorch loop for quick comparisons.

Same data (``diffgen.tasks.dynamics.data.pairs_dataset``), model builder, MSE loss, Adam, batch 100 and
gradient clipping as ``diffgen dynamics train``, without Lightning; the validation MSE is computed every 5
epochs and the test MSE of the weights with the best validation MSE is reported at the end. Use it to compare model settings; train the kept setting with the CLI
(checkpoints, resume, test evaluation).

    python benchmarks/nbody_variants.py NAME EPOCHS [config overrides...] [--adamw] [--input-noise S]

``--ema D`` validates an exponential moving average of the weights (decay ``D``) instead of the raw weights.
Writes ``NAME.log`` (one line per validation) and ``NAME.json`` (best validation MSE, its epoch, and the test MSE of those weights) to
``--out-dir`` (default ``runs/nbody_variants``).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from diffgen.tasks.dynamics.checkpoints import build_model
from diffgen.tasks.dynamics.config import load_dynamics_config
from diffgen.tasks.dynamics.data import pairs_dataset
from diffgen.tasks.dynamics.evaluate import evaluate_pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("epochs", type=int)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.hidden=32")
    ap.add_argument("--config", default="diffgen/configs/nbody_egnn.yaml")
    ap.add_argument("--out-dir", default="runs/nbody_variants")
    ap.add_argument("--adamw", action="store_true", help="AdamW (decoupled weight decay) instead of Adam")
    ap.add_argument("--input-noise", type=float, default=0.0, help="std of Gaussian noise added to input positions")
    ap.add_argument("--ema", type=float, default=0.0, help="validate an EMA of the weights with this decay (0 = off)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_dynamics_config(args.config, args.overrides)
    torch.manual_seed(cfg.trainer.seed)
    valid, test = pairs_dataset(cfg, "valid"), pairs_dataset(cfg, "test")
    train = pairs_dataset(cfg, "train").tensors
    model = build_model(cfg)
    o = cfg.optim
    opt = (torch.optim.AdamW if args.adamw else torch.optim.Adam)(model.parameters(), o.lr, weight_decay=o.weight_decay)
    ema = None
    if args.ema:
        from torch.optim.swa_utils import AveragedModel

        from diffgen.tasks.generation.module import ema_with_warmup

        ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(args.ema), use_buffers=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs) if o.lr_schedule == "cosine" else None
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n, bs = train[0].shape[0], cfg.data.batch_size
    best, t0 = (float("inf"), -1), time.time()
    with open(out / f"{args.name}.log", "w") as log:
        for epoch in range(1, args.epochs + 1):
            model.train()
            perm, total = torch.randperm(n), 0.0
            for start in range(0, n, bs):
                idx = perm[start:start + bs]
                pos = train[0][idx]
                if args.input_noise:
                    pos = pos + args.input_noise * torch.randn_like(pos)
                loss = torch.nn.functional.mse_loss(model(pos, train[1][idx], train[2][idx]), train[3][idx])
                opt.zero_grad()
                loss.backward()
                if o.clip_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad_norm)
                opt.step()
                if ema is not None:
                    ema.update_parameters(model)
                total += float(loss.detach()) * idx.numel() / n
            if sched is not None:
                sched.step()
            if epoch % 5 and epoch != args.epochs:
                continue
            net = (model if ema is None else ema.module).eval()
            val = evaluate_pairs(net, valid)["model"]
            if val < best[0]:
                best = (val, epoch)
                best_state = copy.deepcopy(net.state_dict())
            print(f"{epoch} train {total:.5f} valid {val:.5f} best {best[0]:.5f}@{best[1]} {time.time() - t0:.0f}s",
                  file=log, flush=True)
    net = model if ema is None else ema.module
    net.load_state_dict(best_state)
    result = {"name": args.name, "best_valid_mse": best[0], "best_epoch": best[1],
              "test_mse": evaluate_pairs(net, test)["model"], "epochs": args.epochs,
              "overrides": args.overrides, "adamw": args.adamw, "input_noise": args.input_noise, "ema": args.ema,
              "config": args.config, "seconds": round(time.time() - t0, 1), "threads": args.threads}
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    from diffgen.errors import DiffgenError

    try:
        main()
    except DiffgenError as exc:  # bad config, override or data: one line, no traceback
        raise SystemExit(f"error: {exc}") from None
