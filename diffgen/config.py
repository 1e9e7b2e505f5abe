"""The one configuration mechanism: typed dataclasses loaded from YAML, overridable with ``section.key=value``.

Every task (``diffgen.tasks.generation.config``, ``.regression.config``, ``.dynamics.config``) declares its
config as nested dataclasses and builds it with :func:`build_config` / :func:`load_config`; this module
knows nothing of the tasks. Validation happens here, in one place:

* types come from the type hints (``int``, ``float``, ``str``, ``bool``, ``list``, ``X | None``);
* choices are ``Literal[...]`` hints;
* numeric bounds are declared on the field with :func:`bounded` (e.g. ``hidden: int = bounded(128, ge=1)``);
  every float must be finite (``nan``/``inf`` are refused);
* cross-field rules live in an optional ``check(self)`` method of a dataclass, run after its fields are valid.

Every violation raises :class:`~diffgen.errors.DiffgenError` with one line naming the key, e.g.
``config key model.hidden must be >= 1, got 0``.

Example::

    cfg = load_config(GenerationConfig, "qm9_egnn", ["model.hidden=128", "trainer.max_epochs=5"])
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from diffgen.errors import DiffgenError

T = TypeVar("T")

#: Precisions Lightning accepts for ``trainer.precision``.
Precision = Literal["32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true", "64"]


class ConfigRoot:
    """Base of a task's top-level config dataclass: :meth:`to_dict` gives the plain data checkpoints store."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field with numeric bounds checked by :func:`build_config` (``ge``: >=, ``gt``: >, ``le``: <=)."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le})


@dataclass
class TrainerConfig:
    """Lightning trainer settings shared by every task (:func:`diffgen.tasks.trainer.make_trainer`)."""

    out_dir: str = "runs/run"
    max_epochs: int = bounded(1000, ge=-1)
    max_steps: int = bounded(-1, ge=-1)
    max_time: str | None = None  # e.g. "00:02:00:00" (DD:HH:MM:SS)
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"  # Lightning strategy, e.g. ddp (several processes; gloo on the CPU, NCCL on GPUs)
    num_nodes: int = bounded(1, ge=1)
    precision: Precision = "32-true"
    # float32 matmuls: highest (exact fp32) | high (TF32 on NVIDIA GPUs) | medium (bf16); torch.set_float32_matmul_precision
    matmul_precision: Literal["highest", "high", "medium"] = "highest"
    seed: int = 0
    log_every_n_steps: int = bounded(50, ge=1)
    limit_train_batches: int | float = bounded(1.0, gt=0)  # Lightning: a float is a fraction, an int a count
    limit_val_batches: int | float = bounded(1.0, ge=0)
    ckpt_every_n_steps: int = bounded(1000, ge=1)
    # also keep a checkpoint every N steps in checkpoints/kept/ (none deleted; a generator's can be averaged by
    # `diffgen export A B ... OUT`); 0: off. Changing N on a resume makes Lightning warn that the callback's saved
    # state is not restored (harmless: the kept files stay)
    keep_every_n_steps: int = bounded(0, ge=0)


#: Choices of ``model.backbone``: the EGNN or the E(3) transformer (see :class:`BackboneConfig`).
Backbone = Literal["egnn", "e3transformer"]


@dataclass
class BackboneConfig:
    """Backbone fields shared by every task's model section.

    ``backbone`` picks the network: ``egnn`` (:class:`diffgen.models.egnn.EGNN`, default) or ``e3transformer``
    (:class:`diffgen.models.e3transformer.E3Transformer`). Both read ``hidden`` (the EGNN's width; the transformer's
    number of ``0e`` scalar channels) and ``n_layers``; ``attention`` and ``norm_factor`` are the EGNN's; ``lmax``
    (highest irrep order, 1 or 2), ``l_channels`` (channels per l >= 1 irrep), ``heads``, ``num_basis`` and ``r_max``
    (Gaussian radial basis on ``[0, r_max]``, length unit of the positions) are the transformer's.
    """

    backbone: Backbone = "egnn"
    hidden: int = bounded(256, ge=1)
    n_layers: int = bounded(9, ge=1)
    attention: bool = True
    norm_factor: float = bounded(1.0, gt=0)
    lmax: int = bounded(1, ge=1, le=2)
    l_channels: int = bounded(32, ge=1)
    heads: int = bounded(4, ge=1)
    num_basis: int = bounded(16, ge=1)
    r_max: float = bounded(15.0, gt=0)

    def check(self) -> None:
        """The transformer's heads split the channels of every irrep: ``hidden`` and ``l_channels`` must divide."""
        if self.backbone == "e3transformer":
            for key in ("hidden", "l_channels"):
                if getattr(self, key) % self.heads:
                    raise DiffgenError(f"config key model.{key}={getattr(self, key)} must be a multiple of "
                                       f"model.heads={self.heads} (backbone e3transformer)")

    def transformer_kwargs(self) -> dict:
        """Keyword arguments of :class:`~diffgen.models.e3transformer.E3Transformer` beyond the widths and depth."""
        return {"lmax": self.lmax, "l_channels": self.l_channels, "heads": self.heads, "num_basis": self.num_basis,
                "r_max": self.r_max}


GraphKind = Literal["full", "radius", "knn"]

#: Generator-only trainer keys that regression and dynamics checkpoints written before the re-layout carry.
_LEGACY_TRAINER_KEYS = ("sample_every_n_epochs", "n_eval_samples", "eval_steps")


def drop_legacy_keys(values: dict | None) -> dict:
    """A copy of a stored regression/dynamics config without the generator-only trainer keys old files carry."""
    values = dict(values or {})
    if isinstance(values.get("trainer"), dict):
        values["trainer"] = {k: v for k, v in values["trainer"].items() if k not in _LEGACY_TRAINER_KEYS}
    return values


class _Override:
    """An override's value as YAML reads it, plus its raw text: ``str`` fields take the text (``out_dir=007``
    stays ``"007"``, ``max_time=10:00:00:00`` is not read as a base-60 number), other fields the parsed value."""

    __slots__ = ("raw", "value")

    def __init__(self, raw: str, value: Any):
        self.raw, self.value = raw, value


def _is_str_field(hint: Any) -> bool:
    return hint is str or (get_origin(hint) in (typing.Union, types.UnionType) and str in get_args(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert a YAML value against a dataclass field's type hint; one-line error if it does not fit."""
    origin, args = get_origin(hint), get_args(hint)
    if isinstance(value, _Override):
        value = value.raw if _is_str_field(hint) and value.value is not None else value.value
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        if set(inner) == {int, float}:  # a count or a fraction (Lightning's limit_*_batches): keep which it is
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            return _coerce(value, float, key)
        raise DiffgenError(f"config key {key} has an unsupported type {hint}")
    if value is None:
        raise DiffgenError(f"config key {key} may not be null")
    if origin is Literal:
        if value not in args and str(value) in args:  # e.g. trainer.precision=32 read by YAML as an int
            value = str(value)
        if value not in args:
            raise DiffgenError(f"config key {key} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise DiffgenError(f"config key {key} must be true or false, got {value!r}")
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise DiffgenError(f"config key {key} must be a finite number, got {value!r}")
            return float(value)
        raise DiffgenError(f"config key {key} must be float, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise DiffgenError(f"config key {key} must be int, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise DiffgenError(f"config key {key} must be a string, got {value!r} (quote it in YAML)")
    if hint is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            return [value]
        raise DiffgenError(f"config key {key} must be a list, got {value!r}")
    return value


def _check_bounds(value: Any, meta: typing.Mapping, key: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for name, op, text in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                           ("le", lambda a, b: a <= b, "<=")):
        bound = meta.get(name)
        if bound is not None and not op(value, bound):
            raise DiffgenError(f"config key {key} must be {text} {bound:g}, got {value!r}")


def _update(obj: Any, values: dict, prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise DiffgenError(f"unknown config key {name}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise DiffgenError(f"config section {name} must be a mapping")
            _update(current, value, prefix=f"{name}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], name))


def _validate(obj: Any, prefix: str = "") -> None:
    """Bounds and choices of every field (defaults included), then each dataclass's own ``check()``."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _validate(value, f"{name}.")
        else:
            _coerce(value, hints[f.name], name)
            _check_bounds(value, f.metadata, name)
    check = getattr(obj, "check", None)
    if callable(check):
        check()


def build_config(cls: type[T], values: dict | None = None) -> T:
    """Build and validate the dataclass ``cls`` from a (possibly partial) nested dict.

    Raises:
        DiffgenError: unknown key, wrongly typed value, value out of bounds or not among the choices,
            or a cross-field rule of a ``check()`` method.
    """
    cfg = cls()
    _update(cfg, values or {})
    _validate(cfg)
    return cfg


def parse_overrides(overrides: list[str] | None) -> dict:
    """``["model.hidden=128", "trainer.devices=2"]`` -> nested dict (values parsed as YAML scalars).

    Raises:
        DiffgenError: an override without ``=``.
    """
    out: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise DiffgenError(f"override {item!r} must look like section.key=value")
        path, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if not isinstance(value, (dict, list)):
            value = _Override(raw.strip(), value)
        node = out
        parts = path.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DiffgenError(f"override {item!r} sets a key below a value")
        node[parts[-1]] = value
    return out


def trainer_overrides(accelerator: str | None = None, devices: str | None = None,
                      out_dir: str | None = None) -> list[str]:
    """``trainer.*`` overrides for the CLI's ``--accelerator/--devices/--out-dir`` options (unset ones are skipped)."""
    given = {"accelerator": accelerator, "devices": devices, "out_dir": out_dir}
    return [f"trainer.{key}={value}" for key, value in given.items() if value]


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def packaged_configs() -> list[str]:
    """Names of the configs shipped inside the package (``diffgen/configs/*.yaml``), e.g. ``qm9_egnn``."""
    return sorted(p.name[:-5] for p in resources.files("diffgen").joinpath("configs").iterdir()
                  if p.name.endswith(".yaml"))


def resolve_config(path_or_name: str | Path) -> Path:
    """A config file: an existing path, else the packaged config of that name (``qm9_egnn``, ``qm9_egnn.yaml``
    and ``configs/qm9_egnn.yaml`` all name ``diffgen/configs/qm9_egnn.yaml``), so the defaults work outside the repo.

    Raises:
        DiffgenError: neither a file nor a packaged config name.
    """
    p = Path(path_or_name)
    if p.is_file():
        return p
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    packaged = resources.files("diffgen").joinpath("configs", f"{name}.yaml")
    if packaged.is_file() and p.parent in (Path("."), Path("configs")):
        return Path(str(packaged))
    raise DiffgenError(f"config file not found: {p} (packaged configs: {', '.join(packaged_configs())})")


def read_config_values(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Nested dict of a YAML config (``{}`` if ``path`` is None; a path or a packaged name, see
    :func:`resolve_config`) with ``section.key=value`` overrides merged in.

    Raises:
        DiffgenError: unreadable file, invalid YAML, non-mapping document or malformed override.
    """
    values: dict = {}
    if path is not None:
        p = resolve_config(path)
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise DiffgenError(f"cannot parse config {p}: {str(exc).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise DiffgenError(f"config {p} must be a YAML mapping")
    return _merge(values, parse_overrides(overrides))


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load a YAML config into ``cls`` (defaults if ``path`` is None) and apply ``section.key=value`` overrides.

    Raises:
        DiffgenError: unreadable file, invalid YAML, unknown key, wrongly typed, out-of-bounds or unknown choice.
    """
    return build_config(cls, read_config_values(path, overrides))
