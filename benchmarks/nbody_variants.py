"""N-body model variants on an equal epoch budget: a plain PyTorch loop for quick comparisons.

Same data (``diffgen.tasks.dynamics_common.pairs_dataset``), model builder, MSE loss, Adam, batch 100 and
gradient clipping as ``diffgen dynamics train``, without Lightning; the validation MSE is computed every 5
epochs and the best is reported. Use it to compare model settings; train the kept setting with the CLI
(checkpoints, resume, test evaluation).

    python benchmarks/nbody_variants.py NAME EPOCHS [config overrides...] [--adamw] [--input-noise S]

Writes ``NAME.log`` (one line per validation) and ``NAME.json`` (best validation MSE and its epoch) to
``--out-dir`` (default ``runs/nbody_variants``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffgen.dynamics_config import load_dynamics_config
from diffgen.tasks.dynamics_common import build_model, pairs_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("epochs", type=int)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.hidden=32")
    ap.add_argument("--config", default="configs/nbody_egnn.yaml")
    ap.add_argument("--out-dir", default="runs/nbody_variants")
    ap.add_argument("--adamw", action="store_true", help="AdamW (decoupled weight decay) instead of Adam")
    ap.add_argument("--input-noise", type=float, default=0.0, help="std of Gaussian noise added to input positions")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_dynamics_config(args.config, args.overrides)
    torch.manual_seed(cfg.trainer.seed)
    train, valid = pairs_dataset(cfg, "train").tensors, pairs_dataset(cfg, "valid").tensors
    model = build_model(cfg)
    o = cfg.optim
    opt = (torch.optim.AdamW if args.adamw else torch.optim.Adam)(model.parameters(), o.lr, weight_decay=o.weight_decay)
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
                total += float(loss.detach()) * idx.numel() / n
            if sched is not None:
                sched.step()
            if epoch % 5 and epoch != args.epochs:
                continue
            model.eval()
            with torch.no_grad():
                sq = sum(float((model(*(t[s:s + 500] for t in valid[:3])) - valid[3][s:s + 500]).pow(2).sum())
                         for s in range(0, valid[0].shape[0], 500))
            val = sq / valid[3].numel()
            best = min(best, (val, epoch))
            print(f"{epoch} train {total:.5f} valid {val:.5f} best {best[0]:.5f}@{best[1]} {time.time() - t0:.0f}s",
                  file=log, flush=True)
    result = {"name": args.name, "best_valid_mse": best[0], "best_epoch": best[1], "epochs": args.epochs,
              "overrides": args.overrides, "adamw": args.adamw, "input_noise": args.input_noise,
              "config": args.config, "seconds": round(time.time() - t0, 1), "threads": args.threads}
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
