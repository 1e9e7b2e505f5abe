"""benchmarks/long_run.sh goes on with the network and recipe of its committed training state, whatever the
packaged config's defaults for new runs (``benchmarks/long_run_settings.sh`` pins them)."""
from __future__ import annotations

import subprocess
from dataclasses import asdict
from pathlib import Path

from diffgen.tasks.generation.checkpoints import load
from diffgen.tasks.generation.config import load_generation_config

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / "benchmarks" / "state" / "qm9_egnn_long.safetensors"


def long_run_settings() -> list[str]:
    script = 'source benchmarks/long_run_settings.sh && printf "%s\\n" "${LONG_RUN_SETTINGS[@]}"'
    out = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.split()


def test_long_run_settings_rebuild_the_committed_states_network_and_rate():
    settings = long_run_settings()
    cfg = load_generation_config("qm9_egnn", settings)
    _, state_cfg = load(STATE)
    assert asdict(cfg.model) == asdict(state_cfg.model)
    assert asdict(cfg.diffusion) == asdict(state_cfg.diffusion)
    assert cfg.optim.lr == state_cfg.optim.lr == 5.0e-4
    # the pins matter: the packaged default for new runs is another network
    default = load_generation_config("qm9_egnn")
    assert (default.model.n_layers, default.model.hidden) != (cfg.model.n_layers, cfg.model.hidden)
