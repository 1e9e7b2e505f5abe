#!/usr/bin/env bash
# The default generator's long training run, continued across sessions (issue: ship weights at >= 96 % atom
# stability). One process, pinned to THREADS torch threads (1 while you work on the other core, 2 when idle).
#
#   bash benchmarks/long_run.sh [HOURS] [THREADS] [OVERRIDE ...]   # e.g. bash benchmarks/long_run.sh 2.1 1 &
#
# OVERRIDEs are extra config overrides. The run's setting since 2026-12-02 is
#   trainer.compile=true trainer.precision=bf16-mixed
# (the compiled backbone, the same function, ~1.2x; with bf16 autocast ~2x the molecules/s on a CPU with
# AVX512-BF16, same speedrun quality over two seed pairs; benchmarks/results/speedrun.md). On a CPU without native
# bf16 (AVX2 only: `python -c "import torch; print(torch.backends.cpu.get_cpu_capability())"`) leave bf16 out:
# there it is emulated and ~7x slower (diffgen train warns).
#
# Needs the `diffgen` command on PATH (activate the environment diffgen is installed in first).
#
# Resumes from RUN/checkpoints (the newest checkpoint) when the folder is still on this machine; otherwise starts
# from the committed training state (EMA + trained weights, benchmarks/state/qm9_egnn_long.safetensors, written by
# `diffgen export --with-raw --dtype fp32`) with a 300-step learning-rate warm-up for the fresh optimizer.
# Before the session ends: export, score and commit (see benchmarks/results/generation.md, "Learning curve").
# The run keeps every 2,000th step in RUN/checkpoints/kept/ (trainer.keep_every_n_steps); the mean of the last few
# EMA states, `diffgen export RUN/checkpoints/kept/stepA.ckpt ... RUN/checkpoints/last.ckpt OUT.safetensors`, is
# scored beside the last EMA alone. Delete kept/ with the run folder before starting a new run there.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v diffgen >/dev/null || { echo "error: diffgen is not on PATH (activate its environment)" >&2; exit 2; }
HOURS=${1:-2}
THREADS=${2:-1}
shift $(( $# < 2 ? $# : 2 ))
RUN=${RUN:-/work/runs/qm9_long}
STATE=benchmarks/state/qm9_egnn_long.safetensors
minutes=$(python3 -c "print(int(float('$HOURS') * 60))")
# The run stops by Ctrl-C (SIGINT) after HOURS: diffgen then finishes the current step and saves last.ckpt there.
# (trainer.max_time would count the time of earlier sessions too: Lightning restores it from the checkpoint.)
# shellcheck source=benchmarks/long_run_settings.sh
source benchmarks/long_run_settings.sh
args=(--config qm9_egnn --out-dir "$RUN" trainer.max_steps=-1 "${LONG_RUN_SETTINGS[@]}" "$@")
# The warm-up is passed on every start, resumes included: the lr factor is recomputed from the config at each step, so a
# run stopped mid-warm-up goes on warming up (after step 300 the factor is 1, the constant lr).
args+=(optim.warmup_steps=300)
if ! ls "$RUN"/checkpoints/*.ckpt >/dev/null 2>&1; then
    args+=("optim.init_from=$STATE")
    echo "long run: no checkpoint in $RUN; starting from $STATE" >&2
fi
OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS exec timeout --signal=INT --kill-after=300 "${minutes}m" \
    diffgen train "${args[@]}"
