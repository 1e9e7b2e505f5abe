"""Variance-preserving diffusion over positions and atom types with zero-center-of-mass noise.

Hoogeboom, Satorras, Vignac & Welling, "Equivariant Diffusion for Molecule Generation in 3D"
(EDM), ICML 2022:

* state per atom ``[x, h]``: positions ``x`` in Å (unscaled) and ``h = [one_hot(type) / 4, Z / 10]``
  (EDM's ``normalize_factors = [1, 4, 10]``);
* forward process (EDM eq. 2): ``z_t = alpha_t [x, h] + sigma_t eps`` with ``alpha_t^2 + sigma_t^2 = 1``;
  the position part of ``eps`` lives in the zero-center-of-mass subspace of each molecule (EDM Sec. 3.2);
* the network predicts ``eps``; its position output is projected to zero center of mass, which makes the
  model's density translation invariant (EDM eq. 9);
* training loss: L2 between ``eps`` and ``eps_hat``, averaged over atoms and features of each
  molecule and over molecules, ``t ~ U(0, 1)`` (EDM Alg. 1, continuous time), times an optional weight
  of the noise level (``loss_weight``): ``"uniform"`` (EDM) or ``"min_snr"``, ``min(SNR, k) / SNR``
  (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting", eq. 5 for eps targets);
* parameterisation (``parameterization``): ``"eps"`` (EDM) - the network outputs the noise; ``"x0"`` -
  the network outputs the clean sample (positions as ``z_t`` plus its equivariant displacement, types as its
  invariant output) and ``eps_hat = (z_t - alpha_t x0_hat) / sigma_t`` (Kingma et al. 2021, VDM, App. D).
  Samplers always see ``eps_hat`` through :meth:`VPDiffusion.predict_eps`;
* type loss (``type_loss``, x0 only): ``"mse"`` (EDM) - the types are part of the Gaussian eps-MSE above;
  ``"ce"`` - categorical types: the first five type outputs are logits of the clean type, trained with
  cross-entropy against the true type (``type_weight`` x mean over the molecule's atoms, no noise-level weight),
  and ``x0_hat`` for the types is their expectation, ``[p / 4, (p . Z) / 10]``, so ``eps_hat`` and every sampler
  are unchanged; decoding stays the argmax of the one-hot part. The Gaussian diffusion of the one-hot types is
  EDM's; the cross-entropy on the x0 type logits follows continuous diffusion for categorical data (Dieleman et
  al. 2022, CDCD) and the categorical-type losses of MiDi (Vignac et al. 2023) and EQGAT-diff (Le et al. 2024);
* self-conditioning (``self_condition``; Chen, Zhang & Hinton 2022, "Analog Bits", Sec. 3 and Alg. 1-2): the
  denoiser also reads an earlier estimate ``x0_cond = (pos_cond, h_cond)`` of the clean molecule, as invariant
  inputs only (``h_cond`` as extra node features, ``|pos_cond_i - pos_cond_j|^2`` as an extra edge feature, and
  with vector channels ``pos_cond - pos_t`` as their start), so the model stays E(3)-equivariant. Training: for
  half of the batches the estimate is the model's own, from a first pass without gradient, else zeros; sampling
  feeds each step the ``x0`` estimate of the step before (zeros at the first).
"""
from __future__ import annotations

import torch
from torch import nn
from torch_geometric.utils import scatter

from diffgen.data.elements import ATOMIC_NUMBERS, NUM_TYPES, index_to_z, z_to_index
from diffgen.data.graphs import build_edges
from diffgen.diffusion.schedules import NoiseSchedule, alpha, sigma

ONE_HOT_SCALE = 4.0  # EDM: one-hot types divided by 4
CHARGE_SCALE = 10.0  # EDM: atomic numbers divided by 10
N_FEATURES = NUM_TYPES + 1  # one-hot (5) + scaled Z (1)
PARAMETERIZATIONS = ("eps", "x0")
LOSS_WEIGHTS = ("uniform", "min_snr")
#: Training-time distributions of t: uniform (EDM) | low_noise, Beta(1, 2) with density 2 (1 - t), twice as many
#: draws near the data end t = 0 as uniform and none at t = 1 (emphasises the fine geometry that decides stability)
T_SAMPLINGS = ("uniform", "low_noise")
TYPE_LOSSES = ("mse", "ce")


def remove_mean(pos: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Project ``pos`` ``[N, 3]`` onto the zero-center-of-mass subspace of each graph in ``batch`` ``[N]``."""
    mean = scatter(pos, batch, dim=0, reduce="mean")
    return pos - mean[batch]


def com_free_noise(batch: torch.Tensor, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard Gaussian noise ``[N, 3]`` projected to zero center of mass per graph (EDM Sec. 3.2)."""
    noise = torch.randn(batch.numel(), 3, generator=generator, dtype=dtype, device=batch.device)
    return remove_mean(noise, batch)


def encode_types(z: torch.Tensor) -> torch.Tensor:
    """Atomic numbers ``[N]`` -> scaled type features ``h`` ``[N, 6]`` = ``[one_hot / 4, Z / 10]``.

    Raises:
        DiffgenError: for elements other than H, C, N, O, F.
    """
    one_hot = torch.nn.functional.one_hot(z_to_index(z), NUM_TYPES).float()
    return torch.cat([one_hot / ONE_HOT_SCALE, z.float().unsqueeze(-1) / CHARGE_SCALE], dim=-1)


def decode_types(h: torch.Tensor) -> torch.Tensor:
    """Scaled features ``[N, 6]`` -> atomic numbers ``[N]`` by argmax of the one-hot part (EDM)."""
    return index_to_z(h[:, :NUM_TYPES].argmax(dim=-1))


class Denoiser(nn.Module):
    """Wraps an equivariant backbone into ``eps_theta(z_t, t)`` (EDM's ``EGNN_dynamics``).

    The time ``t`` is appended to every atom's features; the predicted position noise is the
    backbone's coordinate displacement ``pos_out - pos_t`` projected to zero center of mass; the
    predicted feature noise is the backbone's invariant output. A backbone with ``vector_channels > 0``
    (:class:`~diffgen.models.egnn.EGNN`) gets a velocity ``vel``: zero, so that its vector channels start at zero
    and are built by its layers from the atoms' relative positions, or with ``self_condition`` and an estimate,
    ``pos_cond - pos_t`` (both centred). With ``self_condition`` the backbone also reads the estimate of the clean
    molecule (module docstring): node inputs ``[h_t, h_cond, t]`` and one edge feature
    ``|pos_cond_i - pos_cond_j|^2`` (EGNN ``edge_dim=1``). Every extra input is invariant or translation-free
    equivariant, so the model stays E(3)-equivariant.

    Args:
        backbone: module ``(h [N, N_FEATURES + 1], pos [N, 3], edge_index) -> (h [N, N_FEATURES], pos [N, 3])``
            (with ``self_condition``: ``h [N, 2 N_FEATURES + 1]`` and ``edge_attr=[E, 1]``; with vector channels
            also ``vel=[N, 3]``), e.g.
            :class:`~diffgen.models.egnn.EGNN` or :class:`~diffgen.models.e3transformer.E3Transformer`.
        graph: ``"full"`` (default), ``"radius"`` or ``"knn"``; see :mod:`diffgen.data.graphs`.
        cutoff, k: graph parameters for radius / knn.
    """

    def __init__(self, backbone: nn.Module, graph: str = "full", cutoff: float | None = None, k: int | None = None,
                 self_condition: bool = False):
        super().__init__()
        self.backbone, self.graph, self.cutoff, self.k = backbone, graph, cutoff, k
        self.self_condition = self_condition

    def forward(self, pos_t: torch.Tensor, h_t: torch.Tensor, t: torch.Tensor, batch: torch.Tensor,
                edge_index: torch.Tensor | None = None,
                cond: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``pos_t [N, 3]``, ``h_t [N, 6]``, ``t [B]`` in [0, 1], ``batch [N]`` -> ``(eps_pos [N, 3], eps_h [N, 6])``.

        ``cond``: with ``self_condition``, the estimate ``(pos_cond [N, 3] Å, h_cond [N, 6])`` of the clean molecule
        to condition on (None: zeros, "no estimate"); without ``self_condition`` it must be None.
        """
        if cond is not None and not self.self_condition:
            raise ValueError("cond given to a Denoiser built without self_condition")
        if edge_index is None:
            edge_index = build_edges(pos_t, batch, self.graph, self.cutoff, self.k)
        feats = [h_t, t[batch].unsqueeze(-1).to(h_t.dtype)]
        kwargs = {}
        vel = torch.zeros_like(pos_t)
        if self.self_condition:
            pos_c, h_c = cond if cond is not None else (torch.zeros_like(pos_t), torch.zeros_like(h_t))
            feats.insert(1, h_c.to(h_t.dtype))
            row, col = edge_index
            kwargs["edge_attr"] = (pos_c[row] - pos_c[col]).pow(2).sum(-1, keepdim=True).to(pos_t.dtype)
            if cond is not None:  # both centred: translation invariant whatever the caller passes
                vel = (remove_mean(pos_c, batch) - remove_mean(pos_t, batch)).to(pos_t.dtype)
        if getattr(self.backbone, "vector_channels", 0):
            kwargs["vel"] = vel
        h_out, pos_out = self.backbone(torch.cat(feats, dim=-1), pos_t, edge_index, **kwargs)
        eps_pos = remove_mean(pos_out - pos_t, batch)
        return eps_pos, h_out


class VPDiffusion(nn.Module):
    """The EDM diffusion process around a :class:`Denoiser`.

    Args:
        denoiser: the noise-prediction network.
        schedule: :class:`NoiseSchedule` (default EDM polynomial_2 with s = 1e-5).
    """

    def __init__(self, denoiser: Denoiser, schedule: NoiseSchedule | None = None, parameterization: str = "eps",
                 loss_weight: str = "uniform", min_snr: float = 5.0, t_sampling: str = "uniform",
                 type_loss: str = "mse", type_weight: float = 1.0):
        super().__init__()
        if getattr(denoiser, "self_condition", False) and parameterization != "x0":
            raise ValueError("self-conditioning needs parameterization='x0'")
        if type_loss not in TYPE_LOSSES:
            raise ValueError(f"type_loss must be one of {TYPE_LOSSES}, got {type_loss!r}")
        if type_loss == "ce" and parameterization != "x0":
            raise ValueError("type_loss='ce' needs parameterization='x0' (the type outputs are x0 logits)")
        if type_weight < 0:
            raise ValueError(f"type_weight must be >= 0, got {type_weight}")
        self.type_loss, self.type_weight = type_loss, type_weight
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling must be one of {T_SAMPLINGS}, got {t_sampling!r}")
        self.t_sampling = t_sampling
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        if loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"loss_weight must be one of {LOSS_WEIGHTS}, got {loss_weight!r}")
        if min_snr <= 0:
            raise ValueError(f"min_snr must be positive, got {min_snr}")
        self.denoiser = denoiser
        self.schedule = schedule if schedule is not None else NoiseSchedule()
        self.parameterization, self.loss_weight, self.min_snr = parameterization, loss_weight, min_snr

    @property
    def self_condition(self) -> bool:
        """Whether the denoiser reads an earlier ``x0`` estimate (samplers then pass it: ``predict_eps(cond=)``)."""
        return bool(getattr(self.denoiser, "self_condition", False))

    def predict_eps(self, pos_t: torch.Tensor, h_t: torch.Tensor, t: torch.Tensor, batch: torch.Tensor,
                    edge_index: torch.Tensor | None = None,
                    cond: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``eps_hat`` for ``z_t = [pos_t [N, 3], h_t [N, 6]]`` at times ``t [B]``, whatever the parameterisation.

        ``cond``: with :attr:`self_condition`, the previous ``x0`` estimate ``(pos [N, 3] Å, h [N, 6])`` (None at the
        first step); see :meth:`x0_from_eps`.

        Returns ``(eps_pos [N, 3] zero-CoM, eps_h [N, 6])``.
        """
        return self._predict(pos_t, h_t, t, batch, edge_index, cond)[:2]

    def x0_from_eps(self, pos_t: torch.Tensor, h_t: torch.Tensor, t: torch.Tensor, batch: torch.Tensor,
                    eps_pos: torch.Tensor, eps_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean-molecule estimate ``x0 = (z_t - sigma_t eps) / alpha_t`` (positions re-centred): the
        self-conditioning input of the next step. Shapes as :meth:`predict_eps`."""
        g = self.gamma(t)[batch].unsqueeze(-1).to(pos_t.dtype)
        a, s = alpha(g), sigma(g)
        return remove_mean((pos_t - s * eps_pos) / a, batch), (h_t - s * eps_h) / a

    def _predict(self, pos_t, h_t, t, batch, edge_index=None, cond=None):
        """``(eps_pos, eps_h, type_logits [N, 5] or None)``: :meth:`predict_eps` plus, for ``type_loss='ce'``, the
        clean-type logits the loss needs."""
        if cond is None:
            out_pos, out_h = self.denoiser(pos_t, h_t, t, batch, edge_index)
        elif self.self_condition:
            out_pos, out_h = self.denoiser(pos_t, h_t, t, batch, edge_index, cond)
        else:
            raise ValueError("cond given to a diffusion whose denoiser has no self-conditioning")
        if self.parameterization == "eps":
            return out_pos, out_h, None
        g = self.gamma(t)[batch].unsqueeze(-1).to(pos_t.dtype)
        a, s = alpha(g), sigma(g)
        x0_pos = remove_mean(pos_t, batch) + out_pos  # the backbone's displacement is zero-CoM already
        logits = None
        if self.type_loss == "ce":
            logits = out_h[:, :NUM_TYPES].to(h_t.dtype)
            out_h = self.expected_types(logits)
        return (pos_t - a * x0_pos) / s, (h_t - a * out_h) / s, logits

    @staticmethod
    def expected_types(logits: torch.Tensor) -> torch.Tensor:
        """Type logits ``[N, 5]`` -> the expected scaled features ``[N, 6]`` = ``[p / 4, (p . Z) / 10]``, ``p`` the
        softmax: the x0 types of ``type_loss='ce'`` (the argmax of the one-hot part is the most likely type)."""
        p = torch.softmax(logits, dim=-1)
        z = torch.tensor(ATOMIC_NUMBERS, dtype=p.dtype, device=p.device)
        # an elementwise product, not p @ z: a matmul would run in bf16 under autocast
        return torch.cat([p / ONE_HOT_SCALE, (p * z).sum(-1, keepdim=True) / CHARGE_SCALE], dim=-1)

    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training times ``t [n]`` in [0, 1] from :data:`T_SAMPLINGS` ``[self.t_sampling]`` (inverse CDF of one
        uniform draw each: ``u`` for uniform, ``1 - sqrt(1 - u)`` for low_noise)."""
        u = torch.rand(n, generator=generator, device=device)
        return u if self.t_sampling == "uniform" else 1 - torch.sqrt(1 - u)

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """``gamma(t) = -log_snr(t)`` for ``t`` in [0, 1] (any shape)."""
        return self.schedule.gamma(t)

    def noise(self, pos: torch.Tensor, h: torch.Tensor, t: torch.Tensor, batch: torch.Tensor,
              generator: torch.Generator | None = None):
        """Sample ``q(z_t | x)`` (EDM eq. 2).

        Args:
            pos ``[N, 3]`` zero-CoM positions (Å); h ``[N, 6]`` scaled types; t ``[B]``; batch ``[N]``.

        Returns:
            ``(pos_t, h_t, eps_pos, eps_h)``, each with the shape of its input; ``eps_pos`` is zero-CoM.
        """
        g = self.gamma(t)[batch].unsqueeze(-1)
        a, s = alpha(g), sigma(g)
        eps_pos = com_free_noise(batch, generator, pos.dtype)
        eps_h = torch.randn(h.shape, generator=generator, dtype=h.dtype, device=h.device)
        return a * pos + s * eps_pos, a * h + s * eps_h, eps_pos, eps_h

    def loss(self, pos: torch.Tensor, z: torch.Tensor, batch: torch.Tensor, t: torch.Tensor | None = None,
             generator: torch.Generator | None = None, weighted: bool = True) -> torch.Tensor:
        """Mean squared eps-prediction error (EDM Alg. 1), weighted by ``loss_weight``, a scalar.

        With ``type_loss='ce'`` the types' part of the squared error is replaced by ``type_weight`` x their
        cross-entropy (mean over the molecule's atoms, not weighted by the noise level); the position part is the
        same as with ``'mse'``.

        Args:
            pos ``[N, 3]`` positions in Å (centred here); z ``[N]`` atomic numbers; batch ``[N]``;
            t ``[B]`` optional times in [0, 1] (default: drawn by :meth:`sample_t`);
            weighted: False gives the plain (uniform) eps-MSE of positions and types, comparable across loss
                weightings and type losses.
        """
        n_graphs = int(batch.max()) + 1 if batch.numel() else 0
        if t is None:
            t = self.sample_t(n_graphs, generator, pos.device)
        pos = remove_mean(pos, batch)
        h = encode_types(z)
        pos_t, h_t, eps_pos, eps_h = self.noise(pos, h, t, batch, generator)
        cond = None
        if self.self_condition and float(torch.rand(1, generator=generator, device=generator.device
                                                    if generator is not None else None)) < 0.5:
            with torch.no_grad():  # Analog Bits, Alg. 1: the model's own estimate, no gradient through it
                cond = self.x0_from_eps(pos_t, h_t, t, batch, *self._predict(pos_t, h_t, t, batch)[:2])
        pred_pos, pred_h, logits = self._predict(pos_t, h_t, t, batch, cond=cond)
        ce = weighted and logits is not None
        err = (pred_pos - eps_pos).pow(2).sum(-1)  # [N]
        if not ce:
            err = err + (pred_h - eps_h).pow(2).sum(-1)
        per_graph = scatter(err, batch, dim=0, dim_size=n_graphs, reduce="mean") / (3 + N_FEATURES)
        if weighted and self.loss_weight == "min_snr":
            snr = torch.exp(-self.gamma(t)).to(per_graph.dtype)
            per_graph = per_graph * snr.clamp(max=self.min_snr) / snr
        if ce:
            nll = torch.nn.functional.cross_entropy(logits.float(), z_to_index(z), reduction="none")
            per_graph = per_graph + self.type_weight * scatter(nll.to(per_graph.dtype), batch, dim=0,
                                                               dim_size=n_graphs, reduce="mean")
        return per_graph.mean()
