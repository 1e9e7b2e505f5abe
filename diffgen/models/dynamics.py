"""Task heads built on the :class:`~diffgen.models.egnn.EGNN` backbone (or the E(3) transformer).

:class:`VelocityEGNNDynamics` is the N-body dynamics model of Satorras et al. 2021 (EGNN, Sec. 5.1,
eq. 7): positions are moved by the backbone's equivariant coordinate updates plus a learned,
invariant scale of the input velocity in every layer,

    x_i <- x_i + sum_j (x_i - x_j) f(m_ij) + phi_v(h_i) v_i ,

with node feature ``|v_i|`` and edge features ``q_i q_j`` (charges) and ``|x_i - x_j|^2``
(the latter is built into the backbone, at the current layer and at the input).

With ``pool_clusters = K > 0`` the model gets the EGHN hierarchy block (Han et al. 2022, Sec. 3;
:mod:`diffgen.models.eghn`): atom EGNN (the backbone above) -> E-Pool into ``K`` clusters -> cluster EGNN ->
E-UnPool -> one more atom EGNN layer refining the positions. ``K = 0`` is the flat model, unchanged.

With ``backbone="e3transformer"`` (:class:`~diffgen.models.e3transformer.E3Transformer`) the velocity enters as a
``1o`` input channel next to the same invariant features, charges as the same edge feature, and

    x_i <- x_i + s v_i + d_i ,

``d_i`` the transformer's ``1o`` output (its readout starts 100x smaller than e3nn's initialisation) and ``s`` one
learned scalar starting at ``vel_init``, so the model also starts at ``x + vel_init v``.
"""
from __future__ import annotations

import torch
from torch import nn

from diffgen.data.graphs import fully_connected_edges
from diffgen.models.eghn import EquivariantPooling
from diffgen.models.egnn import EGNN


class VelocityEGNNDynamics(nn.Module):
    """Predict positions a fixed time ahead from positions, velocities and charges of fixed-size systems.

    Args:
        hidden, n_layers, attention, norm_factor, coords_range: backbone settings (:class:`EGNN`).
        use_velocity: velocity-aware updates (eq. 7); False gives the flat EGNN (positions only,
            node feature ``|v|`` is then replaced by a constant).
        use_charges: edge feature ``q_i q_j``.
        vel_init: initial total velocity scale ``sum_layers phi_v``: 1.0 starts at the constant-velocity guess
            ``x + v`` (N-body, where the horizon is 1 time unit), 0.0 at the identity (MD, where velocities
            decorrelate long before the horizon).
        n_types: number of atom types given as ``types`` (one-hot node features next to ``|v|``); 0: none.
        pool_clusters: ``K``; 0 (default) = flat model, exactly as without pooling (same parameters and outputs).
            ``K >= 1``: the backbone outputs ``hidden`` atom features, then :class:`EquivariantPooling`
            (``pool_layers`` cluster EGNN layers) moves atoms by their clusters' displacements, and a final
            1-layer atom EGNN (``refine``, charges as edge features, no velocity) refines the positions; its
            coordinate shift is averaged over the ``n - 1`` neighbours (EGNN's ``C = 1/|N(i)|``), so it is at most
            ``coords_range`` and cannot undo the backbone wholesale (benchmarks/results/dynamics.md, "Design notes").
            ``forward(..., return_reg=True)`` then also returns the assignment regulariser
            (:func:`~diffgen.models.eghn.assignment_regulariser`, a scalar tensor with gradient) to be added to the
            loss with a weight.
        pool_layers: layers of the cluster EGNN (used only if ``pool_clusters > 0``).
        vector_channels: (needs ``use_velocity``) ``C`` equivariant vector channels per node, initialised with the
            velocity and updated by every layer (:class:`EGNN` ``vector_channels``); 0 is EGNN's eq. 7 model exactly.
        backbone: ``"egnn"`` (default) or ``"e3transformer"`` (module docstring; no pooling or vector channels, and
            ``attention``, ``norm_factor``, ``coords_range`` are unused).
        transformer: further :class:`~diffgen.models.e3transformer.E3Transformer` arguments (``lmax``, ``heads``, ...).

    Shapes:
        ``forward(pos [B, n, 3], vel [B, n, 3], charges [B, n], types [B, n] (long, if n_types) or None,
        return_reg=False)`` -> predicted positions ``[B, n, 3]`` (same units as ``pos``); with ``return_reg=True``
        the pair ``(positions [B, n, 3], reg)``, ``reg`` a scalar tensor in [0, 2] with pooling and None for the
        flat model (no regulariser). Every system is a fully connected graph of ``n`` nodes.

    Equivariance: rotating/reflecting/translating ``pos`` (and rotating/reflecting ``vel``) transforms
    the prediction the same way; permuting the atoms (with their charges) permutes it. Holds with pooling too,
    where ``reg`` is invariant.

    Raises:
        ValueError: ``pool_clusters < 0`` or ``pool_layers < 1`` with pooling, an unknown ``backbone``, pooling or
            vector channels with the transformer (construction); wrong input shapes,
            missing ``types``, or ``pool_clusters`` larger than the number of atoms ``n`` (forward).
    """

    def __init__(self, hidden: int = 64, n_layers: int = 4, attention: bool = False, norm_factor: float = 1.0,
                 coords_range: float = 10.0, use_velocity: bool = True, use_charges: bool = True, n_types: int = 0,
                 vel_init: float = 1.0, pool_clusters: int = 0, pool_layers: int = 2, vector_channels: int = 0,
                 backbone: str = "egnn", transformer: dict | None = None):
        super().__init__()
        if pool_clusters < 0:
            raise ValueError(f"pool_clusters must be >= 0 (0 = no pooling), got {pool_clusters}")
        if backbone not in ("egnn", "e3transformer"):
            raise ValueError(f"unknown backbone {backbone!r}: choose egnn or e3transformer")
        self.use_velocity, self.use_charges, self.n_types = use_velocity, use_charges, n_types
        self.pool_clusters, self.backbone_kind = pool_clusters, backbone
        if backbone == "e3transformer":
            if pool_clusters or vector_channels:
                raise ValueError("pool_clusters and vector_channels need the EGNN backbone")
            from diffgen.models.e3transformer import E3Transformer  # lazy: e3nn costs ~1.5 s of import
            self.backbone = E3Transformer(1 + n_types, hidden=hidden, out_dim=1, n_layers=n_layers,
                                          edge_dim=1 if use_charges else 0, velocity=use_velocity,
                                          **(transformer or {}))
            with torch.no_grad():  # small initial displacement d_i: start at x + vel_init v
                self.backbone.readout_vec.weight.mul_(0.01)
            if use_velocity:
                self.vel_scale = nn.Parameter(torch.tensor(float(vel_init)))
            return
        self.backbone = EGNN(1 + n_types, hidden=hidden, out_dim=hidden if pool_clusters else 1, n_layers=n_layers,
                             edge_dim=1 if use_charges else 0, attention=attention, norm_factor=norm_factor,
                             coords_range=coords_range, velocity=use_velocity, vector_channels=vector_channels)
        if use_velocity:
            # start at x + vel_init * v: each of the n_layers velocity scales begins at ~vel_init / n_layers
            # instead of a random value
            for layer in self.backbone.layers:
                last = layer.update.vel_mlp[-1]
                with torch.no_grad():  # channel 0 holds the input velocity; other channels start unused
                    last.weight.mul_(0.01)
                    last.bias.zero_()
                    last.bias[0] = vel_init / n_layers
        if pool_clusters:  # created after the backbone: with K = 0 nothing is added and the init is unchanged
            self.pool = EquivariantPooling(hidden, pool_clusters, n_layers=pool_layers, attention=attention,
                                           norm_factor=norm_factor, coords_range=coords_range)
            self.refine = EGNN(hidden, hidden=hidden, out_dim=1, n_layers=1, edge_dim=1 if use_charges else 0,
                               attention=attention, norm_factor=norm_factor, coords_range=coords_range)

    def forward(self, pos: torch.Tensor, vel: torch.Tensor, charges: torch.Tensor, types: torch.Tensor | None = None,
                return_reg: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        if pos.dim() != 3 or pos.shape[-1] != 3 or vel.shape != pos.shape or charges.shape != pos.shape[:2]:
            raise ValueError(f"expected pos/vel [B, n, 3] and charges [B, n], got {tuple(pos.shape)}, "
                             f"{tuple(vel.shape)}, {tuple(charges.shape)}")
        if self.n_types and (types is None or types.shape != pos.shape[:2]):
            raise ValueError(f"types [B, n] needed (model built with n_types={self.n_types})")
        b, n, _ = pos.shape
        batch = torch.arange(b, device=pos.device).repeat_interleave(n)
        edge_index = fully_connected_edges(batch)
        x = pos.reshape(b * n, 3)
        v = vel.reshape(b * n, 3)
        q = charges.reshape(b * n).to(pos.dtype)
        row, col = edge_index
        h = v.norm(dim=-1, keepdim=True) if self.use_velocity else torch.ones_like(x[:, :1])
        if self.n_types:
            onehot = torch.nn.functional.one_hot(types.reshape(b * n).long(), self.n_types).to(x.dtype)
            h = torch.cat([h, onehot], dim=-1)
        edge_attr = (q[row] * q[col]).unsqueeze(-1) if self.use_charges else None
        if self.pool_clusters > n:
            raise ValueError(f"pool_clusters={self.pool_clusters} exceeds the {n} atoms per system")
        h, out = self.backbone(h, x, edge_index, edge_attr, v if self.use_velocity else None)
        if self.backbone_kind == "e3transformer" and self.use_velocity:
            out = out + self.vel_scale * v
        reg = None
        if self.pool_clusters:
            h, out, reg = self.pool(h.reshape(b, n, -1), out.reshape(b, n, 3))
            x = out.reshape(b * n, 3)
            _, refined = self.refine(h.reshape(b * n, -1), x, edge_index, edge_attr)
            out = x + (refined - x) / max(n - 1, 1)
        out = out.reshape(b, n, 3)
        return (out, reg) if return_reg else out
