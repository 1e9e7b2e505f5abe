"""Run by tests/test_ddp.py (and re-launched by Lightning's DDP launcher for rank 1): train the generator with the
given config overrides and write what this rank saw and ended with to OUT/rank<R>.pt.

    python tests/ddp_probe.py OUT override ...
"""
import sys
from pathlib import Path

import torch

from diffgen.tasks.generation import module
from diffgen.tasks.generation.config import load_generation_config

seen: list[torch.Tensor] = []
_step = module.GenerationTask.training_step


def recording_step(self, batch, batch_idx):
    seen.append(batch.idx.view(-1).cpu().clone())
    return _step(self, batch, batch_idx)


module.GenerationTask.training_step = recording_step
out = Path(sys.argv[1])
task = module.train_generation(load_generation_config("qm9_egnn", sys.argv[2:]))
state = {k: v.detach().cpu().clone() for k, v in task.diffusion.state_dict().items()}
torch.save({"rank": task.global_rank, "world_size": task.trainer.world_size, "seen": seen, "state": state,
            "ema": {k: v.detach().cpu().clone() for k, v in task.ema.module.state_dict().items()}},
           out / f"rank{task.global_rank}.pt")
