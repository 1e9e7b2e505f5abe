"""E(3)-equivariant graph transformer on sparse PyG graphs, built with e3nn.

The second backbone next to :class:`~diffgen.models.egnn.EGNN`, with the same call
``(h, pos, edge_index, edge_attr=None, vel=None) -> (h', pos')``. Where the EGNN passes only invariant messages and
one coordinate update between atoms, every node here carries scalars *and* higher-order features and attends over
its neighbours:

* node features: irreps ``hidden x 0e + l_channels x 1o (+ l_channels x 2e with lmax = 2)``, i.e. ``hidden``
  invariant scalars and ``l_channels`` true vectors (and rank-2 tensors); parity is the natural ``(-1)^l`` of the
  spherical harmonics, so the model is equivariant under O(3) including reflections (E(3) with translations);
* edge geometry: spherical harmonics ``Y(r_ij / |r_ij|)`` (irreps ``0e + 1o (+ 2e)``, e3nn component normalisation,
  ``r_ij = x_i - x_j``) and a smooth radial basis of ``|r_ij|`` (``num_basis`` Gaussians on ``[0, r_max]``,
  :func:`e3nn.math.soft_one_hot_linspace`), extended by the caller's invariant edge features ``a_ij``;
* attention (:class:`E3Attention`): per layer and head, SE(3)-Transformer eqs. 10-11 (Fuchs et al. 2020) in the
  dot-product form of Equiformer (Liao & Smidt 2023, Sec. 3.3 without its MLP attention):

      m_ij = TP(W_s x_j, Y(r_ij); R(|r_ij|, a_ij))          message (value) of sender j to receiver i
      q_i  = W_q x_i                                         query (the key projection W_k is absorbed in it)
      alpha_ij^h = softmax_{j in N(i)} ( <q_i^h, m_ij^h> / sqrt(d_h) + b_h(|r_ij|, a_ij) )   (eqs. 10-11)
      x_i <- x_i + W_o sum_j alpha_ij^h m_ij^h

  with ``<.,.>`` the inner product over all irreps of a head (rotation- and reflection-invariant: the real irreps
  of e3nn are orthogonal, and both sides have the same parity) and ``b_h`` a radial logit bias per head.
  ``TP`` is a channel-wise (``uvu``, NequIP-style) :class:`e3nn.o3.TensorProduct` of the sender's projected
  features ``W_s x_j`` with the edge harmonics, its per-edge path weights (and ``b_h``) given by a radial MLP ``R``
  (:class:`e3nn.nn.FullyConnectedNet`); only paths ending in an irrep of the node features are kept (e.g.
  ``1o x 1o -> 1e`` is dropped), which keeps every feature a true scalar, vector or tensor;
* feed-forward: ``x <- x + W_2 Gate(W_1 LN(x))`` with :class:`e3nn.nn.Gate` (SiLU on scalars, sigmoid gates on the
  l >= 1 irreps); pre-norm residual blocks with :class:`EquivariantLayerNorm` (Equiformer's equivariant layer norm);
* readout: ``out_dim x 0e`` invariant outputs (``readout``) and, unless ``invariant``, one ``1o`` vector ``d_i``
  (``readout_vec``) added to the positions: ``pos'_i = pos_i + d_i`` (the positions themselves are read only through ``r_ij``, so ``pos'`` moves
  with translations while ``d_i`` does not).

With ``velocity`` a ``1o`` velocity ``v_i`` ``[N, 3]`` enters as one input vector channel next to ``h``.

Molecules are never padded: every quantity lives on nodes ``[N, .]`` or edges ``[E, .]``. e3nn's l = 1 basis is
Cartesian ``(x, y, z)`` (since e3nn 0.2.2), so vectors go in and out without a change of basis.
"""
from __future__ import annotations

import torch
from e3nn import o3
from e3nn.math import soft_one_hot_linspace
from e3nn.nn import FullyConnectedNet, Gate
from torch import nn
from torch_geometric.utils import scatter, softmax

from diffgen.models.inputs import check_backbone_inputs

MAX_LMAX = 2


def hidden_irreps(hidden: int, l_channels: int, lmax: int) -> o3.Irreps:
    """Node-feature irreps ``hidden x 0e + l_channels x 1o (+ l_channels x 2e)``: parity ``(-1)^l`` for each ``l``.

    Raises:
        ValueError: ``hidden < 1``, ``l_channels < 1`` or ``lmax`` outside 1..2.
    """
    if hidden < 1 or l_channels < 1 or not 1 <= lmax <= MAX_LMAX:
        raise ValueError(f"need hidden >= 1, l_channels >= 1 and 1 <= lmax <= {MAX_LMAX}, "
                         f"got {hidden}, {l_channels}, {lmax}")
    return o3.Irreps([(hidden, (0, 1))] + [(l_channels, (l, (-1) ** l)) for l in range(1, lmax + 1)])


class EquivariantLayerNorm(nn.Module):
    """Per-node layer norm of equivariant features (Equiformer, Liao & Smidt 2023, Sec. 3.2).

    For each irrep block ``f`` ``[N, mul, 2l + 1]`` of ``irreps``: scalars (``0e``) are centred over their channels;
    then every block is divided by its root-mean-square over channels and components,
    ``f / sqrt(mean_{c, m} f_cm^2 + eps)``, and scaled per channel by a learned weight (scalars also get a bias).
    The RMS of an l >= 1 block is invariant under rotations and reflections, so the norm is O(3)-equivariant;
    no bias is added to l >= 1 (or odd-parity) features, which would break it.

    Shapes: ``forward(x [N, irreps.dim]) -> [N, irreps.dim]``.
    """

    def __init__(self, irreps: o3.Irreps | str, eps: float = 1e-5):
        super().__init__()
        self.irreps, self.eps = o3.Irreps(irreps), eps
        self.weight = nn.Parameter(torch.ones(self.irreps.num_irreps))
        n_bias = sum(mul for mul, ir in self.irreps if ir == o3.Irrep("0e"))
        self.bias = nn.Parameter(torch.zeros(n_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, w0, b0 = [], 0, 0
        for (mul, ir), s in zip(self.irreps, self.irreps.slices()):
            f = x[:, s].reshape(-1, mul, ir.dim)
            scalar = ir == o3.Irrep("0e")
            if scalar:
                f = f - f.mean(dim=1, keepdim=True)
            f = f * torch.rsqrt(f.pow(2).mean(dim=(1, 2), keepdim=True) + self.eps)
            f = f * self.weight[w0:w0 + mul, None]
            w0 += mul
            if scalar:
                f = f + self.bias[b0:b0 + mul, None]
                b0 += mul
            out.append(f.reshape(-1, mul * ir.dim))
        return torch.cat(out, dim=-1)


def _source_irreps(irreps_node: o3.Irreps) -> o3.Irreps:
    """Irreps of the senders' features entering the edge tensor product: the node irreps plus a second block of
    scalars, one per l >= 1 channel, that alone feeds the (costly) ``0e x Y_l -> l`` paths."""
    extra = next(mul for mul, ir in irreps_node if ir.l > 0)
    return o3.Irreps([irreps_node[0], (extra, (0, 1)), *irreps_node[1:]])


def _uvu_instructions(irreps_src: o3.Irreps, irreps_sh: o3.Irreps, allowed: set) -> tuple[o3.Irreps, list[tuple]]:
    """Channel-wise (``uvu``) paths ``src (x) sh -> mid`` ending in an irrep of ``allowed`` (parity kept): the first
    scalar block of ``irreps_src`` takes the ``0e`` harmonic only, the second one the l >= 1 harmonics only."""
    mid, instructions = [], []
    for i, (mul, ir_in) in enumerate(irreps_src):
        for j, (_, ir_sh) in enumerate(irreps_sh):
            if (i == 0 and ir_sh.l > 0) or (i == 1 and ir_sh.l == 0):
                continue
            for ir_out in ir_in * ir_sh:
                if ir_out in allowed:
                    instructions.append((i, j, len(mid), "uvu", True))
                    mid.append((mul, ir_out))
    return o3.Irreps(mid), instructions


class E3Attention(nn.Module):
    """Equivariant multi-head dot-product graph attention (equations in the module docstring).

    Keys and values share one tensor product ``m_ij = TP(W_s x_j, Y(r_ij); R(|r_ij|, a_ij))``: the value is
    ``m_ij``, the key ``W_k m_ij`` with ``W_k`` absorbed into the query (``<q_i, W_k m_ij> = <W_k^T q_i, m_ij>`` for an
    equivariant linear ``W_k``, so ``q_i = W_q x_i`` maps straight into the irreps of ``m_ij``), and the radial MLP
    adds one invariant logit per head, ``b_h(|r_ij|, a_ij)``:

        alpha_ij^h = softmax_j( <q_i^h, m_ij^h> / sqrt(d_h) + b_h(|r_ij|, a_ij) )
        x_i       <- x_i + W_o sum_j alpha_ij^h m_ij^h

    This halves the per-edge tensor-product work of separate key and value products (SE(3)-Transformer eq. 10 uses
    separate radial kernels ``W_K``, ``W_V``); the sender projection ``W_s`` (``E3Transformer`` self-interaction)
    feeds the ``0e x Y_l`` paths from their own ``l_channels`` scalars instead of all ``hidden`` ones.

    Args:
        irreps_node: node-feature irreps (:func:`hidden_irreps`; every multiplicity a multiple of ``heads``).
        irreps_sh: edge spherical-harmonic irreps.
        heads: attention heads; head ``h`` owns the ``h``-th block of channels of every irrep of ``m_ij``.
        radial_in: width of the invariant edge input of the radial MLP (radial basis + extra edge features).
        radial_hidden: width of the radial MLP's two hidden layers.

    Shapes:
        ``forward(x [N, irreps_node.dim], sh [E, irreps_sh.dim], radial [E, radial_in], edge_index [2, E]
        (row = receiver i, col = sender j)) -> [N, irreps_node.dim]`` (the update, to be added to ``x``).
        Nodes without neighbours get 0.

    Raises:
        ValueError: a multiplicity of ``irreps_node`` is not a multiple of ``heads``.
    """

    def __init__(self, irreps_node: o3.Irreps, irreps_sh: o3.Irreps, heads: int, radial_in: int,
                 radial_hidden: int = 64):
        super().__init__()
        if heads < 1 or any(mul % heads for mul, _ in irreps_node):
            raise ValueError(f"every multiplicity of {irreps_node} must be a multiple of heads={heads}")
        irreps_src = _source_irreps(irreps_node)
        self.irreps_mid, instructions = _uvu_instructions(irreps_src, irreps_sh, {ir for _, ir in irreps_node})
        self.source = o3.Linear(irreps_node, irreps_src)
        self.tp = o3.TensorProduct(irreps_src, irreps_sh, self.irreps_mid, instructions, shared_weights=False,
                                   internal_weights=False)
        self.radial = FullyConnectedNet([radial_in, radial_hidden, radial_hidden, self.tp.weight_numel + heads],
                                        act=nn.functional.silu)
        self.query = o3.Linear(irreps_node, self.irreps_mid)
        self.out = o3.Linear(self.irreps_mid, irreps_node)
        # head of each component of m_ij: every multiplicity split into ``heads`` contiguous channel blocks
        head = torch.cat([torch.arange(mul).div(mul // heads, rounding_mode="floor").repeat_interleave(ir.dim)
                          for mul, ir in self.irreps_mid])
        self.register_buffer("head_of", nn.functional.one_hot(head, heads).float(), persistent=False)  # [D, H]
        self.heads, self.scale = heads, (self.irreps_mid.dim / heads) ** -0.5

    def forward(self, x: torch.Tensor, sh: torch.Tensor, radial: torch.Tensor,
                edge_index: torch.Tensor) -> torch.Tensor:
        row, col = edge_index
        weights = self.radial(radial)
        n_tp = self.tp.weight_numel
        message = self.tp(self.source(x)[col], sh, weights[:, :n_tp])  # [E, D]
        logits = ((self.query(x)[row] * message) @ self.head_of) * self.scale + weights[:, n_tp:]  # [E, H]
        alpha = softmax(logits, row, num_nodes=x.shape[0])  # over the neighbours j of each i
        message = message * (alpha @ self.head_of.T)  # [E, D]
        return self.out(scatter(message, row, dim=0, dim_size=x.shape[0], reduce="sum"))


class GatedFeedForward(nn.Module):
    """``W_2 Gate(W_1 x)``: :class:`e3nn.nn.Gate` with SiLU on the ``0e`` channels and one sigmoid gate (a ``0e``
    channel of ``W_1 x``) per l >= 1 channel (Weiler et al. 2018 gated nonlinearity). Equivariant.

    Shapes: ``forward(x [N, irreps.dim]) -> [N, irreps.dim]``.
    """

    def __init__(self, irreps: o3.Irreps):
        super().__init__()
        scalars = o3.Irreps([(mul, ir) for mul, ir in irreps if ir.l == 0])
        gated = o3.Irreps([(mul, ir) for mul, ir in irreps if ir.l > 0])
        self.gate = Gate(scalars, [nn.functional.silu], f"{gated.num_irreps}x0e", [torch.sigmoid], gated)
        self.lin_in = o3.Linear(irreps, self.gate.irreps_in, biases=True)
        self.lin_out = o3.Linear(self.gate.irreps_out, irreps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin_out(self.gate(self.lin_in(x)))


class E3TransformerLayer(nn.Module):
    """One pre-norm block: ``x <- x + Attn(LN(x)); x <- x + FFN(LN(x))``
    (:class:`E3Attention`, :class:`GatedFeedForward`, :class:`EquivariantLayerNorm`).

    Shapes: ``forward(x [N, irreps.dim], sh [E, sh_dim], radial [E, radial_in], edge_index [2, E]) -> [N, irreps.dim]``.
    """

    def __init__(self, irreps: o3.Irreps, irreps_sh: o3.Irreps, heads: int, radial_in: int, radial_hidden: int = 64):
        super().__init__()
        self.norm_attn = EquivariantLayerNorm(irreps)
        self.attn = E3Attention(irreps, irreps_sh, heads, radial_in, radial_hidden)
        self.norm_ffn = EquivariantLayerNorm(irreps)
        self.ffn = GatedFeedForward(irreps)

    def forward(self, x: torch.Tensor, sh: torch.Tensor, radial: torch.Tensor,
                edge_index: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x), sh, radial, edge_index)
        return x + self.ffn(self.norm_ffn(x))


class E3Transformer(nn.Module):
    """E(3)-equivariant graph transformer backbone: ``(h, pos, edge_index) -> (h', pos')``, a drop-in for
    :class:`~diffgen.models.egnn.EGNN` (equations in the module docstring).

    Args:
        in_dim: invariant input features per node (irreps ``in_dim x 0e``).
        hidden: scalar (``0e``) channels of the node features.
        out_dim: invariant outputs per node (default ``hidden``).
        n_layers: number of :class:`E3TransformerLayer` blocks.
        edge_dim: extra invariant edge features ``a_ij`` given in ``edge_attr`` (inputs of the radial MLPs).
        invariant: only invariant outputs; ``pos`` is returned unchanged (property regression).
        velocity: ``forward`` needs ``vel`` ``[N, 3]``, a ``1o`` input channel.
        lmax: highest order of the node features and edge harmonics (1: scalars + vectors; 2: also ``2e``).
        l_channels: channels of each l >= 1 irrep.
        heads: attention heads (``hidden`` and ``l_channels`` must be multiples of it).
        num_basis: Gaussian radial basis functions on ``[0, r_max]``.
        r_max: end of the radial basis in the length unit of ``pos`` (Å for molecules); longer edges still take part
            (the Gaussians have tails; there is no cutoff).
        radial_hidden: width of the radial MLPs.

    Shapes and units:
        h ``[N, in_dim]``, pos ``[N, 3]`` (Å), edge_index ``[2, E]`` (row = receiver), edge_attr ``[E, edge_dim]`` or
        None, vel ``[N, 3]`` or None -> h' ``[N, out_dim]``, pos' ``[N, 3]`` = ``pos + d`` with ``d`` the ``1o``
        output (``pos`` itself if ``invariant``).

    Equivariance: for orthogonal ``Q`` (rotations and reflections), translation ``t`` and node permutation ``P``:
    ``E3Transformer(P h, P pos Q^T + t, P-relabelled edges, vel=P vel Q^T) = (P h', P pos' Q^T + t)``.

    State dicts hold the learned parameters only; e3nn's constant buffers are rebuilt at construction.

    Raises:
        ValueError: ``in_dim``/``hidden``/``n_layers``/``l_channels``/``num_basis`` < 1, ``lmax`` outside 1..2,
            ``hidden`` or ``l_channels`` not a multiple of ``heads``, ``r_max <= 0``, ``velocity`` with ``invariant``
            (construction); inputs of the wrong shape, ``edge_attr``/``vel`` missing or given against the
            configuration (forward).
    """

    def __init__(self, in_dim: int, hidden: int = 128, out_dim: int | None = None, n_layers: int = 4,
                 edge_dim: int = 0, invariant: bool = False, velocity: bool = False, lmax: int = 1,
                 l_channels: int = 32, heads: int = 4, num_basis: int = 16, r_max: float = 15.0,
                 radial_hidden: int = 64):
        super().__init__()
        if in_dim < 1 or n_layers < 1 or num_basis < 1 or radial_hidden < 1 or edge_dim < 0:
            raise ValueError("E3Transformer needs in_dim, n_layers, num_basis, radial_hidden >= 1 and edge_dim >= 0")
        if not r_max > 0:
            raise ValueError(f"r_max must be positive, got {r_max}")
        if velocity and invariant:
            raise ValueError("an invariant E3Transformer cannot use velocities")
        self.irreps_hidden = hidden_irreps(hidden, l_channels, lmax)
        if heads < 1 or hidden % heads or l_channels % heads:
            raise ValueError(f"hidden={hidden} and l_channels={l_channels} must be multiples of heads={heads}")
        self.in_dim, self.hidden, self.edge_dim = in_dim, hidden, edge_dim
        self.out_dim = out_dim if out_dim is not None else hidden
        self.invariant, self.velocity = invariant, velocity
        self.num_basis, self.r_max = num_basis, float(r_max)
        self.irreps_sh = o3.Irreps.spherical_harmonics(lmax)  # 0e + 1o (+ 2e)
        self.sh = o3.SphericalHarmonics(self.irreps_sh, normalize=False, normalization="component")
        irreps_in = o3.Irreps(f"{in_dim}x0e") + (o3.Irreps("1x1o") if velocity else o3.Irreps(""))
        self.embed = o3.Linear(irreps_in, self.irreps_hidden, biases=True)
        self.layers = nn.ModuleList(E3TransformerLayer(self.irreps_hidden, self.irreps_sh, heads,
                                                       num_basis + edge_dim, radial_hidden)
                                    for _ in range(n_layers))
        self.norm_out = EquivariantLayerNorm(self.irreps_hidden)
        self.readout = o3.Linear(self.irreps_hidden, o3.Irreps(f"{self.out_dim}x0e"), biases=True)
        self.readout_vec = None if invariant else o3.Linear(self.irreps_hidden, o3.Irreps("1x1o"))
        # e3nn keeps constants in buffers (Clebsch-Gordan coefficients, output masks, empty placeholders): rebuilt
        # from the architecture, they stay out of state dicts (an fp16 export would round the coefficients)
        for module in self.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                module.register_buffer(name, buffer, persistent=False)

    def edge_geometry(self, pos: torch.Tensor, edge_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Y(r_ij / |r_ij|) [E, sh_dim], Gaussian basis of |r_ij| [E, num_basis])``, ``r_ij = x_i - x_j``.

        Coincident nodes get ``Y = (1, 0, ...)`` and distance 0, with finite gradients.
        """
        row, col = edge_index
        diff = pos[row] - pos[col]
        d2 = diff.pow(2).sum(-1, keepdim=True)
        # sqrt has an infinite derivative at 0: evaluate it at 1 for coincident nodes (whose diff is 0 anyway)
        apart = d2 > 0
        dist = torch.where(apart, d2, torch.ones_like(d2)).sqrt()
        sh = self.sh(diff / dist)
        r = torch.where(apart, dist, torch.zeros_like(dist)).squeeze(-1)
        basis = soft_one_hot_linspace(r, 0.0, self.r_max, self.num_basis, basis="gaussian", cutoff=False)
        return sh, basis * self.num_basis ** 0.5

    def forward(self, h: torch.Tensor, pos: torch.Tensor, edge_index: torch.Tensor,
                edge_attr: torch.Tensor | None = None, vel: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        check_backbone_inputs("E3Transformer", self.in_dim, self.edge_dim, self.velocity, h, pos, edge_index, edge_attr, vel)
        sh, radial = self.edge_geometry(pos, edge_index)
        if self.edge_dim:
            radial = torch.cat([radial, edge_attr.to(radial.dtype)], dim=-1)
        x = self.embed(torch.cat([h, vel], dim=-1) if self.velocity else h)
        for layer in self.layers:
            x = layer(x, sh, radial, edge_index)
        x = self.norm_out(x)
        if self.invariant:
            return self.readout(x), pos
        return self.readout(x), pos + self.readout_vec(x)
