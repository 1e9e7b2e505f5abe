"""Molecular property regressor: invariant backbone + sum pooling + MLP head + target normalisation.

Architecture (EGNN QM9 model, Satorras et al. 2021, Sec. 5.3): node features ``one-hot(type) x (Z/9)^k``
(k = 0..charge_power), an invariant backbone on the molecular graph - :class:`~diffgen.models.egnn.EGNN` with
``invariant=True`` (no coordinate updates; edge features are squared interatomic distances in Å^2), or
:class:`~diffgen.models.e3transformer.E3Transformer` with ``invariant=True`` (vector features inside, ``0e`` outputs
only) - a node MLP, sum pooling over atoms and a graph MLP giving one output per target.

The network predicts normalised values ``(v - mean) / MAD`` of the *regression values* ``v``: the property in
reported units minus the sum of the atom references of the molecule's atoms (zero for most targets). The module holds
everything inference needs, so it works without Lightning:

* ``mean``, ``mad`` ``[T]`` float64 buffers (stored in checkpoints; training-split statistics);
* ``atomref`` ``[Z_max + 1, T]`` float64 buffer, row = atomic number, in reported units (not stored: the builder
  derives it from the target names);
* these three stay float64 whatever ``.half()``/``.double()``/``.to(dtype)`` does to the weights;
* :meth:`forward` -> normalised outputs (what the training loss sees), :meth:`denormalise` -> regression values,
  :meth:`predict` -> total properties in reported units.

Invariant to rotations, reflections, translations and permutations of the atoms of each molecule.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch_geometric.utils import scatter

from diffgen.data.elements import NUM_TYPES, z_to_index
from diffgen.data.graphs import build_edges
from diffgen.models.egnn import EGNN

MAX_Z = 9.0  # charge scale of the node features (fluorine)
_FLOAT64_BUFFERS = ("mean", "mad", "atomref")


class PropertyRegressor(nn.Module):
    """Invariant backbone (EGNN or E(3) transformer) + sum pooling + MLP head with target normalisation and atom
    references.

    Args:
        targets: target names ``[T]`` (labels only, e.g. ``["gap"]``).
        mean, mad: ``[T]`` training mean and mean absolute deviation of the regression values (reported units);
            None -> 0 and 1 (e.g. before the weights and statistics are loaded from a checkpoint).
        atomref: ``[Z_max + 1, T]`` atom reference per atomic number (reported units) added back by :meth:`predict`;
            None -> zeros for Z <= 9.
        units: reported unit of each target (labels only); None -> empty strings.
        hidden, n_layers, attention, norm_factor: backbone width/depth, EGNN attention/aggregation scale.
        backbone: ``"egnn"`` (module ``self.egnn``) or ``"e3transformer"`` (module ``self.transformer``).
        transformer: further :class:`~diffgen.models.e3transformer.E3Transformer` arguments (``lmax``, ``heads``, ...).
        charge_power: node features ``one-hot [N, 5] x (Z/9)^k`` for k = 0..charge_power -> ``[N, 5 (p+1)]``.
        graph, cutoff, k: edge construction (:func:`diffgen.data.graphs.build_edges`).

    Raises:
        ValueError: ``mean``, ``mad`` or ``atomref`` do not have one entry (column) per target, ``mad <= 0``, or an
            unknown ``backbone``.
    """

    def __init__(self, targets: Sequence[str], mean: Sequence[float] | None = None,
                 mad: Sequence[float] | None = None, atomref: torch.Tensor | None = None,
                 units: Sequence[str] | None = None, hidden: int = 128, n_layers: int = 7, attention: bool = True,
                 norm_factor: float = 1.0, charge_power: int = 2, graph: str = "full",
                 cutoff: float | None = None, k: int | None = None, backbone: str = "egnn",
                 transformer: dict | None = None):
        super().__init__()
        self.targets = list(targets)
        self.units = list(units) if units is not None else [""] * len(self.targets)
        n = len(self.targets)
        mean = torch.zeros(n, dtype=torch.float64) if mean is None else torch.as_tensor(mean, dtype=torch.float64)
        mad = torch.ones(n, dtype=torch.float64) if mad is None else torch.as_tensor(mad, dtype=torch.float64)
        atomref = torch.zeros(10, n, dtype=torch.float64) if atomref is None else atomref.to(torch.float64)
        if mean.shape != (n,) or mad.shape != (n,) or len(self.units) != n:
            raise ValueError("mean, mad and units must hold one entry per target")
        if atomref.dim() != 2 or atomref.shape[1] != n:
            raise ValueError("atomref must be [Z_max + 1, n_targets]")
        if not bool((mad > 0).all()):
            raise ValueError("mad must be positive")
        self.charge_power, self.graph, self.cutoff, self.k = charge_power, graph, cutoff, k
        in_dim = NUM_TYPES * (charge_power + 1)
        if backbone == "egnn":  # attribute names are the state-dict prefixes of stored weights
            self.egnn = EGNN(in_dim=in_dim, hidden=hidden, out_dim=hidden, n_layers=n_layers, attention=attention,
                             invariant=True, norm_factor=norm_factor)
        elif backbone == "e3transformer":
            from diffgen.models.e3transformer import E3Transformer  # lazy: e3nn costs ~1.5 s of import
            self.transformer = E3Transformer(in_dim=in_dim, hidden=hidden, out_dim=hidden, n_layers=n_layers,
                                             invariant=True, **(transformer or {}))
        else:
            raise ValueError(f"unknown backbone {backbone!r}: choose egnn or e3transformer")
        self.backbone_kind = backbone
        self.node_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.graph_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, n))
        self.register_buffer("mean", mean)
        self.register_buffer("mad", mad)
        self.register_buffer("atomref", atomref, persistent=False)

    @property
    def backbone(self) -> nn.Module:
        """The invariant backbone: ``self.egnn`` or ``self.transformer``."""
        return self.egnn if self.backbone_kind == "egnn" else self.transformer

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.half()`` ... move the statistics and atom references but keep them float64."""
        keep = {name: self._buffers[name] for name in _FLOAT64_BUFFERS}
        super()._apply(fn, recurse)
        for name, value in keep.items():
            self._buffers[name] = value.to(self._buffers[name].device)
        return self

    def features(self, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[N, 5 (charge_power + 1)]`` node features in ``dtype``."""
        onehot = nn.functional.one_hot(z_to_index(z).to(z.device), NUM_TYPES).to(dtype)
        charge = (z.to(dtype) / MAX_Z).unsqueeze(-1)
        powers = torch.arange(self.charge_power + 1, device=z.device, dtype=dtype)
        return (onehot.unsqueeze(-1) * charge.unsqueeze(-1).pow(powers)).flatten(1)

    def forward(self, z: torch.Tensor, pos: torch.Tensor, batch: torch.Tensor, num_graphs: int | None = None,
                ) -> torch.Tensor:
        """Normalised predictions ``(v - mean) / MAD``.

        Args:
            z: ``[N]`` atomic numbers (H, C, N, O, F); pos: ``[N, 3]`` Å; batch: ``[N]`` molecule of each atom.
            num_graphs: number of molecules B (default ``batch.max() + 1``).

        Returns:
            ``[B, T]`` in the dtype of ``pos``.
        """
        num_graphs = int(batch.max()) + 1 if num_graphs is None else num_graphs
        edge_index = build_edges(pos, batch, self.graph, cutoff=self.cutoff, k=self.k)
        h, _ = self.backbone(self.features(z, pos.dtype), pos, edge_index)
        pooled = scatter(self.node_mlp(h), batch, dim=0, dim_size=num_graphs, reduce="sum")
        return self.graph_mlp(pooled)

    def denormalise(self, out: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, T]`` -> regression values (reported units, atom references subtracted), float64."""
        return out.double() * self.mad + self.mean

    def atomref_sum(self, z: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        """Sum of the atom references of each molecule's atoms: ``[num_graphs, T]`` float64 (reported units)."""
        return scatter(self.atomref[z], batch, dim=0, dim_size=num_graphs, reduce="sum")

    def predict(self, z: torch.Tensor, pos: torch.Tensor, batch: torch.Tensor, num_graphs: int | None = None,
                ) -> torch.Tensor:
        """Total properties in reported units (atom references added back): ``[B, T]`` float64.

        Inputs as :meth:`forward`; ``pos`` is cast to the dtype of the weights.
        """
        num_graphs = int(batch.max()) + 1 if num_graphs is None else num_graphs
        dtype = self.graph_mlp[-1].weight.dtype
        values = self.denormalise(self(z, pos.to(dtype), batch, num_graphs))
        return values + self.atomref_sum(z, batch, num_graphs)
