"""Build the EDM process from a config, and draw molecules from it (no Lightning needed: fast CLI start-up).

Sampling is reproducible per molecule: molecule ``i`` of a run with seed ``s`` draws its atom count and all of its
noise from its own generator, seeded from ``(s, i)`` (:func:`molecule_generators`). The same seed therefore gives
the same molecules whatever the batch size, and the first ``n`` molecules of a longer run are those of a run of
``n``. :func:`generate_molecules` adds the filters of ``diffgen sample --keep`` and the denoising chains of
``--trajectory`` on top of :func:`sample_molecules`; the CLI and the Python API (:mod:`diffgen.api`) both use it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from diffgen.devices import DEFAULT_PRECISION, autocast, resolve_precision
from diffgen.diffusion import DEFAULT_ETAS, DEFAULT_SAMPLER, DEFAULT_STEPS, check_eta
from diffgen.diffusion.samplers import NodeCountDistribution, get_sampler
from diffgen.diffusion.schedules import NoiseSchedule
from diffgen.diffusion.vp import N_FEATURES, Denoiser, VPDiffusion
from diffgen.errors import DiffgenError
from diffgen.models.egnn import EGNN
from diffgen.tasks.generation.config import GenerationConfig

#: ``keep`` choices of :func:`generate_molecules` (``diffgen sample --keep``).
KEEP_CHOICES = ("all", "valid", "stable")
#: Default cap on sampled molecules when filtering: ``MAX_ATTEMPTS_FACTOR * n``.
MAX_ATTEMPTS_FACTOR = 10


def build_diffusion(cfg: GenerationConfig) -> VPDiffusion:
    """The EDM process with the denoiser described by ``cfg.model`` (``model.backbone``: EGNN or E(3) transformer,
    whose ``1o`` output is the position displacement and its ``0e`` outputs the type outputs) and ``cfg.diffusion``."""
    m, d = cfg.model, cfg.diffusion
    if m.backbone == "e3transformer":
        from diffgen.models.e3transformer import E3Transformer  # lazy: e3nn costs ~1.5 s of import
        backbone = E3Transformer(in_dim=N_FEATURES + 1, hidden=m.hidden, out_dim=N_FEATURES, n_layers=m.n_layers,
                                 **m.transformer_kwargs())
    else:  # self-conditioning: x0 types as extra node inputs, x0 squared distances as one edge feature
        sc = d.self_condition
        backbone = EGNN(in_dim=N_FEATURES * (1 + sc) + 1, hidden=m.hidden, out_dim=N_FEATURES,
                        n_layers=m.n_layers, edge_dim=int(sc), attention=m.attention, norm_factor=m.norm_factor,
                        coords_range=m.coords_range, velocity=m.vector_channels > 0,
                        vector_channels=m.vector_channels)
    denoiser = Denoiser(backbone, graph=m.graph, cutoff=m.cutoff, k=m.k, self_condition=d.self_condition)
    return VPDiffusion(denoiser, NoiseSchedule(d.schedule, d.T, d.s), parameterization=d.parameterization,
                       loss_weight=d.loss_weight, min_snr=d.min_snr, t_sampling=d.t_sampling,
                       type_loss=d.type_loss, type_weight=d.type_weight)


def molecule_generators(seed: int, start: int, count: int) -> list[torch.Generator]:
    """One CPU generator for each molecule index ``start, ..., start + count - 1`` of a run with ``seed``.

    Molecule ``i``'s generator is seeded with 64 bits of ``numpy.random.SeedSequence([seed mod 2**64, i])``, a hash
    of both numbers, so that nearby seeds and indices give unrelated streams.
    """
    seed = int(seed) % 2**64
    gens = []
    for i in range(start, start + count):
        lo, hi = np.random.SeedSequence([seed, i]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator().manual_seed(int(lo) | (int(hi) << 32)))
    return gens


def max_atoms(node_dist: NodeCountDistribution) -> int:
    """The largest atom count the model was trained on: the last non-zero entry of its histogram (29 for QM9)."""
    return int(torch.nonzero(node_dist.histogram).max())


def check_atom_counts(n_atoms, node_dist: NodeCountDistribution, name: str = "n_atoms") -> list[int] | None:
    """Validate requested atom counts: None (draw them from ``node_dist``), one int, or a sequence of ints.

    Returns:
        None, or the list of counts (molecule ``i`` gets ``counts[i % len(counts)]``).

    Raises:
        DiffgenError: an empty sequence, a count that is not an integer, < 1, or larger than :func:`max_atoms`
            (``name`` names the option in the message).
    """
    if n_atoms is None:
        return None
    counts = [n_atoms] if isinstance(n_atoms, (int, np.integer)) else list(n_atoms)
    if not counts:
        raise DiffgenError(f"{name}: give at least one atom count")
    top = max_atoms(node_dist)
    for k in counts:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise DiffgenError(f"{name}: atom counts must be integers, got {k!r}")
        if not 1 <= k <= top:
            raise DiffgenError(f"{name} {k} is outside 1-{top}: the model was trained on molecules of at most "
                               f"{top} atoms")
    return [int(k) for k in counts]


def sampler_options(sampler: str, eta: float | None) -> dict:
    """The extra keyword arguments of ``sampler``: ``{"eta": eta}`` for a sampler with a noise scale (None there:
    its default in :data:`diffgen.diffusion.DEFAULT_ETAS`), ``{}`` otherwise.

    Raises:
        DiffgenError: ``eta`` not a finite number >= 0, or given (not None) to a sampler without one.
    """
    if sampler not in DEFAULT_ETAS:
        if eta is not None:
            raise DiffgenError(f"eta applies to the {' and '.join(DEFAULT_ETAS)} sampler only, not {sampler!r}")
        return {}
    return {"eta": DEFAULT_ETAS[sampler] if eta is None else check_eta(eta)}


def sample_molecules(diffusion: VPDiffusion, node_dist: NodeCountDistribution, n: int, steps: int = DEFAULT_STEPS,
                     batch_size: int = 100, seed: int = 0, progress=None, sampler: str = DEFAULT_SAMPLER,
                     n_atoms=None, start: int = 0, chains: dict[int, list] | None = None,
                     precision: str = DEFAULT_PRECISION,
                     eta: float | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Draw molecules ``start, ..., start + n - 1`` of the run ``seed``: atom counts from ``node_dist`` (or
    ``n_atoms``), then ``sampler`` (see :data:`diffgen.diffusion.samplers.SAMPLERS`) in batches of ``batch_size``.

    Each molecule's atom count and noise come from its own generator (:func:`molecule_generators`), so the result
    depends on ``seed`` and the molecule indices, not on ``batch_size``. ``progress`` is called with 1 per network
    evaluation (``steps`` per batch).

    Args:
        n_atoms: None, an int, or a sequence of ints (molecule ``i`` gets ``n_atoms[i % len]``); checked with
            :func:`check_atom_counts`.
        chains: optional ``{molecule index: []}``; the list of each index in this run is filled with the
            ``steps + 1`` frames ``(z [n_i], pos [n_i, 3] Å)`` of its denoising chain, prior draw first, result last.
        precision: one of :data:`diffgen.devices.PRECISIONS`: ``fp32``, ``bf16`` (the network's matrix products under
            ``torch.autocast`` in bf16; the sampler's updates, noise and outputs stay float32) or ``auto`` (bf16
            where the diffusion's device computes it natively, :func:`diffgen.devices.resolve_precision`).
        eta: noise scale of ``dpm2m-sde`` (:mod:`diffgen.diffusion.samplers`); None: the sampler's default in
            :data:`diffgen.diffusion.DEFAULT_ETAS`. Only for the samplers listed there.

    Returns:
        list of ``(z [n_i], pos [n_i, 3] Å)``, float32 positions.

    Raises:
        ValueError: ``n < 1``, ``steps < 1`` or ``batch_size < 1``.
        DiffgenError: unknown sampler or precision, bad ``n_atoms``, ``eta`` not a number >= 0 or given to a
            sampler without one.
    """
    if n < 1 or batch_size < 1:
        raise ValueError("n and batch_size must be >= 1")
    sample_fn = get_sampler(sampler)
    sampler_kwargs = sampler_options(sampler, eta)
    device = str(next(diffusion.parameters()).device)
    precision = resolve_precision(precision, device, option="precision")
    counts = check_atom_counts(n_atoms, node_dist)
    molecules = []
    for lo in range(start, start + n, batch_size):
        hi = min(lo + batch_size, start + n)
        gens = molecule_generators(seed, lo, hi - lo)
        if counts is None:
            sizes = torch.cat([node_dist.sample(1, g) for g in gens])
        else:
            sizes = torch.tensor([counts[i % len(counts)] for i in range(lo, hi)])
        record = _chain_recorder(chains, lo, sizes)
        with autocast(precision, device):
            out = sample_fn(diffusion, sizes, steps=steps, generator=gens, progress=progress, record=record,
                            **sampler_kwargs)
        molecules.extend(out.molecules())
    return molecules


def _chain_recorder(chains: dict[int, list] | None, lo: int, sizes: torch.Tensor):
    """A sampler ``record`` callback appending frames to ``chains[i]`` for the indices ``i`` of this batch."""
    wanted = [] if chains is None else [(j, chains[lo + j]) for j in range(sizes.numel()) if lo + j in chains]
    if not wanted:
        return None
    split = sizes.tolist()

    def record(step: int, pos: torch.Tensor, z: torch.Tensor) -> None:
        zs, ps = z.split(split), pos.split(split)
        for j, frames in wanted:
            frames.append((zs[j].clone(), ps[j].clone()))

    return record


@dataclass
class GenerationRun:
    """Result of :func:`generate_molecules`.

    Attributes:
        molecules: the kept molecules ``(z [n_i], pos [n_i, 3] Å)``, in index order.
        indices: each kept molecule's index in the run (its identity: the same seed and index give the same
            molecule).
        reports: each kept molecule's :meth:`~diffgen.eval.chem.GenerationMetrics.per_molecule` dict.
        metrics: :meth:`~diffgen.eval.chem.GenerationMetrics.compute` over **all** sampled molecules (the
            sampler's quality, not the filtered set's).
        attempts: molecules sampled.
        chains: ``{index: frames}`` of the first kept molecules whose chains were asked for.
    """

    molecules: list
    indices: list[int]
    reports: list[dict]
    metrics: dict
    attempts: int
    chains: dict[int, list] = field(default_factory=dict)


def _round_positions(pos: torch.Tensor) -> torch.Tensor:
    """``pos`` (Å) rounded to :data:`diffgen.io.SDF_DECIMALS` decimals (computed in float64), same dtype."""
    from diffgen.io import SDF_DECIMALS

    scale = 10.0 ** SDF_DECIMALS
    return (pos.double() * scale).round().div(scale).to(pos.dtype)


def _passes(report: dict, keep: str) -> bool:
    return keep == "all" or (keep == "valid" and report["valid"]) or (keep == "stable" and report["mol_stable"])


def generate_molecules(diffusion: VPDiffusion, node_dist: NodeCountDistribution, n: int, *, keep: str = "all",
                       max_attempts: int | None = None, n_chains: int = 0, reference_smiles: set[str] | None = None,
                       steps: int = DEFAULT_STEPS, batch_size: int = 100, seed: int = 0,
                       sampler: str = DEFAULT_SAMPLER, n_atoms=None, progress=None,
                       precision: str = DEFAULT_PRECISION,
                       on_chunk: Callable[[int, int, int], None] | None = None,
                       eta: float | None = None) -> GenerationRun:
    """Sample until ``n`` molecules pass ``keep`` (or ``max_attempts`` molecules were sampled), and score them.

    Molecules are sampled in index order (:func:`sample_molecules`) and the first ``n`` that pass are kept, so the
    kept set depends only on the seed and the settings, not on ``batch_size``; ``keep="all"`` samples exactly ``n``.
    Positions are rounded to :data:`diffgen.io.SDF_DECIMALS` decimals (1e-4 Å) before they are scored: the
    distance-based bond rules have hard cut-offs, and unrounded scores would not always match the written SDF.

    Args:
        keep: ``"all"``, ``"valid"`` (RDKit sanitization passes, EDM validity) or ``"stable"`` (EDM molecule
            stability).
        max_attempts: cap on sampled molecules (``keep != "all"``); default ``MAX_ATTEMPTS_FACTOR * n``.
        n_chains: record the denoising chains of the first ``n_chains`` kept molecules.
        reference_smiles: training SMILES for novelty (None: novelty n/a).
        on_chunk: called as ``on_chunk(count, kept, attempts)`` before each round of ``count`` molecules.
        other arguments: as :func:`sample_molecules`.

    Returns:
        :class:`GenerationRun`; ``len(run.molecules) < n`` when the cap was hit.

    Raises:
        DiffgenError: unknown ``keep``, sampler or precision, bad ``n_atoms`` or ``eta``, ``max_attempts < n``,
            ``n_chains > n``.
        ValueError: as :func:`sample_molecules`.
    """
    from diffgen.eval.chem import GenerationMetrics

    if keep not in KEEP_CHOICES:
        raise DiffgenError(f"unknown keep {keep!r}: choose {', '.join(KEEP_CHOICES)}")
    if n < 1:
        raise ValueError("n must be >= 1")
    cap = n if keep == "all" else (MAX_ATTEMPTS_FACTOR * n if max_attempts is None else max_attempts)
    if cap < n:
        raise DiffgenError(f"max attempts {cap} is less than the {n} molecules asked for")
    if not 0 <= n_chains <= n:
        raise DiffgenError(f"{n_chains} denoising chains asked for, but only {n} molecules")
    get_sampler(sampler)
    sampler_options(sampler, eta)
    resolve_precision(precision, option="precision")
    check_atom_counts(n_atoms, node_dist)
    metrics = GenerationMetrics(reference_smiles=reference_smiles)
    run = GenerationRun([], [], [], {}, 0)
    while len(run.molecules) < n and run.attempts < cap:
        need = n - len(run.molecules)
        if run.attempts == 0 or keep == "all":
            count = need
        elif run.molecules:  # enough for the pass rate seen so far, with 10 % to spare
            count = math.ceil(1.1 * need * run.attempts / len(run.molecules))
        else:  # nothing passed yet: double
            count = max(need, run.attempts)
        count = min(count, cap - run.attempts)
        recording = len(run.chains) < n_chains
        if recording and keep != "all":  # chains of every molecule of the round are kept until it is scored
            count = min(count, batch_size)
        if on_chunk is not None:
            on_chunk(count, len(run.molecules), run.attempts)
        start = run.attempts
        chains = None
        if recording:  # keep="all": exactly the first n_chains molecules; else every one of the round
            stop = start + (n_chains - len(run.chains) if keep == "all" else count)
            chains = {i: [] for i in range(start, min(stop, start + count))}
        mols = sample_molecules(diffusion, node_dist, count, steps=steps, batch_size=batch_size, seed=seed,
                                progress=progress, sampler=sampler, n_atoms=n_atoms, start=start, chains=chains,
                                precision=precision, eta=eta)
        mols = [(z, _round_positions(pos)) for z, pos in mols]
        for i, frames in (chains or {}).items():  # the chain ends at the molecule as scored and written
            frames[-1] = mols[i - start]
        metrics.update(mols)
        reports = metrics.per_molecule()[start:]
        run.attempts += count
        for j, (mol, report) in enumerate(zip(mols, reports)):
            if len(run.molecules) == n:
                break
            if _passes(report, keep):
                run.molecules.append(mol)
                run.indices.append(start + j)
                run.reports.append(report)
                if chains is not None and start + j in chains and len(run.chains) < n_chains:
                    run.chains[start + j] = chains[start + j]
    run.metrics = metrics.compute()
    return run
