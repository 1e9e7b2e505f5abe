"""Absolute quality floor of the shipped generator (``diffgen/pretrained/qm9_egnn.safetensors``)."""
from __future__ import annotations

from diffgen.eval.chem import GenerationMetrics
from diffgen.tasks.generation.build import sample_molecules
from diffgen.tasks.generation.checkpoints import load_generator

#: Floors ~10 points below the measured values (docstring below), so a real regression fails and noise does not.
MIN_ATOM_STABILITY = 0.74
MIN_VALIDITY = 0.55


def test_shipped_generator_is_above_its_quality_floor():
    """48 molecules, seed 0, the default sampler (dpm2m-sde, 50 steps), on CPU.

    The floors were set with earlier weights (hidden 128, 4 layers, 5 epochs; ``load_generator()``, then
    ``sample_molecules(gen.diffusion, gen.node_dist, 48, steps=50, seed=s)`` and ``GenerationMetrics``): atom
    stability 84.0 % (seed 0), 84.1 % and 83.7 % (seeds 1, 2); validity 75.0 %, 54.2 % and 66.7 %, so about 65 %
    on average with a binomial spread of ~7 points on 48 molecules. The floors sit 10 points below: atom
    stability 74 % (per-atom, stable across seeds), validity 55 % (below that seed average). The weights shipped
    since (12 epochs) and the per-molecule seeding (same molecules whatever the batch size) give atom / mol
    stability / validity 89.3 / 29.2 / 77.1 % (seed 0), 91.0 / 27.1 / 77.1 % and 89.0 / 18.8 / 66.7 % (seeds 1, 2). Molecule stability (4-10 %) is too low and
    too noisy on 48 molecules for a floor. Regressions it catches (same seed): weights perturbed by Gaussian noise
    of 10 % of their mean magnitude give atom stability 41.9 % (validity 54.2 %); 5 sampling steps give 29.7 %
    (43.8 %)."""
    gen = load_generator()
    molecules = sample_molecules(gen.diffusion, gen.node_dist, 48, steps=50, seed=0, sampler="dpm2m-sde")
    metrics = GenerationMetrics()
    metrics.update(molecules)
    result = metrics.compute()
    assert result["n_molecules"] == 48
    assert result["atom_stability"] >= MIN_ATOM_STABILITY, result
    assert result["validity"] >= MIN_VALIDITY, result
