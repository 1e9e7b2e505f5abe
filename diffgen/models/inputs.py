"""Input checks shared by the backbones (:class:`~diffgen.models.egnn.EGNN`,
:class:`~diffgen.models.e3transformer.E3Transformer`), which take the same call."""
from __future__ import annotations

import torch


def check_backbone_inputs(name: str, in_dim: int, edge_dim: int, velocity: bool, h: torch.Tensor, pos: torch.Tensor,
                          edge_index: torch.Tensor, edge_attr: torch.Tensor | None, vel: torch.Tensor | None) -> None:
    """Check ``h [N, in_dim]``, ``pos [N, 3]``, ``edge_attr [E, edge_dim]`` (given iff ``edge_dim > 0``) and
    ``vel [N, 3]`` (given iff ``velocity``) of backbone ``name``.

    Raises:
        ValueError: a wrong shape, or an input missing or given against the configuration.
    """
    if h.dim() != 2 or h.shape[1] != in_dim:
        raise ValueError(f"h must have shape [N, {in_dim}], got {tuple(h.shape)}")
    if pos.dim() != 2 or pos.shape != (h.shape[0], 3):
        raise ValueError(f"pos must have shape [{h.shape[0]}, 3], got {tuple(pos.shape)}")
    if edge_dim and (edge_attr is None or tuple(edge_attr.shape) != (edge_index.shape[1], edge_dim)):
        got = None if edge_attr is None else tuple(edge_attr.shape)
        raise ValueError(f"edge_attr must have shape [{edge_index.shape[1]}, {edge_dim}], got {got}")
    if not edge_dim and edge_attr is not None:
        raise ValueError(f"edge_attr given but the {name} was built with edge_dim=0: it would be ignored")
    if velocity and (vel is None or vel.shape != pos.shape):
        raise ValueError(f"vel must have shape {tuple(pos.shape)}, got {None if vel is None else tuple(vel.shape)}")
    if not velocity and vel is not None:
        raise ValueError(f"vel given but the {name} was built with velocity=False: it would be ignored")
