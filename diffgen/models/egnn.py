"""E(n)-equivariant graph neural network (EGNN) on sparse PyG graphs.

Satorras, Hoogeboom & Welling, "E(n) Equivariant Graph Neural Networks", ICML 2021,
eqs. (3)-(6), with the modifications of Hoogeboom et al. 2022 (EDM, App. B):
attention gate on messages, squared distances at the current layer *and* at the
network input as edge features, and a bounded coordinate update

    m_ij  = phi_e(h_i, h_j, |x_i - x_j|^2, |x_i^0 - x_j^0|^2, a_ij) * sigmoid(phi_att(m_ij))
    h_i  <- h_i + phi_h(h_i, sum_j m_ij / Z)
    x_i  <- x_i + sum_j (x_i - x_j) / (|x_i - x_j| + 1) * tanh(phi_x(m'_ij)) * r / Z

where ``Z`` is a normalisation constant and ``r`` the coordinate range (15 Å in EDM).
Molecules are never padded: every quantity lives on nodes ``[N, .]`` or edges ``[E, .]``.

Structure, as in EDM's ``egnn_new.py``: :class:`MessageBlock` (EDM's ``GCL``: the invariant message passing,
the first two lines), :class:`EquivariantUpdate` (EDM's ``EquivariantUpdate``: the coordinate update, the last
line, and the velocity / vector-channel updates), composed by :class:`EGNNLayer` (EDM's ``EquivariantBlock``)
and stacked by :class:`EGNN`. Names: ``vel`` ``[N, 3]`` is a velocity; ``vec`` ``[N, C, 3]`` are ``C``
equivariant vector channels per node.

The first linear layer of each edge MLP acts on a concatenation ``[h_i, h_j, e_ij]``; it
is split into node-level products gathered per edge, which is the same function at a
fraction of the cost (N << E).
"""
from __future__ import annotations

import torch
from torch import nn
from torch_geometric.utils import scatter

from diffgen.models.inputs import check_backbone_inputs


def _soft_unit(v: torch.Tensor) -> torch.Tensor:
    """``v / sqrt(|v|^2 + 1)`` over the last axis: ~``v`` for short vectors, ~unit for long ones, smooth at 0.

    Keeps the vector-channel invariants in [-1, 1] whatever the units (N-body speeds ~1, MD velocities ~10 Å/ps).
    """
    return v * torch.rsqrt(v.pow(2).sum(-1, keepdim=True) + 1.0)


class _PairLinear(nn.Module):
    """``Linear([h_i, h_j, e_ij])`` computed as ``A h_i + B h_j + C e_ij`` (exactly the same map)."""

    def __init__(self, node_dim: int, edge_dim: int, out_dim: int):
        super().__init__()
        self.src = nn.Linear(node_dim, out_dim)  # carries the bias
        self.dst = nn.Linear(node_dim, out_dim, bias=False)
        self.edge = nn.Linear(edge_dim, out_dim, bias=False)

    def forward(self, h: torch.Tensor, edge_attr: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        return self.src(h)[row] + self.dst(h)[col] + self.edge(edge_attr)


class MessageBlock(nn.Module):
    """Invariant message passing (EDM's ``GCL``): EGNN eqs. (3), (5), (6), with EDM's attention gate.

        m_ij = phi_e(h_i, h_j, e_ij) * sigmoid(phi_att(phi_e(...)))      (eq. 3; the gate is EDM's, App. B)
        m_i  = sum_j m_ij / Z                                            (eq. 5)
        h_i <- h_i + phi_h(h_i, m_i, log(1 + |V_i^c|^2)_c)               (eq. 6, residual as in EDM)

    ``phi_e`` = Linear-SiLU-Linear-SiLU, ``phi_h`` = Linear-SiLU-Linear; the norms of the ``C`` vector channels
    ``V_i^c`` enter ``phi_h`` only with vector channels (``C >= 1``, see :class:`EGNNLayer`).

    Args:
        hidden: width of ``h`` and of the messages.
        edge_dim: width of the invariant edge features ``e_ij`` (squared distances and extras).
        attention: gate the messages (EDM default True).
        norm_factor: ``Z``.
        vector_channels: ``C >= 0``.

    Shapes:
        ``forward(h [N, hidden], edge_index [2, E] (row = receiver i), edge_attr [E, edge_dim], vec [N, C, 3] or
        None) -> (h' [N, hidden], m [E, hidden])``. Dimensionless features; the squared distances in ``edge_attr``
        are in squared length units (Å^2 for molecules).

    Invariance: reads geometry only through ``edge_attr`` and ``|V_i^c|``, so ``h'`` and ``m`` are E(n)-invariant
    whenever ``edge_attr`` is.
    """

    def __init__(self, hidden: int, edge_dim: int, attention: bool = True, norm_factor: float = 1.0,
                 vector_channels: int = 0):
        super().__init__()
        act = nn.SiLU()
        self.norm_factor, self.vector_channels = norm_factor, vector_channels
        self.edge_in = _PairLinear(hidden, edge_dim, hidden)
        self.edge_mlp = nn.Sequential(act, nn.Linear(hidden, hidden), act)
        self.att = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid()) if attention else None
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden + vector_channels, hidden), act, nn.Linear(hidden, hidden))

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor,
                vec: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        row, col = edge_index
        m = self.edge_mlp(self.edge_in(h, edge_attr, row, col))
        if self.att is not None:
            m = m * self.att(m)
        agg = scatter(m, row, dim=0, dim_size=h.shape[0], reduce="sum") / self.norm_factor
        node_in = [h, agg, torch.log1p(vec.pow(2).sum(-1))] if self.vector_channels else [h, agg]
        return h + self.node_mlp(torch.cat(node_in, dim=-1)), m


class EquivariantUpdate(nn.Module):
    """Equivariant coordinate update (EDM's ``EquivariantUpdate``): EGNN eq. (4) in EDM's bounded form, and eq. (7).

        u_ij   = (x_i - x_j) / (|x_i - x_j| + 1)
        x_i   <- x_i + sum_j u_ij tanh(phi_x(h_i, h_j, e_ij)) r / Z                 (eq. 4; EDM App. B)
        x_i   <- x_i + phi_v(h_i) v_i                                    velocity, C = 0 (eq. 7)
        V_i^c <- sum_d W_cd V_i^d + sum_j [u_ij tanh(a_c(m_ij)) r + V_j^c b_c(m_ij)] / Z
        x_i   <- x_i + sum_c phi_v^c(h_i) V_i^c                           vector channels, C >= 1

    As in EDM, ``phi_x`` (Linear-SiLU-Linear-SiLU-Linear, last layer initialised ~0) reads ``[h_i, h_j, e_ij]``
    with the features ``h`` already updated by this layer's :class:`MessageBlock` (EGNN's eq. 4 reads ``m_ij``);
    ``phi_v`` also reads the updated ``h`` (eq. 7 reads the layer's input ``h``). ``a_c, b_c`` = one linear map
    of the messages ``m_ij``, ``W`` a ``C x C`` channel mixing (identity at start).

    Args:
        hidden, edge_dim, norm_factor (``Z``): as :class:`MessageBlock`.
        coords_range: ``r``, the bound of each pair's coordinate shift, in the length unit of ``pos``.
        velocity: add eq. 7 (``phi_v``); vector_channels: ``C >= 0`` (``C >= 1`` needs ``velocity``).

    Shapes and units:
        ``forward(h [N, hidden], pos [N, 3], edge_index [2, E], edge_attr [E, edge_dim], m [E, hidden],
        vel [N, 3] or None, vec [N, C, 3] or None) -> (pos' [N, 3], vec' [N, C, 3] or None)``; ``pos`` in any
        length unit (Å for molecules), returned in it; ``vel`` in length per unit of the time ``phi_v`` learns
        (``vel`` is needed iff ``velocity`` and ``C = 0``, ``vec`` iff ``C >= 1``); ``vec'`` is None without
        vector channels.

    Equivariance: with invariant ``h``, ``e_ij`` and ``m_ij``, every shift is a sum of invariant multiples of
    ``x_i - x_j``, ``v_i`` and ``V^c``, so for orthogonal ``Q`` and translation ``t``:
    ``(x Q^T + t, v Q^T, V Q^T) -> (x' Q^T + t, V' Q^T)`` (velocities and vector channels do not translate).
    """

    def __init__(self, hidden: int, edge_dim: int, norm_factor: float = 1.0, coords_range: float = 15.0,
                 velocity: bool = False, vector_channels: int = 0):
        super().__init__()
        act = nn.SiLU()
        c = vector_channels
        self.norm_factor, self.coords_range = norm_factor, coords_range
        self.velocity, self.vector_channels = velocity, c
        self.coord_in = _PairLinear(hidden, edge_dim, hidden)
        last = nn.Linear(hidden, 1, bias=False)
        nn.init.xavier_uniform_(last.weight, gain=0.001)  # start close to the identity map on pos
        self.coord_mlp = nn.Sequential(act, nn.Linear(hidden, hidden), act, last)
        if velocity:  # phi_v: invariant per-node scale of the velocity (one per vector channel)
            self.vel_mlp = nn.Sequential(nn.Linear(hidden, hidden), act, nn.Linear(hidden, max(c, 1)))
        if c:
            self.vec_edge = nn.Linear(hidden, 2 * c)  # a_c (radial) and b_c (neighbour vector) per channel
            nn.init.xavier_uniform_(self.vec_edge.weight, gain=0.001)
            nn.init.zeros_(self.vec_edge.bias)
            self.vec_mix = nn.Linear(c, c, bias=False)
            nn.init.eye_(self.vec_mix.weight)

    def forward(self, h: torch.Tensor, pos: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor,
                m: torch.Tensor, vel: torch.Tensor | None = None, vec: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        row, col = edge_index
        diff = pos[row] - pos[col]
        d2 = diff.pow(2).sum(-1, keepdim=True)
        # sqrt has an infinite derivative at 0: coincident nodes (e.g. two empty EGHN clusters, both at the
        # centroid) would give NaN gradients. Their shift is 0 whatever ``dist`` is (diff = 0), so use 1 there;
        # for distinct nodes the forward value is bit-identical to sqrt(d2).
        dist = torch.where(d2 > 0, d2, torch.ones_like(d2)).sqrt()
        unit = diff / (dist + 1.0)
        gate = torch.tanh(self.coord_mlp(self.coord_in(h, edge_attr, row, col))) * self.coords_range
        pos = pos + scatter(unit * gate, row, dim=0, dim_size=pos.shape[0], reduce="sum") / self.norm_factor
        if self.vector_channels:
            c = self.vector_channels
            coef = self.vec_edge(m)
            dvec = unit[:, None] * torch.tanh(coef[:, :c, None]) * self.coords_range + vec[col] * coef[:, c:, None]
            vec = torch.einsum("dc,nck->ndk", self.vec_mix.weight, vec) \
                + scatter(dvec, row, dim=0, dim_size=vec.shape[0], reduce="sum") / self.norm_factor
            pos = pos + (self.vel_mlp(h)[..., None] * vec).sum(1)
        elif self.velocity:
            pos = pos + self.vel_mlp(h) * vel
        return pos, vec


#: first names of the parameters of :class:`EGNNLayer` before it was split into two blocks, per new sub-module
_PRE_SPLIT_NAMES = {"message.": ("edge_in.", "edge_mlp.", "att.", "node_mlp."),
                    "update.": ("coord_in.", "coord_mlp.", "vel_mlp.", "vec_edge.", "vec_mix.")}


def _rename_pre_split_keys(module, state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook of :class:`EGNNLayer`: weights saved before the split (shipped safetensors,
    Lightning checkpoints) name ``{prefix}edge_in.src.weight``; now ``{prefix}message.edge_in.src.weight``."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        for block, firsts in _PRE_SPLIT_NAMES.items():
            if key[len(prefix):].startswith(firsts):
                state_dict[prefix + block + key[len(prefix):]] = state_dict.pop(key)


class EGNNLayer(nn.Module):
    """One EGNN layer (EDM's ``EquivariantBlock``): :class:`MessageBlock`, then (unless ``update_pos=False``)
    :class:`EquivariantUpdate` with the updated features.

    Args:
        hidden: width of ``h`` and of the messages.
        edge_dim: number of invariant edge features (squared distances plus extras).
        attention: gate messages with ``sigmoid(Linear(m_ij))``.
        update_pos: if False the layer is E(n)-invariant and returns ``pos`` unchanged.
        norm_factor: messages and coordinate shifts are summed then divided by this.
        coords_range: bound ``r`` of the tanh-gated coordinate update (length unit of ``pos``).
        velocity: also move ``pos`` along a given velocity, ``x_i += phi_v(h_i) v_i`` (EGNN eq. 7,
            Satorras et al. 2021); off by default, and then the layer is unchanged.
        vector_channels: ``C >= 1`` (needs ``velocity``): the velocity input is replaced by ``C`` equivariant vector
            channels per node, ``vec`` ``[N, C, 3]``, updated in every layer and driving the positions (equations in
            :class:`EquivariantUpdate`; their norms enter the node update of :class:`MessageBlock`). Vectors such
            as velocities do not move under translations, so these updates are E(n)-equivariant. The caller
            supplies the pairwise invariants of ``V_i``, ``V_j`` and ``x_i - x_j`` per channel in ``edge_attr``
            (see :class:`EGNN`). 0 (default): eq. 7 with ``vel`` ``[N, 3]``.

    Shapes:
        ``forward(h [N, hidden], pos [N, 3], edge_index [2, E], edge_attr [E, edge_dim], vel [N, 3] or None,
        vec [N, C, 3] or None) -> (h' [N, hidden], pos' [N, 3], vec' [N, C, 3] or None)``.

    Parameters live in ``message.*`` and ``update.*``; state dicts with the names of before the split (flat
    ``edge_in.*``, ``coord_mlp.*``, ...) are renamed on load (:func:`_rename_pre_split_keys`). Creation order,
    hence seeded initialisation and parameter order (optimizer states), is that of before the split.

    Raises:
        ValueError: ``velocity`` without ``update_pos``, ``vector_channels < 0`` or without ``velocity``
            (construction); ``vel``/``vec`` given or missing against the configuration (forward).
    """

    def __init__(self, hidden: int, edge_dim: int, attention: bool = True, update_pos: bool = True,
                 norm_factor: float = 1.0, coords_range: float = 15.0, velocity: bool = False,
                 vector_channels: int = 0):
        super().__init__()
        if velocity and not update_pos:
            raise ValueError("a velocity-aware layer must update positions")
        if vector_channels < 0 or (vector_channels and not velocity):
            raise ValueError(f"vector_channels must be >= 0 and needs velocity=True, got {vector_channels}")
        self.update_pos, self.velocity, self.vector_channels = update_pos, velocity, vector_channels
        self.message = MessageBlock(hidden, edge_dim, attention, norm_factor, vector_channels)
        self.update = EquivariantUpdate(hidden, edge_dim, norm_factor, coords_range, velocity,
                                        vector_channels) if update_pos else None
        self.register_load_state_dict_pre_hook(_rename_pre_split_keys)

    def forward(self, h: torch.Tensor, pos: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor,
                vel: torch.Tensor | None = None, vec: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if (vel is not None) != (self.velocity and not self.vector_channels) or \
                (vec is not None) != bool(self.vector_channels):
            raise ValueError(f"EGNNLayer(velocity={self.velocity}, vector_channels={self.vector_channels}) got "
                             f"vel={vel is not None}, vec={vec is not None}")
        h, m = self.message(h, edge_index, edge_attr, vec)
        if self.update is not None:
            pos, vec = self.update(h, pos, edge_index, edge_attr, m, vel, vec)
        return h, pos, vec


class EGNN(nn.Module):
    """E(n)-equivariant GNN backbone: ``(h, pos, edge_index) -> (h', pos')``.

    Task-agnostic: time conditioning, type encodings, pooling and heads live in the tasks.

    Args:
        in_dim: input invariant features per node.
        hidden: width of every layer.
        out_dim: output invariant features per node.
        n_layers: number of :class:`EGNNLayer` blocks.
        edge_dim: extra invariant edge features given in ``edge_attr`` (0 for none).
        attention: attention gate on messages (EDM default True).
        invariant: if True no coordinate updates happen (``pos`` is returned unchanged) and the
            output ``h`` is E(n)-invariant; used for property regression.
        norm_factor, coords_range: see :class:`EGNNLayer`.
        velocity: velocity-aware position updates (EGNN eq. 7): ``forward`` then needs ``vel``
            ``[N, 3]`` and every layer adds ``phi_v(h_i) v_i`` to ``x_i``. Off by default (no extra
            parameters, identical behaviour).
        vector_channels: ``C >= 1`` (needs ``velocity``): every node carries ``C`` vector channels, initialised to
            ``[v_i, 0, ..., 0]`` and updated by every layer (see :class:`EGNNLayer`); each layer's edge features also
            get ``s(V_i^c) . s(x_ij)``, ``s(V_j^c) . s(x_ij)`` and ``s(V_i^c) . s(V_j^c)`` per channel, with
            ``s(a) = a / sqrt(|a|^2 + 1)`` (bounded whatever the units). With ``log(1 + |V|^2)`` in the node update
            these complete EGNN's invariants: in eq. 7 a node sees other nodes' velocities only
            through their norms, while the relative motion of a pair (approaching or receding, how fast) is what
            decides a close encounter. Multi-channel vector features in the spirit of GMN (Huang et al. 2022)
            and PaiNN (Schuett et al. 2021). 0 (default): eq. 7 exactly.

    Shapes:
        h ``[N, in_dim]``, pos ``[N, 3]`` (Å), edge_index ``[2, E]`` (row = receiver),
        edge_attr ``[E, edge_dim]`` or None, vel ``[N, 3]`` or None -> h ``[N, out_dim]``, pos ``[N, 3]``.

    Equivariance: for any orthogonal ``Q`` (rotations and reflections), translation ``t`` and node
    permutation ``P``: ``EGNN(P h, P pos Q + t, P-relabelled edges, vel=P vel Q) = (P h', P pos' Q + t)``.

    Raises:
        ValueError: inconsistent settings (``vector_channels`` without ``velocity``, ``velocity`` with
            ``invariant``, ``n_layers``/``hidden``/``in_dim`` < 1) at construction; in ``forward``, inputs of the
            wrong shape, or ``edge_attr``/``vel`` missing or given against the configuration.
    """

    def __init__(self, in_dim: int, hidden: int = 256, out_dim: int | None = None, n_layers: int = 9,
                 edge_dim: int = 0, attention: bool = True, invariant: bool = False,
                 norm_factor: float = 1.0, coords_range: float = 15.0, velocity: bool = False,
                 vector_channels: int = 0):
        super().__init__()
        if vector_channels < 0 or (vector_channels and not velocity):
            raise ValueError(f"vector_channels must be >= 0 and needs velocity=True, got {vector_channels}")
        if velocity and invariant:
            raise ValueError("an invariant EGNN cannot use velocities")
        if n_layers < 1 or hidden < 1 or in_dim < 1:
            raise ValueError("EGNN needs in_dim >= 1, hidden >= 1 and n_layers >= 1")
        self.in_dim, self.hidden, self.edge_dim = in_dim, hidden, edge_dim
        self.out_dim = out_dim if out_dim is not None else hidden
        self.invariant, self.velocity, self.vector_channels = invariant, velocity, vector_channels
        self.embed_in = nn.Linear(in_dim, hidden)
        self.embed_out = nn.Linear(hidden, self.out_dim)
        # edge features: |x_i - x_j|^2 now, |x_i - x_j|^2 at the input, user-given extras, velocity invariants
        self.layers = nn.ModuleList(
            EGNNLayer(hidden, 2 + edge_dim + 3 * vector_channels, attention=attention, update_pos=not invariant,
                      norm_factor=norm_factor, coords_range=coords_range, velocity=velocity,
                      vector_channels=vector_channels)
            for _ in range(n_layers)
        )

    def forward(self, h: torch.Tensor, pos: torch.Tensor, edge_index: torch.Tensor,
                edge_attr: torch.Tensor | None = None, vel: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        check_backbone_inputs("EGNN", self.in_dim, self.edge_dim, self.velocity, h, pos, edge_index, edge_attr, vel)
        row, col = edge_index
        d0 = (pos[row] - pos[col]).pow(2).sum(-1, keepdim=True)
        extra = [edge_attr] if self.edge_dim else []
        vec = None
        if self.vector_channels:  # [N, C, 3]: the velocity in channel 0, zeros elsewhere; it replaces vel
            vec = torch.cat([vel[:, None], vel.new_zeros(vel.shape[0], self.vector_channels - 1, 3)], dim=1)
            vel = None
        h = self.embed_in(h)
        for layer in self.layers:
            if self.invariant:
                feats = [d0, d0, *extra]
            else:
                diff = pos[row] - pos[col]
                feats = [diff.pow(2).sum(-1, keepdim=True), d0, *extra]
                if self.vector_channels:
                    vi, vj, u = _soft_unit(vec[row]), _soft_unit(vec[col]), _soft_unit(diff)[:, None]
                    feats += [(vi * u).sum(-1), (vj * u).sum(-1), (vi * vj).sum(-1)]
            h, pos, vec = layer(h, pos, edge_index, torch.cat(feats, dim=-1), vel, vec)
        return self.embed_out(h), pos
