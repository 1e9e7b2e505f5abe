#!/usr/bin/env bash
# A cooldown branch of the long run (warmup-stable-decay; Hagele et al. 2024, arXiv:2405.18392): the long run
# (benchmarks/long_run.sh) trains at a constant learning rate across sessions; the weights to ship come from a
# short branch of it whose learning rate decays linearly to LR_MIN. The long run itself goes on undecayed.
#
#   bash benchmarks/cooldown.sh STEPS [THREADS] [OVERRIDE ...]   # e.g. bash benchmarks/cooldown.sh 4000 1 &
#
# The branch starts from the long run's newest checkpoint (RUN/checkpoints/last.ckpt) or, when that folder is
# gone, from the committed training state; fresh AdamW, a WARMUP-step warm-up (default 300), then a linear decay
# from optim.lr to LR_MIN (default 1e-5) over the remaining STEPS - WARMUP steps. Written to COOL (default
# /work/runs/qm9_cool); an unfinished branch there is resumed (its schedule goes on where it stopped).
# Afterwards: diffgen export COOL/checkpoints/last.ckpt OUT.safetensors, then score it (generation.md).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v diffgen >/dev/null || { echo "error: diffgen is not on PATH (activate its environment)" >&2; exit 2; }
STEPS=${1:-}
THREADS=${2:-1}
WARMUP=${WARMUP:-300}
[[ "$WARMUP" =~ ^[0-9]+$ ]] || { echo "error: WARMUP must be a whole number of steps" >&2; exit 2; }
[[ "$STEPS" =~ ^[0-9]+$ ]] && (( STEPS > WARMUP )) || {
    echo "error: STEPS must be a whole number of steps above the warm-up ($WARMUP)" >&2; exit 2; }
shift $(( $# < 2 ? $# : 2 ))
RUN=${RUN:-/work/runs/qm9_long}
COOL=${COOL:-/work/runs/qm9_cool}
LR_MIN=${LR_MIN:-1.0e-5}
START="$COOL/start.safetensors"
if [[ -f "$COOL/checkpoints/last.ckpt" ]]; then
    echo "cooldown: resuming the branch in $COOL" >&2
elif [[ -e "$COOL" ]]; then
    echo "error: $COOL exists without a checkpoint to resume: move it away first" >&2; exit 2
else
    mkdir -p "$COOL"
    if [[ -f "$RUN/checkpoints/last.ckpt" ]]; then
        diffgen export "$RUN/checkpoints/last.ckpt" "$START" --dtype fp32 --with-raw
    else
        echo "cooldown: no checkpoint in $RUN; branching from benchmarks/state/qm9_egnn_long.safetensors" >&2
        cp benchmarks/state/qm9_egnn_long.safetensors "$START"
    fi
fi
# shellcheck source=benchmarks/long_run_settings.sh
source benchmarks/long_run_settings.sh
OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS exec diffgen train --config qm9_egnn --out-dir "$COOL" \
    trainer.max_steps="$STEPS" "${LONG_RUN_SETTINGS[@]}" trainer.compile=true trainer.precision=bf16-mixed \
    optim.init_from="$START" \
    optim.warmup_steps="$WARMUP" optim.lr_decay=linear optim.decay_steps=$(( STEPS - WARMUP )) optim.lr_min="$LR_MIN" \
    "$@"
