"""diffgen: equivariant 3D molecular generative modelling (EDM-style diffusion on QM9).

The Python API (:mod:`diffgen.api`) is exported here and imported on first use, so ``import diffgen`` stays fast::

    import diffgen

    mols = diffgen.load_pretrained("qm9").sample(10, seed=0)   # RDKit molecules with 3D conformers
    diffgen.evaluate(mols)                                     # EDM metrics
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_pretrained", "evaluate", "DiffgenError"]

_API = {"load_pretrained": "diffgen.api", "evaluate": "diffgen.api", "DiffgenError": "diffgen.errors"}


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffgen' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
