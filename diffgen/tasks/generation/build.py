"""Build the EDM process from a config, and draw molecules from it (no Lightning needed: fast CLI start-up)."""
from __future__ import annotations

import torch

from diffgen.tasks.generation.config import GenerationConfig
from diffgen.diffusion import DEFAULT_SAMPLER, DEFAULT_STEPS
from diffgen.diffusion.samplers import NodeCountDistribution, get_sampler
from diffgen.diffusion.schedules import NoiseSchedule
from diffgen.diffusion.vp import N_FEATURES, Denoiser, VPDiffusion
from diffgen.models.egnn import EGNN


def build_diffusion(cfg: GenerationConfig) -> VPDiffusion:
    """The EDM process with the denoiser described by ``cfg.model`` (``model.backbone``: EGNN or E(3) transformer,
    whose ``1o`` output is the position displacement and its ``0e`` outputs the type outputs) and ``cfg.diffusion``."""
    m, d = cfg.model, cfg.diffusion
    if m.backbone == "e3transformer":
        from diffgen.models.e3transformer import E3Transformer  # lazy: e3nn costs ~1.5 s of import
        backbone = E3Transformer(in_dim=N_FEATURES + 1, hidden=m.hidden, out_dim=N_FEATURES, n_layers=m.n_layers,
                                 **m.transformer_kwargs())
    else:
        backbone = EGNN(in_dim=N_FEATURES + 1, hidden=m.hidden, out_dim=N_FEATURES, n_layers=m.n_layers,
                        attention=m.attention, norm_factor=m.norm_factor, coords_range=m.coords_range)
    denoiser = Denoiser(backbone, graph=m.graph, cutoff=m.cutoff, k=m.k)
    return VPDiffusion(denoiser, NoiseSchedule(d.schedule, d.T, d.s), parameterization=d.parameterization,
                       loss_weight=d.loss_weight, min_snr=d.min_snr, t_sampling=d.t_sampling)


def sample_molecules(diffusion: VPDiffusion, node_dist: NodeCountDistribution, n: int, steps: int = DEFAULT_STEPS,
                     batch_size: int = 100, seed: int = 0, progress=None,
                     sampler: str = DEFAULT_SAMPLER) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Draw ``n`` molecules: atom counts from ``node_dist``, then ``sampler`` (see
    :data:`diffgen.diffusion.samplers.SAMPLERS`) in batches.

    Deterministic for a given ``(seed, batch_size)``. ``progress`` is called with 1 per network evaluation.

    Returns:
        list of ``(z [n_i], pos [n_i, 3] Å)``.

    Raises:
        ValueError: ``n < 1``, ``steps < 1`` or ``batch_size < 1``.
        DiffgenError: unknown sampler.
    """
    if n < 1 or batch_size < 1:
        raise ValueError("n and batch_size must be >= 1")
    sample_fn = get_sampler(sampler)
    gen = torch.Generator().manual_seed(seed)
    n_atoms = node_dist.sample(n, gen)
    molecules = []
    for chunk in n_atoms.split(batch_size):
        out = sample_fn(diffusion, chunk, steps=steps, generator=gen, progress=progress)
        molecules.extend(out.molecules())
    return molecules
