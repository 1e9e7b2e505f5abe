"""diffgen: equivariant 3D molecular generative modelling (EDM-style diffusion on QM9)."""

__version__ = "0.1.0"
