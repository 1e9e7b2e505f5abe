"""Samplers for :class:`~diffgen.diffusion.vp.VPDiffusion`.

``ancestral`` (stochastic): the EDM sampler (Hoogeboom et al. 2022, Alg. 2; Kingma et al. 2021 eq. 24-27 for the
posterior ``q(z_s | z_t, x)``) on a uniform grid of ``steps`` intervals in ``t``. With ``steps = 1000``
it is EDM's sampler on EDM's schedule; fewer steps use the same schedule on a coarser grid.
After every step the positions are re-centred; the final step returns the network's ``x0``
estimate, with atom types from the argmax of the one-hot part.

``dpm2m`` (deterministic): DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2), a second-order multistep
solver of the probability-flow ODE in data (``x0``) prediction, on a grid uniform in
``log_snr = -gamma``. Same decoding and re-centring as the ancestral sampler.

``dpm2m-sde`` (stochastic): SDE-DPM-Solver++(2M) (Lu et al. 2022, App. B), the same multistep ``x0``
extrapolation for the reverse SDE on the same reduced log-SNR grid, with fresh zero-CoM noise every step. Its noise
scale ``eta`` (as k-diffusion's ``sample_dpmpp_2m_sde``) picks one member of a family of reverse processes with the
diffusion's marginals: ``eta = 0`` is the probability-flow ODE (``dpm2m``), ``eta = 1`` the reverse SDE as
published, ``eta > 1`` pulls each step harder toward the network's ``x0`` estimate and injects more fresh noise,
which corrects more of the errors that an imperfect network makes along the way (Karras et al. 2022, Sec. 4, on
stochastic sampling; Xu et al. 2023, "Restart Sampling"). The default, :data:`diffgen.diffusion.DEFAULT_ETAS`, is
chosen by measurement (``benchmarks/results/generation.md``, "Noise scale eta"); with an exact score it still
returns the data distribution at 50 steps (``tests/test_samplers.py``), so it sharpens nothing.

A self-conditioned model (:attr:`VPDiffusion.self_condition`) gets, at every step after the first, the ``x0``
estimate of the step before (Chen et al. 2022, Analog Bits, Alg. 2); the first step sees zeros.

Every sampler takes its randomness from one generator for the batch, or from one generator per molecule
(:data:`Generators`, :func:`molecule_noise`): then a molecule's prior draw and step noise do not depend on the
other molecules of its batch. ``record`` (:data:`Recorder`) receives the state after each step (denoising chains).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F

from diffgen.data.graphs import build_edges
from diffgen.diffusion import DEFAULT_ETAS, check_eta
from diffgen.diffusion.schedules import alpha, sigma
from diffgen.diffusion.vp import N_FEATURES, VPDiffusion, decode_types, remove_mean

#: Randomness of a sampler: None (torch's global generator), one CPU generator for the whole batch, or one CPU
#: generator per molecule, so that a molecule's noise does not depend on the batch it is sampled in.
Generators = Union[torch.Generator, Sequence[torch.Generator], None]

#: Called with ``(k, pos [N, 3], z [N])`` (CPU tensors) for ``k = 0`` (the prior draw) to ``steps`` (the result):
#: the state ``z_t`` after each step, positions in Å (unscaled, as EDM's chain renders), types decoded by argmax.
Recorder = Callable[[int, torch.Tensor, torch.Tensor], None]


class NodeCountDistribution:
    """Categorical distribution of atom counts from a histogram (``[max_n + 1]``, index = atom count).

    Raises:
        ValueError: empty histogram or negative counts.
    """

    def __init__(self, histogram):
        hist = torch.as_tensor(histogram, dtype=torch.float64)
        if hist.dim() != 1 or hist.numel() == 0 or bool((hist < 0).any()) or float(hist.sum()) <= 0:
            raise ValueError("node-count histogram must be a non-empty 1-D tensor of non-negative counts")
        self.histogram = hist
        self.probs = hist / hist.sum()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` atom counts ``[n]`` long."""
        return torch.multinomial(self.probs, n, replacement=True, generator=generator)


@dataclass
class SampleBatch:
    """Sampler output: ``pos [N, 3]`` Å (zero CoM per molecule), ``z [N]``, ``batch [N]``, ``n_atoms [B]``."""

    pos: torch.Tensor
    z: torch.Tensor
    batch: torch.Tensor
    n_atoms: torch.Tensor

    def molecules(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Split into a list of ``(z [n], pos [n, 3])`` per molecule."""
        sizes = self.n_atoms.tolist()
        return list(zip(self.z.split(sizes), self.pos.split(sizes)))


def molecule_noise(n_atoms: torch.Tensor, dim: int, generator: Generators = None) -> torch.Tensor:
    """Standard normal noise ``[N, dim]`` (float32, CPU) for a batch of molecules with ``n_atoms [B]`` atoms.

    With one generator (or None) the ``N x dim`` values are drawn in one call; with a sequence of ``B`` generators,
    molecule ``b``'s rows come from ``generator[b]`` alone, so they are the same whatever else is in the batch.

    Raises:
        ValueError: a sequence of generators whose length is not ``B``.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(int(n_atoms.sum()), dim, generator=generator)
    if len(generator) != n_atoms.numel():
        raise ValueError(f"got {len(generator)} generators for {n_atoms.numel()} molecules")
    return torch.cat([torch.randn(k, dim, generator=g) for k, g in zip(n_atoms.tolist(), generator)])


def _com_free(n_atoms: torch.Tensor, batch_cpu: torch.Tensor, generator: Generators) -> torch.Tensor:
    """:func:`molecule_noise` for positions, projected to zero center of mass per molecule (EDM Sec. 3.2)."""
    return remove_mean(molecule_noise(n_atoms, 3, generator), batch_cpu)


def _record(record: Recorder | None, k: int, pos: torch.Tensor, h: torch.Tensor) -> None:
    if record is not None:
        record(k, pos.detach().cpu(), decode_types(h).cpu())


def _posterior_step(z_t: torch.Tensor, eps: torch.Tensor, gamma_t: torch.Tensor, gamma_s: torch.Tensor):
    """Mean and std of ``q(z_s | z_t, x = x_hat(eps))`` for ``s < t`` (EDM App. A / VDM eq. 26-27).

    ``gamma_t``, ``gamma_s`` broadcast against ``z_t``.
    """
    sigma2_t_given_s = -torch.expm1(F.softplus(gamma_s) - F.softplus(gamma_t))
    alpha_t_given_s = torch.exp(0.5 * (F.logsigmoid(-gamma_t) - F.logsigmoid(-gamma_s)))
    sigma_t, sigma_s = sigma(gamma_t), sigma(gamma_s)
    mean = z_t / alpha_t_given_s - (sigma2_t_given_s / alpha_t_given_s / sigma_t) * eps
    std = sigma2_t_given_s.sqrt() * sigma_s / sigma_t
    return mean, std


@torch.no_grad()
def ancestral_sample(diffusion: VPDiffusion, n_atoms: torch.Tensor, steps: int = 1000,
                     generator: Generators = None,
                     progress: Callable[[int], None] | None = None, record: Recorder | None = None) -> SampleBatch:
    """Generate one batch of molecules with the ancestral sampler.

    Args:
        diffusion: trained process (in eval mode).
        n_atoms: ``[B]`` atom count of each molecule (>= 1).
        steps: number of denoising steps (network evaluations), >= 1.
        generator: CPU random generator for reproducible draws, or one per molecule (see :data:`Generators`).
        progress: called with 1 after every step (e.g. a progress-bar advance).
        record: called with the state before the first step and after every step (see :data:`Recorder`).

    Returns:
        :class:`SampleBatch` with zero-CoM positions (Å) and decoded atomic numbers.

    Raises:
        ValueError: ``steps < 1``, an atom count < 1, or a list of generators of another length than ``n_atoms``.
    """
    n_atoms, batch, pos, h, edge_index = _initial_state(diffusion, n_atoms, steps, generator)
    _record(record, 0, pos, h)
    device = pos.device
    n_graphs = n_atoms.numel()
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    cond = None  # self-conditioning: the previous step's x0 estimate
    for i in range(steps):
        t, s = grid[i], grid[i + 1]
        t_vec = torch.full((n_graphs,), float(t), device=device)
        eps_pos, eps_h = diffusion.predict_eps(pos, h, t_vec, batch, edge_index, cond=cond)
        if diffusion.self_condition and i < steps - 1:
            cond = diffusion.x0_from_eps(pos, h, t_vec, batch, eps_pos, eps_h)
        gamma_t = diffusion.gamma(t.to(device)).float()
        gamma_s = diffusion.gamma(s.to(device)).float()
        if i < steps - 1:
            mean_pos, std = _posterior_step(pos, eps_pos, gamma_t, gamma_s)
            mean_h, _ = _posterior_step(h, eps_h, gamma_t, gamma_s)
            noise_pos = _com_free(n_atoms, batch.cpu(), generator).to(device)
            noise_h = molecule_noise(n_atoms, N_FEATURES, generator).to(device)
            pos = remove_mean(mean_pos + std * noise_pos, batch)
            h = mean_h + std * noise_h
        else:  # final step (t = 1/steps): predict x0 = (z_t - sigma_t eps) / alpha_t directly, so that
            # NFE = steps; EDM instead steps to t = 0 and evaluates the network once more (T + 1 calls)
            pos = remove_mean((pos - sigma(gamma_t) * eps_pos) / alpha(gamma_t), batch)
            h = (h - sigma(gamma_t) * eps_h) / alpha(gamma_t)
        _record(record, i + 1, pos, h)
        if progress is not None:
            progress(1)
    return SampleBatch(pos=pos.cpu(), z=decode_types(h).cpu(), batch=batch.cpu(), n_atoms=n_atoms)


def _initial_state(diffusion: VPDiffusion, n_atoms, steps: int, generator):
    """Validate ``steps``/``n_atoms``; draw zero-CoM ``pos`` and ``h`` from the prior; build the (fixed) full graph.

    Returns ``(n_atoms [B], batch [N], pos [N, 3], h [N, 6], edge_index or None)``; the edge index is None for
    position-dependent graphs (radius/kNN), which the denoiser then rebuilds at every call.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n_atoms = torch.as_tensor(n_atoms, dtype=torch.long).cpu()
    if n_atoms.numel() == 0 or bool((n_atoms < 1).any()):
        raise ValueError("every molecule needs at least one atom")
    device = next(diffusion.parameters()).device
    batch = torch.repeat_interleave(torch.arange(n_atoms.numel()), n_atoms)
    pos = _com_free(n_atoms, batch, generator).to(device)
    h = molecule_noise(n_atoms, N_FEATURES, generator).to(device)
    batch = batch.to(device)
    den = diffusion.denoiser
    edge_index = build_edges(pos, batch, den.graph, den.cutoff, den.k) if den.graph == "full" else None
    return n_atoms, batch, pos, h, edge_index


@torch.no_grad()
def _dpm_solver_2m(diffusion: VPDiffusion, n_atoms, steps: int, generator, progress, eta: float,
                   record: Recorder | None = None) -> SampleBatch:
    """DPM-Solver++(2M) in data prediction on a log-SNR-uniform grid, with noise scale ``eta >= 0``.

    With ``lambda = log(alpha / sigma)``, step ``h = lambda_s - lambda_t > 0`` and ``D`` the (second-order,
    multistep) ``x0`` estimate, the update from ``t`` to ``s`` is (Lu et al. 2022, DPM-Solver++, Alg. 2 and
    App. B "SDE-DPM-Solver++(2M)"; the ``eta`` family as k-diffusion's ``sample_dpmpp_2m_sde``)::

        z_s = (sigma_s / sigma_t) e^(-eta h) z_t + alpha_s (1 - e^(-(1 + eta) h)) D
              + sigma_s sqrt(1 - e^(-2 eta h)) noise

    with ``D = x0_t + (x0_t - x0_prev) / (2 r)``, ``r = h_prev / h`` (first order at the first step).
    ``eta = 0`` is the ODE solver (no noise is drawn), ``eta = 1`` the published SDE solver. For any ``eta``, an
    exact ``x0`` keeps the marginal ``q(z_s | x0) = N(alpha_s x0, sigma_s^2)`` (mean
    ``alpha_t (sigma_s / sigma_t) e^(-eta h) + alpha_s (1 - e^(-(1 + eta) h)) = alpha_s`` as
    ``alpha_t / sigma_t = (alpha_s / sigma_s) e^-h``; variance ``sigma_s^2 e^(-2 eta h) + sigma_s^2 (1 - e^(-2 eta h))``).
    The position noise is zero-CoM and positions are re-centred after every step.
    """
    eta = check_eta(eta)
    n_atoms, batch, pos, h, edge_index = _initial_state(diffusion, n_atoms, steps, generator)
    _record(record, 0, pos, h)
    device = pos.device
    sched = diffusion.schedule
    # uniform in log-SNR (DPM-Solver's recommendation); a grid uniform in t, as the ancestral sampler uses, was
    # worse for both variants at 20 steps with the shipped model (benchmarks/results/generation.md)
    g_grid = torch.linspace(float(sched.table[-1]), float(sched.table[0]), steps + 1, dtype=torch.float64)
    t_grid = sched.t_of_gamma(g_grid)
    lam = -0.5 * g_grid  # log(alpha / sigma)
    prev = None  # (x0_pos, x0_h, step) of the previous step
    for i in range(steps):
        g_t, g_s = g_grid[i].float().to(device), g_grid[i + 1].float().to(device)
        t_vec = torch.full((n_atoms.numel(),), float(t_grid[i]), device=device)
        cond = prev[:2] if prev is not None and diffusion.self_condition else None
        eps_pos, eps_h = diffusion.predict_eps(pos, h, t_vec, batch, edge_index, cond=cond)
        a_t, s_t = alpha(g_t), sigma(g_t)
        x0_pos, x0_h = (pos - s_t * eps_pos) / a_t, (h - s_t * eps_h) / a_t
        step = float(lam[i + 1] - lam[i])
        if prev is None:
            d_pos, d_h = x0_pos, x0_h
        else:
            c = 0.5 * step / prev[2]  # 1 / (2 r)
            d_pos, d_h = (1 + c) * x0_pos - c * prev[0], (1 + c) * x0_h - c * prev[1]
        a_s, s_s = alpha(g_s), sigma(g_s)
        if eta > 0:
            h_step = torch.tensor(step, dtype=torch.float64)
            keep = float((s_s / s_t).double().cpu() * torch.exp(-eta * h_step))
            coef = float(a_s.double().cpu() * -torch.expm1(-(1.0 + eta) * h_step))
            noise_std = float(s_s.double().cpu() * torch.sqrt(-torch.expm1(-2.0 * eta * h_step)))
            noise_pos = _com_free(n_atoms, batch.cpu(), generator).to(device)
            noise_h = molecule_noise(n_atoms, N_FEATURES, generator).to(device)
            pos = remove_mean(keep * pos + coef * d_pos + noise_std * noise_pos, batch)
            h = keep * h + coef * d_h + noise_std * noise_h
        else:
            coef = -a_s * torch.expm1(torch.tensor(-step, device=device))
            pos = remove_mean((s_s / s_t) * pos + coef * d_pos, batch)
            h = (s_s / s_t) * h + coef * d_h
        prev = (x0_pos, x0_h, step)
        if i < steps - 1:
            _record(record, i + 1, pos, h)
        if progress is not None:
            progress(1)
    a_0 = alpha(g_grid[-1].float().to(device))
    pos, h = pos / a_0, h / a_0
    _record(record, steps, pos, h)
    return SampleBatch(pos=pos.cpu(), z=decode_types(h).cpu(), batch=batch.cpu(), n_atoms=n_atoms)


@torch.no_grad()
def dpm_solver_sample(diffusion: VPDiffusion, n_atoms: torch.Tensor, steps: int = 50,
                      generator: Generators = None,
                      progress: Callable[[int], None] | None = None, record: Recorder | None = None) -> SampleBatch:
    """Generate molecules with DPM-Solver++(2M) (probability-flow ODE) on a log-SNR-uniform grid.

    ``steps`` network evaluations. Deterministic given the initial noise, i.e. given ``generator``'s state.
    Arguments and return as :func:`ancestral_sample`.

    Raises:
        ValueError: ``steps < 1`` or an atom count < 1.
    """
    return _dpm_solver_2m(diffusion, n_atoms, steps, generator, progress, eta=0.0, record=record)


@torch.no_grad()
def sde_dpm_solver_sample(diffusion: VPDiffusion, n_atoms: torch.Tensor, steps: int = 50,
                          generator: Generators = None, progress: Callable[[int], None] | None = None,
                          record: Recorder | None = None,
                          eta: float = DEFAULT_ETAS["dpm2m-sde"]) -> SampleBatch:
    """Generate molecules with SDE-DPM-Solver++(2M) (stochastic, reduced log-SNR grid; Lu et al. 2022, App. B).

    ``steps`` network evaluations; fresh zero-CoM noise at every step for ``eta > 0``. ``eta``: the noise scale
    (module docstring; 1 = the published solver, 0 = the ODE solver ``dpm2m``). Other arguments and return as
    :func:`ancestral_sample`.

    Raises:
        ValueError: ``steps < 1`` or an atom count < 1.
        DiffgenError: ``eta`` not a finite number >= 0.
    """
    return _dpm_solver_2m(diffusion, n_atoms, steps, generator, progress, eta=eta, record=record)


SAMPLERS: dict[str, Callable[..., SampleBatch]] = {"ancestral": ancestral_sample, "dpm2m": dpm_solver_sample,
                                                   "dpm2m-sde": sde_dpm_solver_sample}


def get_sampler(name: str) -> Callable[..., SampleBatch]:
    """Sampler function by name (see :data:`SAMPLERS`).

    Raises:
        DiffgenError: unknown name.
    """
    from diffgen.errors import DiffgenError

    if name not in SAMPLERS:
        raise DiffgenError(f"unknown sampler {name!r}: choose {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
