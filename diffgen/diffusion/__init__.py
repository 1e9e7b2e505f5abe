"""Diffusion process (:mod:`.vp`), noise schedules (:mod:`.schedules`) and samplers (:mod:`.samplers`)."""

#: Default of ``diffgen sample``: the fastest sampler / step count within the quality tolerance of the
#: 1000-step ancestral sampler, chosen by measurement (benchmarks/results/generation.md, "Default sampler").
#: Kept here, free of torch imports, so that the CLI can show it without loading torch.
DEFAULT_SAMPLER, DEFAULT_STEPS = "dpm2m-sde", 50
#: The samplers with a noise scale ``eta`` (:mod:`diffgen.diffusion.samplers`) and its default: 3 for ``dpm2m-sde``
#: (1 is SDE-DPM-Solver++(2M) as published), chosen by measurement (benchmarks/results/generation.md, "Noise scale
#: eta"). Kept here, free of torch imports, so that the CLI checks ``--eta`` before loading torch.
DEFAULT_ETAS = {"dpm2m-sde": 3.0}


def check_eta(eta) -> float:
    """``eta`` (the noise scale of the samplers in :data:`DEFAULT_ETAS`) as a float, if it is a finite real number
    >= 0.

    Raises:
        DiffgenError: anything else (negative, NaN, infinite, a bool, a string or another non-number).
    """
    import math
    import numbers

    from diffgen.errors import DiffgenError

    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
        raise DiffgenError(f"eta must be a finite number >= 0, got {eta!r}")
    return float(eta)
