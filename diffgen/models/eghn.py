"""Equivariant pooling / unpooling of atoms into learned clusters (the EGHN hierarchy block).

Han, Huang, Xu & Rong, "Equivariant Graph Hierarchy-Based Neural Networks", NeurIPS 2022, Sec. 3
(E-Pool and E-UnPool; their E(n)-equivariance is Theorem 2, proved in App. A.2). For every system of
``n`` atoms with invariant features ``h_i`` and positions ``x_i``:

E-Pool (soft assignment of atoms to ``K`` clusters, an invariant of ``h``):

    g_i  = LayerNorm(h_i)                                   (per atom: O(1) features whatever the backbone's scale)
    s_ik = softmax_k( MLP(g_i) )_k                          (sum_k s_ik = 1 for every atom)
    m_k  = sum_i s_ik                                       (cluster mass, in atoms)
    Z_k  = c + sum_i s_ik (x_i - c) / m_k,   c = mean_i x_i  (weighted mean, E(n)-equivariant)
    H_k  = sum_i s_ik g_i / m_k                             (weighted mean, invariant)

high-level message passing: an :class:`~diffgen.models.egnn.EGNN` on the fully connected graph of the
``K`` clusters of each system, node features ``[H_k, m_k / n]``: ``(H'_k, Z'_k) = EGNN(...)``;

E-UnPool (back to the atoms, through the same assignment):

    x_i <- x_i + sum_k s_ik (Z'_k - Z_k)
    h_i <- g_i + sum_k s_ik H'_k

Centring on ``c`` before the weighted mean makes ``Z_k`` exactly translation-equivariant even when a
cluster's mass is clamped (``m_k >= 1e-6``); EGHN's reference code divides uncentred sums instead. The
LayerNorm (not in the paper) keeps the assignment logits O(1) at initialisation whatever the scale of the
backbone's features (why it was needed: benchmarks/results/dynamics.md, "Design notes").
Simplifications against the paper: the atom- and cluster-level message passing is the plain
(velocity-aware) EGNN of this package, not EGHN's multi-channel EMMP, and the assignment MLP reads the
backbone's atom features rather than a separate pooling network.

Assignment regulariser (:func:`assignment_regulariser`). EGHN regularises ``S`` with a cut loss on the
pooled *local* adjacency, ``|| rownorm(S^T A S) - I ||_F`` (reference code, ``get_cut_loss``); on the fully
connected graphs used here ``A = 11^T - I`` carries no structure, so we use the two standard soft-pooling
terms instead, each normalised to [0, 1]:

    crisp   = mean_i H(s_i) / log K                 (DiffPool entropy term, Ying et al. 2018, Sec. 3.3)
    balance = 1 - H(p) / log K,  p_k = m_k / n      (collapse penalty: every cluster should get atoms)
    reg     = crisp + balance                       (0 for K = 1)

with ``H(p) = -sum_k p_k log p_k``. ``crisp`` pushes every atom into one cluster, ``balance`` stops all
atoms from choosing the same one.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from diffgen.data.graphs import fully_connected_edges
from diffgen.models.egnn import EGNN

#: Smallest cluster mass (atoms) used as a divisor; a cluster lighter than this is an (almost) empty one.
MIN_MASS = 1e-6


def assignment_regulariser(log_s: torch.Tensor) -> torch.Tensor:
    """Crispness + balance penalty of soft assignments (see the module docstring), a scalar in [0, 2].

    Args:
        log_s: log-assignments ``[B, n, K]`` (``log_softmax`` over the last axis: rows of ``exp(log_s)`` sum to 1).

    Returns:
        ``mean_{b,i} H(s_bi) / log K + mean_b (1 - H(p_b) / log K)``; a zero tensor (with gradient graph)
        when ``K == 1``.

    Raises:
        ValueError: ``log_s`` is not 3-dimensional or has an empty axis.
    """
    if log_s.dim() != 3 or 0 in log_s.shape:
        raise ValueError(f"log-assignments must have shape [B, n, K] with B, n, K >= 1, got {tuple(log_s.shape)}")
    k = log_s.shape[-1]
    if k == 1:
        return log_s.sum() * 0.0
    s = log_s.exp()
    crisp = -(s * log_s).sum(-1).mean() / math.log(k)
    p = s.mean(1)  # [B, K], sums to 1 per system
    balance = 1.0 + (p * p.clamp_min(1e-12).log()).sum(-1).mean() / math.log(k)
    return crisp + balance


class EquivariantPooling(nn.Module):
    """EGHN hierarchy block: E-Pool atoms into ``K`` clusters, EGNN on the clusters, E-UnPool back.

    Args:
        hidden: width of the atom features ``h`` (in and out) and of the cluster EGNN.
        n_clusters: ``K >= 1`` clusters per system (EGHN uses K = 4-5 on its simulations).
        n_layers: layers of the cluster EGNN.
        attention, norm_factor, coords_range: cluster EGNN settings (:class:`EGNN`); ``coords_range`` in the
            units of the positions.

    Shapes:
        ``forward(h [B, n, hidden], pos [B, n, 3])`` -> ``(h' [B, n, hidden], pos' [B, n, 3], reg [])`` with
        ``h' = LayerNorm(h) + unpooled cluster features``;
        positions in any length unit (Å for MD), returned in the same unit. After a call, ``last_assign``
        holds the assignments ``s`` ``[B, n, K]`` (detached) for inspection.

    Equivariance: for orthogonal ``Q``, translation ``t`` and atom permutation ``P`` (per system):
    ``pos' (P pos Q^T + t) = P pos' Q^T + t``, ``h'`` and ``reg`` unchanged up to ``P``; the clusters are
    unordered (a permutation of the MLP's outputs relabels them), so nothing depends on atom order.

    Raises:
        ValueError: ``n_clusters < 1`` or ``n_layers < 1`` (construction); bad shapes or ``K > n`` (forward).
    """

    def __init__(self, hidden: int, n_clusters: int, n_layers: int = 2, attention: bool = False,
                 norm_factor: float = 1.0, coords_range: float = 10.0):
        super().__init__()
        if n_clusters < 1:
            raise ValueError(f"EquivariantPooling needs n_clusters >= 1, got {n_clusters}")
        if n_layers < 1:
            raise ValueError(f"EquivariantPooling needs n_layers >= 1, got {n_layers}")
        self.hidden, self.n_clusters = hidden, n_clusters
        self.norm = nn.LayerNorm(hidden)
        self.assign = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, n_clusters))
        # start away from uniform assignments: there the entropy term has zero gradient (a maximum), and with the
        # default init (logits ~0.1) the clusters stayed fuzzy (mean max s_ik ~0.3) on alanine dipeptide
        nn.init.normal_(self.assign[-1].weight, std=1.0)
        # cluster features [H_k, m_k / n] -> (H'_k, Z'_k); coordinate updates start near zero (EGNNLayer init)
        self.cluster_egnn = EGNN(hidden + 1, hidden=hidden, out_dim=hidden, n_layers=n_layers,
                                 attention=attention, norm_factor=norm_factor, coords_range=coords_range)
        self.last_assign: torch.Tensor | None = None

    def pool(self, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """E-Pool: ``(log_s [B, n, K], mass [B, K], Z [B, K, 3], H [B, K, hidden], g [B, n, hidden])``.

        Raises:
            ValueError: shapes other than ``h [B, n, hidden]``, ``pos [B, n, 3]``, or more clusters than atoms.
        """
        if h.dim() != 3 or h.shape[-1] != self.hidden or pos.shape != (*h.shape[:2], 3):
            raise ValueError(f"expected h [B, n, {self.hidden}] and pos [B, n, 3], got {tuple(h.shape)}, "
                             f"{tuple(pos.shape)}")
        n = h.shape[1]
        if self.n_clusters > n:
            raise ValueError(f"model.pool_clusters={self.n_clusters} exceeds the {n} atoms per system")
        g = self.norm(h)
        log_s = torch.log_softmax(self.assign(g), dim=-1)  # [B, n, K]
        s = log_s.exp()
        mass = s.sum(1)  # [B, K]
        inv = 1.0 / mass.clamp_min(MIN_MASS)
        centre = pos.mean(1, keepdim=True)  # [B, 1, 3]
        z = centre + torch.einsum("bnk,bnd->bkd", s, pos - centre) * inv.unsqueeze(-1)
        hk = torch.einsum("bnk,bnf->bkf", s, g) * inv.unsqueeze(-1)
        return log_s, mass, z, hk, g

    def forward(self, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_s, mass, z, hk, g = self.pool(h, pos)
        b, n, _ = h.shape
        k = self.n_clusters
        s = log_s.exp()
        self.last_assign = s.detach()
        batch = torch.arange(b, device=pos.device).repeat_interleave(k)  # K = 1: no edges, Z stays put
        feats = torch.cat([hk, (mass / n).unsqueeze(-1)], dim=-1).reshape(b * k, self.hidden + 1)
        h_new, z_new = self.cluster_egnn(feats, z.reshape(b * k, 3), fully_connected_edges(batch))
        disp = z_new.reshape(b, k, 3) - z
        pos = pos + torch.einsum("bnk,bkd->bnd", s, disp)  # E-UnPool
        h = g + torch.einsum("bnk,bkf->bnf", s, h_new.reshape(b, k, self.hidden))
        return h, pos, assignment_regulariser(log_s)
