"""The Python API: pretrained models by name, RDKit molecules out, EDM metrics of RDKit molecules.

::

    import diffgen

    gen = diffgen.load_pretrained("qm9")              # the shipped EDM generator
    mols = gen.sample(10, n_atoms=12, seed=0)         # RDKit Mols with 3D conformers and SD properties
    diffgen.evaluate(mols)                            # {"atom_stability": ..., "validity": ..., ...}
    diffgen.load_pretrained("qm9-gap").predict(mols)  # {"gap": array in meV}

The molecules are the records ``diffgen sample`` writes to its SDF file (:func:`diffgen.io.sdf_record`: EDM
distance-inferred bonds, the tags of :func:`diffgen.eval.chem.sd_tags`), sanitized when RDKit can sanitize them
(then usable with any RDKit function; sanitization may add implicit hydrogens, counted by the ``rdkit_implicit_hs``
property) and left unsanitized otherwise (``rdkit_valid`` is 0). Sampling and scoring are the CLI's own code
(:func:`diffgen.tasks.generation.build.generate_molecules`, :class:`diffgen.eval.chem.GenerationMetrics`).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from diffgen.checkpoint_files import PRETRAINED_DIR
from diffgen.devices import DEFAULT_PRECISION
from diffgen.diffusion import DEFAULT_SAMPLER, DEFAULT_STEPS
from diffgen.errors import DiffgenError

__all__ = ["PRETRAINED", "load_pretrained", "evaluate", "PretrainedGenerator", "PretrainedRegressor"]

#: Names accepted by :func:`load_pretrained`: ``name -> (kind, file in diffgen/pretrained)``.
PRETRAINED: dict[str, tuple[str, str]] = {
    "qm9": ("generator", "qm9_egnn.safetensors"),
    "qm9-gap": ("regressor", "qm9_regress_gap.safetensors"),
}

_GENERATOR_FORMAT = "diffgen-generator-v1"
_REGRESSOR_FORMATS = ("diffgen-regressor-v1", "diffgen-regressor-v2")


def _as_molecules(mols: Iterable) -> list[tuple[np.ndarray, np.ndarray]]:
    """RDKit molecules (first conformer, hydrogens as atoms) or ``(z, pos)`` pairs -> ``(z, pos)`` numpy pairs.

    Raises:
        DiffgenError: a molecule without a 3D conformer, or neither a Mol nor a pair.
    """
    from rdkit import Chem

    out = []
    for k, mol in enumerate(mols, start=1):
        if isinstance(mol, Chem.Mol):
            if mol.GetNumConformers() == 0:
                raise DiffgenError(f"molecule {k} has no conformer (3D coordinates are needed)")
            z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
            pos = np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64).reshape(-1, 3)
            if not mol.HasProp("rdkit_implicit_hs") and not (z == 1).any() and \
                    sum(a.GetTotalNumHs() for a in mol.GetAtoms()):
                raise DiffgenError(f"molecule {k} has implicit hydrogens only: add them with Chem.AddHs(mol, "
                                   "addCoords=True) (the models see every atom)")
            out.append((z, pos))
        else:
            try:
                z, pos = mol
            except (TypeError, ValueError):
                raise DiffgenError(f"molecule {k} is neither an RDKit Mol nor a (z, pos) pair") from None
            out.append((np.asarray(z), np.asarray(pos)))
    return out


def evaluate(mols: Iterable, novelty: bool | None = None) -> dict:
    """EDM metrics of molecules (Hoogeboom et al. 2022; :class:`diffgen.eval.chem.GenerationMetrics`).

    Args:
        mols: RDKit molecules with a 3D conformer and explicit hydrogens (e.g. from
            :meth:`PretrainedGenerator.sample`), or ``(z [n], pos [n, 3] Å)`` pairs.
        novelty: against the QM9 training SMILES: True builds the reference if needed (about a minute, once),
            None uses it only if cached, False skips it.

    Returns:
        dict with ``atom_stability``, ``mol_stability``, ``validity``, ``uniqueness``, ``valid_unique`` (fractions
        in [0, 1]), ``novelty`` (fraction, or None), ``n_molecules``, ``n_atoms``.

    Raises:
        DiffgenError: a molecule without 3D coordinates or hydrogens, elements outside H, C, N, O, F.
    """
    from diffgen.eval.chem import GenerationMetrics

    molecules = _as_molecules(mols)
    reference = None
    if novelty is not False:
        from diffgen.eval.reference import training_smiles

        reference = training_smiles(build=bool(novelty))
    metrics = GenerationMetrics(reference_smiles=reference)
    metrics.update(molecules)
    return metrics.compute()


class PretrainedGenerator:
    """A loaded generator (:func:`load_pretrained`). Attributes: ``generator`` (the task's
    :class:`~diffgen.tasks.generation.checkpoints.Generator`), ``source`` (weights file), ``device``."""

    def __init__(self, generator, device: str):
        self.generator = generator
        self.source: Path = generator.source
        self.device = device

    def __repr__(self) -> str:
        return f"PretrainedGenerator({str(self.source)!r}, device={self.device!r})"

    def sample(self, n: int, n_atoms: int | Sequence[int] | None = None, seed: int = 0,
               sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS, batch_size: int = 100,
               keep: str = "all", max_attempts: int | None = None, return_arrays: bool = False,
               precision: str = DEFAULT_PRECISION, eta: float | None = None):
        """Generate ``n`` molecules (the same ones as ``diffgen sample`` with the same settings).

        Args:
            n: number of molecules (>= 1).
            n_atoms: None (atom counts drawn from the training distribution), an int, or a sequence of ints taken
                in turn (molecule ``i`` gets ``n_atoms[i % len(n_atoms)]``); each in 1..29 for QM9.
            seed: the same seed gives the same molecules, whatever ``batch_size``.
            sampler: ``"dpm2m-sde"`` (default), ``"dpm2m"`` or ``"ancestral"`` (EDM's, with ``steps=1000``).
            steps: network evaluations per molecule.
            batch_size: molecules per network call (memory / speed only).
            keep: ``"all"``, ``"valid"`` or ``"stable"``: sample until ``n`` molecules pass (at most
                ``max_attempts``, default ``10 * n``; fewer are returned, with a warning, if the cap is hit).
            return_arrays: also return the raw ``(z [n_i] int64, pos [n_i, 3] float32 Å)`` numpy pairs.
            precision: ``"auto"`` (default: bf16 autocast where the device computes bf16 natively, else fp32),
                ``"fp32"`` or ``"bf16"``; bf16 is 1.1-1.8x faster on CPUs with AVX512-BF16 and moves atoms by
                hundredths of an Å (``benchmarks/results/generation.md``, "Sampling precision").
            eta: noise scale of ``"dpm2m-sde"`` (None: its default in :data:`diffgen.diffusion.DEFAULT_ETAS`, 3;
                1 is SDE-DPM-Solver++(2M) as published, 0 its ODE); an error with the other samplers.

        Returns:
            list of RDKit ``Mol`` (3D conformer in Å, EDM bonds, properties as the SDF tags plus
            ``diffgen_index``), or ``(mols, arrays)`` with ``return_arrays``.

        Raises:
            DiffgenError: bad ``n_atoms``, ``keep``, ``sampler``, ``precision`` or ``eta``; ``n``, ``steps`` or
                ``batch_size`` < 1.
        """
        from diffgen.tasks.generation.build import generate_molecules

        for name, value in (("n", n), ("steps", steps), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise DiffgenError(f"{name} must be a positive integer, got {value!r}")
        g = self.generator
        run = generate_molecules(g.diffusion, g.node_dist, int(n), keep=keep, max_attempts=max_attempts,
                                 steps=int(steps), batch_size=int(batch_size), seed=seed, sampler=sampler,
                                 n_atoms=n_atoms, precision=precision, eta=eta)
        if len(run.molecules) < n:
            warnings.warn(f"keep={keep!r}: only {len(run.molecules)} of {n} molecules passed in {run.attempts} "
                          "attempts (raise max_attempts for more)", stacklevel=2)
        arrays = [(z.numpy(), pos.numpy()) for z, pos in run.molecules]
        mols = [_rdkit_molecule(z, pos, k, report, index)
                for k, ((z, pos), report, index) in enumerate(zip(arrays, run.reports, run.indices), start=1)]
        return (mols, arrays) if return_arrays else mols


def _rdkit_molecule(z, pos, k: int, report: dict, index: int):
    """The SDF record ``mol_<k>`` (:func:`diffgen.io.sdf_record`), sanitized if it can be."""
    from rdkit import Chem

    from diffgen.eval.chem import sanitized, sd_tags
    from diffgen.io import sdf_record

    record = sdf_record(z, pos, f"mol_{k}", {**sd_tags(report), "diffgen_index": index})
    mol = sanitized(record)
    if mol is None:
        return Chem.Mol(record)
    return mol


class PretrainedRegressor:
    """A loaded property regressor (:func:`load_pretrained`). Attributes: ``model`` (the
    :class:`~diffgen.models.regressor.PropertyRegressor`), ``targets``, ``units`` (``{target: unit}``),
    ``source``, ``device``."""

    def __init__(self, model, source: Path, device: str):
        self.model = model
        self.source = source
        self.device = device
        self.targets = list(model.targets)
        self.units = dict(zip(model.targets, model.units))

    def __repr__(self) -> str:
        return f"PretrainedRegressor({str(self.source)!r}, targets={self.targets}, device={self.device!r})"

    def predict(self, mols: Iterable, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Predicted properties (:func:`diffgen.tasks.regression.predict.predict`).

        Args:
            mols: RDKit molecules with a 3D conformer and explicit hydrogens, or ``(z, pos)`` pairs.

        Returns:
            ``{target: float64 array [len(mols)]}`` in the units of :attr:`units` (e.g. ``gap`` in meV).

        Raises:
            DiffgenError: a molecule without 3D coordinates or hydrogens, elements outside H, C, N, O, F.
        """
        from diffgen.tasks.regression.predict import predict

        molecules = _as_molecules(mols)
        values = predict(self.model, molecules, batch_size=batch_size)
        return {t: values[:, j].copy() for j, t in enumerate(self.targets)}


def _kind_of(path: Path) -> str:
    """``"generator"`` or ``"regressor"`` from a checkpoint's contents (safetensors metadata, Lightning
    hyperparameters), read without unpickling.

    Raises:
        DiffgenError: unreadable file, or a checkpoint of another kind.
    """
    from diffgen.checkpoint_files import first_line, read_lightning

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                fmt = (f.metadata() or {}).get("format")
        except Exception as exc:  # noqa: BLE001
            raise DiffgenError(f"cannot read checkpoint {path}: {first_line(exc)}") from None
        if fmt == _GENERATOR_FORMAT:
            return "generator"
        if fmt in _REGRESSOR_FORMATS:
            return "regressor"
        raise DiffgenError(f"{path} is neither a diffgen generator nor a regressor (metadata format {fmt!r})")
    hp = read_lightning(path).get("hyper_parameters")
    if isinstance(hp, dict) and "node_histogram" in hp:
        return "generator"
    task = hp.get("config", {}).get("task") if isinstance(hp, dict) and isinstance(hp.get("config"), dict) else None
    if isinstance(task, dict) and "targets" in task:
        return "regressor"
    raise DiffgenError(f"{path} is neither a diffgen generator nor a regressor checkpoint")


def load_pretrained(name_or_path: str | Path = "qm9", device: str = "cpu"):
    """A shipped model by name, or a checkpoint file (``.safetensors`` export or Lightning ``.ckpt``).

    Args:
        name_or_path: ``"qm9"`` (the EDM generator trained on QM9 with hydrogens), ``"qm9-gap"`` (the HOMO-LUMO gap
            regressor), or a path to a generator or regressor checkpoint.
        device: torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).

    Returns:
        :class:`PretrainedGenerator` (``.sample``) or :class:`PretrainedRegressor` (``.predict``).

    Raises:
        DiffgenError: unknown name (one line, listing the names), missing or unreadable file, a device this machine
            lacks.
    """
    from diffgen.devices import check_device

    check_device(device, "device=")
    key = str(name_or_path)
    if key in PRETRAINED:
        kind, file = PRETRAINED[key]
        path = PRETRAINED_DIR / file
    else:
        path = Path(name_or_path).expanduser()
        if path.suffix not in (".safetensors", ".ckpt") or not path.is_file():
            names = ", ".join(repr(k) for k in PRETRAINED)
            raise DiffgenError(f"unknown pretrained model {key!r}: use {names}, or the path of a .safetensors "
                               "or .ckpt checkpoint")
        kind = _kind_of(path)
    if kind == "generator":
        from diffgen.tasks.generation.checkpoints import load_generator

        return PretrainedGenerator(load_generator(path, device=device), device)
    from diffgen.tasks.regression.checkpoints import load_regressor

    return PretrainedRegressor(load_regressor(path, device=device), path, device)
