"""The run configuration: one typed dataclass per concern, each field declared once with its type,
default, bounds, choices, help and flag. The `sazd train` parser, its help and its choices are derived
from these declarations (``add_arguments``), a parsed command line becomes a config
(``from_flags``), and ``TrainConfig.validate`` checks every setting once, naming it by its flag.

Name lists that belong to another layer (models, schemes, backends, placements) are read from that
layer when a value is checked or help is shown, never copied here; this module imports no torch, so
``sazd --help`` stays fast. A backend's options (``backend=`` in their declaration) reach only that
backend; unset, the backend's own default applies (e.g. its worker timeout).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DTYPES = ("float32", "float64")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")


@dataclass(frozen=True)
class Setting:
    """How one field is checked and offered on the command line."""

    help: str = ""
    flag: str | None = None  # default: --<field name with dashes>; "" = no flag
    choices: Callable[[], Iterable[Any]] | tuple | None = None  # a callable: the owner's list, read late
    low: float | None = None
    high: float | None = None
    above: bool = False  # low is exclusive
    group: str = "run"
    backend: str | None = None  # an option of this backend only
    resume: bool = False  # fixes the model, data order or update rule: a resume must not change it
    path: bool = False  # a place to read or write: on resume taken from the command line only
    parse: Callable[[str], Any] | None = None  # command-line text -> value
    negate: bool = False  # a bool shown as --no-<flag> that sets False
    bare: Any = None  # the value of the flag given without one (then the value is optional)

    def names(self) -> list[Any]:
        return list(self.choices() if callable(self.choices) else self.choices or ())


def meta(**kw: Any) -> dict[str, Setting]:
    """A field's metadata: its ``Setting``."""
    return {"sazd": Setting(**kw)}


def setting(default: Any = None, **kw: Any) -> Any:
    """A field with an immutable default and its ``Setting``."""
    return field(default=default, metadata=meta(**kw))


def _models() -> Iterable[str]:
    from sazd.models import MODELS

    return MODELS


def _schemes() -> Iterable[str]:
    from sazd.parallel import SCHEMES

    return SCHEMES


def _backends() -> Iterable[str]:
    from sazd.runtime import BACKENDS

    return BACKENDS


def _placements() -> Iterable[str]:
    from sazd.runtime.placement import PLACEMENTS

    return PLACEMENTS


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _plan(text: str) -> dict[str, str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no layer names in {text!r}; give names such as fc1,fc2")
    return dict.fromkeys(names, "coded")


def _shift_unit(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of rows or 'auto', got {text!r}") from None


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and LR schedule. ``step_size``/``total_steps`` count iterations."""

    name: str = setting("sgd", flag="optimizer", choices=OPTIMIZERS, group="optimizer",
                        help="adam/adamw only with --scheme naive")
    lr: float = setting(0.05, group="optimizer", help="learning rate")
    momentum: float = setting(0.9, group="optimizer", help="SGD momentum")
    dampening: float = setting(0.0, group="optimizer", help="SGD dampening")
    nesterov: bool = setting(False, group="optimizer", help="Nesterov momentum")
    weight_decay: float = setting(0.0, group="optimizer", help="L2 weight decay")
    betas: tuple[float, float] = setting((0.9, 0.999), flag="")  # adam, adamw
    eps: float = setting(1e-8, flag="")  # adam, adamw
    schedule: str = setting("constant", choices=SCHEDULES, group="optimizer", help="learning-rate schedule")
    step_size: int = setting(1000, group="optimizer", help="step schedule: iterations between decays")
    gamma: float = setting(0.1, group="optimizer", help="step schedule: decay factor")
    total_steps: int | None = setting(None, flag="")  # cosine: decays to min_lr over this many
    min_lr: float = setting(0.0, flag="")
    clip_norm: float | None = setting(None, group="optimizer",
                                      help="clip the global gradient norm (exact in DEU)")

    def validate(self, scheme: Any = None) -> OptimConfig:
        """Raise a clear ValueError for a bad setting (``scheme``: also check it fits the scheme)."""
        validate_optim(self, scheme)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig:
    """Everything a run needs; the CLI fills it from flags, tests build it directly."""

    model: str = setting("mlp", choices=_models, group="model and data", resume=True, help="the network")
    dataset: str = setting("fashion-mnist", group="model and data", resume=True,
                           help="fashion-mnist, mnist, kmnist, digits, idx; text for gpt: pystdlib (Python's "
                                "own sources) or text (--data-dir DIR)")
    data_dir: str | None = setting(None, group="model and data", path=True,
                                   help="directory with the four IDX files (text: your files)")
    train_limit: int | None = setting(None, low=1, group="model and data", resume=True,
                                      help="use a seeded subset of N training samples")
    test_limit: int | None = setting(None, low=1, group="model and data",
                                     help="use a seeded subset of N test samples")
    hidden: tuple[int, ...] | None = setting(None, parse=_ints, group="model and data", resume=True,
                                             help="hidden widths, e.g. 1024,1024 (mlp), 128 (cnn), 16,32,64 "
                                                  "(resnet stages) or 128,4,4 (gpt channels,layers,heads)")
    dtype: str = setting("float32", choices=DTYPES, group="model and data", resume=True,
                         help="the master's and the blocks' precision")
    seed: int = setting(0, low=0, group="model and data", resume=True, help="seed of init, data and latency")
    code: str = setting("sazd", group="code and scheme", resume=True,
                        help="sazd, cyclic, poly, gaussian, uncoded, replication")
    n: int | None = setting(None, low=1, group="code and scheme", resume=True,
                            help="workers (default k+2; k for --code uncoded)")
    k: int = setting(4, low=1, group="code and scheme", resume=True, help="workers whose answers suffice")
    code_options: dict[str, Any] = field(default_factory=dict,  # from CODE_FLAGS
                                         metadata=meta(flag="", resume=True))
    scheme: str = setting("deu", choices=_schemes, group="code and scheme", resume=True,
                          help="how coded weights are updated")
    plan: dict[str, str] | None = field(default=None, metadata=meta(
        parse=_plan, group="code and scheme", resume=True,
        help="layers to code, e.g. fc1,fc2 (default: every Linear/Conv2d with both widths >= "
             "--min-features)"))
    min_features: int = setting(64, low=1, group="code and scheme", resume=True,
                                help="smallest width of a layer coded by default")
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=meta(flag="", resume=True))
    batch_size: int = setting(128, low=1, group="optimizer", resume=True, help="samples per iteration")
    epochs: int = setting(1, low=1, group="optimizer", help="passes over the training data")
    max_steps: int | None = setting(None, low=1, group="optimizer",
                                    help="stop after this many iterations in all")
    backend: str = setting("ray", choices=_backends, group="cluster",
                           help="ray (a local Ray cluster starts by itself) or inproc (simulated latency)")
    stragglers: int = setting(0, low=0, group="cluster", help="the first S workers are slow")
    straggler_delay: float = setting(5.0, low=1.0, group="cluster", help="slowdown factor of a straggler")
    latency: str | None = setting(None, group="cluster",
                                  help="latency model: none | fixed:S:F | shiftexp:RATE[:SHIFT] | "
                                       "dead:I,J[:AFTER]; '+' joins several")
    worker_timeout_s: float | None = setting(None, flag="worker-timeout", low=0.0, above=True,
                                             group="cluster",
                                             help="seconds a worker may stay silent before it is killed, "
                                                  "respawned and repaired (default: the backend's)")
    compute_dtype: str | None = setting(None, group="cluster",
                                        help="workers' product precision: bfloat16 or float16 (decoding "
                                             "stays in --dtype)")
    decode_device: str = setting("auto", group="cluster",
                                 help="where the master decodes: auto (its GPU when it has one), cpu, cuda")
    repair: bool = setting(True, negate=True, group="cluster", help="do not respawn dead workers")
    network_gbps: float | None = setting(None, low=0.0, above=True, backend="inproc", group="cluster",
                                         help="simulated master link in Gb/s")
    base_time_s: float | None = setting(None, flag="base-time", low=0.0, backend="inproc", group="cluster",
                                        help="constant task time in seconds (a deterministic simulated "
                                             "clock)")
    device: str = setting("cpu", backend="inproc", group="cluster", help="workers' device (cpu, cuda)")
    address: str | None = setting(None, backend="ray", path=True, group="cluster",
                                  help="join this Ray cluster (host:port or auto)")
    gpus_per_worker: float = setting(0.0, low=0.0, backend="ray", group="cluster",
                                     help="GPUs per worker actor")
    placement: str = setting("spread", choices=_placements, backend="ray", group="cluster",
                             help="workers on distinct nodes while there are nodes (spread) or packed (pack)")
    tls: bool | str | None = setting(None, backend="ray", path=True, bare=True, group="cluster",
                                     help="encrypt and authenticate the data plane (TLS); DIR: use the "
                                          "certificates there instead of generating them")
    shared_memory: bool = setting(True, negate=True, backend="ray", group="cluster",
                                  help="send every tensor on the workers' sockets, also to workers on this "
                                       "machine (no shared-memory arena)")
    run_dir: str | None = setting(None, path=True, group="output",
                                  help="run directory (default runs/train-<time>)")
    checkpoint_dir: str | None = setting(None, path=True, group="output", help="default <run-dir>/checkpoint")
    checkpoint_every: int | None = setting(None, low=1, group="output",
                                           help="save a checkpoint every N iterations")
    resume: str | None = setting(None, path=True, group="output",
                                 help="resume from a checkpoint (or run) directory")
    overwrite: bool = setting(False, path=True, group="output",
                              help="replace an earlier run in --run-dir (deletes only the files sazd wrote "
                                   "there)")
    show_progress: bool | None = setting(None, flag="progress", negate=True, group="output",
                                         help="no progress bar")

    def __post_init__(self) -> None:
        if self.n is None:
            self.n = self.k if self.code == "uncoded" else self.k + 2

    # ------------------------------------------------------------ validation
    def validate(self) -> TrainConfig:
        """Check every setting without data or workers; a ValueError naming the setting by its flag."""
        for f, meta in _settings(type(self)):
            _check_value(f, meta, getattr(self, f.name))
        if self.stragglers > self.n:
            raise ValueError(f"--stragglers must be in [0, n={self.n}], got {self.stragglers!r}")
        if self.plan is not None and not self.plan:
            raise ValueError("--plan names no layers; give layer names such as fc1,fc2 or leave --plan out")
        self.backend_options()  # flags of the other backend are errors
        if isinstance(self.tls, str) and not Path(self.tls).is_dir():
            raise ValueError(f"--tls {self.tls}: no such directory; give the directory holding the "
                             "certificates, or --tls alone to generate them")
        if self.checkpoint_every is not None and self.checkpoint_path is None:
            raise ValueError("--checkpoint-every needs a place to write: set --run-dir or --checkpoint-dir")
        if self.overwrite and self.resume is not None:
            raise ValueError("--overwrite starts a new run over an earlier one; it cannot go with --resume")
        if self.address is not None:
            _check_address(self.address)
        from sazd.runtime.latency import straggler_latency
        from sazd.runtime.worker import Worker

        Worker.check_dtype(self.compute_dtype)
        self._check_devices()
        self.make_code()  # bad n/k or code options
        straggler_latency(self.stragglers, self.straggler_delay, self.latency, self.seed).bind(self.n)
        self.optim.validate(self.scheme)
        return self

    def _check_devices(self) -> None:
        import torch

        from sazd.parallel.plan import check_decode_device

        check_decode_device(self.master_decode_device())
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"--device {self.device!r} is not a device ({err}); use cpu or cuda") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: only cpu and cuda are supported")
        if device.type == "cuda" and self.backend == "inproc":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (device.index or 0) >= count:
                raise ValueError(f"--device {self.device}: this machine has {count} usable CUDA device(s); "
                                 "use --device cpu" + (f" or cuda:0..{count - 1}" if count else ""))

    def backend_options(self) -> dict[str, Any]:
        """The options of ``backend`` that are set (the backend's defaults apply to the others); a set
        option of another backend is a ValueError rather than silently ignored."""
        mine = {}
        for f, meta in _settings(type(self)):
            value = getattr(self, f.name)
            if meta.backend is None or value == f.default:
                continue
            if meta.backend != self.backend:
                raise ValueError(f"{_flag(f, meta)} applies to --backend {meta.backend} only; this run uses "
                                 f"--backend {self.backend}: drop it or pick that backend")
            mine[f.name] = value
        if self.worker_timeout_s is not None:
            mine["worker_timeout_s"] = self.worker_timeout_s
        return mine

    @property
    def checkpoint_path(self) -> Path | None:
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir)
        return None if self.run_dir is None else Path(self.run_dir) / "checkpoint"

    def make_code(self):
        from sazd.codes import get_code

        return get_code(self.code, n=self.n, k=self.k, **self.code_options)

    def master_decode_device(self) -> str | None:
        """The device the master decodes on: ``decode_device``, where "auto" is its GPU when it has one."""
        if self.decode_device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else None
        return self.decode_device

    # ------------------------------------------------------------ (de)serialising
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        d = dict(d)
        optim = dict(d.pop("optim", {}))
        if "betas" in optim:
            optim["betas"] = tuple(optim["betas"])
        if d.get("hidden") is not None:
            d["hidden"] = tuple(d["hidden"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known}, optim=OptimConfig(**optim))

    @classmethod
    def from_checkpoint(cls, d: Any) -> TrainConfig:
        """A config read from a checkpoint: every field present, of its declared type, and valid;
        otherwise a ``CheckpointError`` naming the field."""
        from sazd.train import checkpoint

        if isinstance(d, dict):  # saved before these settings existed: their defaults
            d = {"tls": None, "shared_memory": True, **d}
        checkpoint.check_fields("config", d, cls)
        checkpoint.check_fields("config.optim", d["optim"], OptimConfig)
        try:  # (the device is this machine's business: checked once the command line's flags apply)
            cfg = cls.from_dict(d)
            dataclasses.replace(cfg, device="cpu", decode_device="auto", tls=None).validate()
            return cfg
        except ValueError as err:
            raise checkpoint.CheckpointError(f"checkpoint field config: {err}") from None


def validate_optim(cfg: OptimConfig, scheme: Any = None) -> None:
    """Raise a clear ValueError for a bad setting (``scheme``: also check it fits the scheme)."""
    from sazd.parallel.schemes import get_scheme

    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {cfg.name!r}")
    if scheme is not None and get_scheme(scheme).sgd_only and cfg.name != "sgd":
        raise ValueError(
            f"optimizer {cfg.name!r} cannot run with scheme {get_scheme(scheme).name!r}: DEU workers "
            "update their coded "
            "weights themselves, which keeps them the encoding of the true weights only for an update "
            "linear in the weights (SGD with momentum/Nesterov/weight decay); Adam's division by "
            "sqrt(v) is elementwise and nonlinear. Use --optimizer sgd, or --scheme naive for Adam"
        )
    if not cfg.lr > 0 or math.isinf(cfg.lr):
        raise ValueError(f"lr must be a finite number > 0, got {cfg.lr!r}")
    if not 0 <= cfg.momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {cfg.momentum!r}")
    if not 0 <= cfg.dampening <= 1:
        raise ValueError(f"dampening must be in [0, 1], got {cfg.dampening!r}")
    if cfg.nesterov and (cfg.momentum == 0 or cfg.dampening != 0):
        raise ValueError(
            f"nesterov needs momentum > 0 and dampening = 0, got momentum={cfg.momentum}, "
            f"dampening={cfg.dampening}"
        )
    if not cfg.weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {cfg.weight_decay!r}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.schedule == "step" and (cfg.step_size < 1 or not 0 < cfg.gamma <= 1):
        raise ValueError(
            f"step schedule needs step_size >= 1 and 0 < gamma <= 1, got {cfg.step_size}, {cfg.gamma}"
        )
    if cfg.schedule == "cosine" and cfg.total_steps is not None and cfg.total_steps < 1:
        raise ValueError(f"cosine schedule needs total_steps >= 1 (unset: the run's length), got "
                         f"{cfg.total_steps!r}")
    if not 0 <= cfg.min_lr <= cfg.lr:
        raise ValueError(f"min_lr must be in [0, lr={cfg.lr}], got {cfg.min_lr!r}")
    if cfg.clip_norm is not None and not cfg.clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 (or None for no clipping), got {cfg.clip_norm!r}")


# Code options offered as flags: (flag, code_options key, Setting).
CODE_FLAGS = (
    ("non-systematic", "non_systematic", Setting(help="sazd/poly: the non-systematic form",
                                                 group="code and scheme")),
    ("shift-unit", "shift_unit", Setting(help="sazd: shift unit g in rows, or 'auto'", parse=_shift_unit,
                                         group="code and scheme")),
    ("nodes", "nodes", Setting(help="poly: evaluation nodes, integer or chebyshev", group="code and scheme")),
)
RESUME_FIELDS = tuple(f.name for f, meta in
                      ((f, f.metadata["sazd"]) for f in dataclasses.fields(TrainConfig)) if meta.resume)
PATH_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["sazd"].path)


def _settings(cls: type) -> list[tuple[dataclasses.Field, Setting]]:
    return [(f, f.metadata["sazd"]) for f in dataclasses.fields(cls)]


def _flag(f: dataclasses.Field, meta: Setting) -> str:
    return ("--no-" if meta.negate else "--") + (meta.flag or f.name.replace("_", "-"))


def _check_address(address: str) -> None:
    """A Ray address: ``auto``, ``host:port`` or ``ray://host:port``."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    ok = address == "auto" or (host and port.isdigit() and 0 < int(port) < 65536 and " " not in host)
    if not ok:
        raise ValueError(f"--address {address!r} is not a Ray address; give host:port of the head node (e.g. "
                         "10.0.0.5:6379), ray://host:port, or auto")


def _check_value(f: dataclasses.Field, meta: Setting, value: Any) -> None:
    """``value`` has the field's type, lies within its bounds and is one of its choices."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if value is None and optional:
        return
    flag = _flag(f, meta)
    if base is int and (type(value) is not int):
        raise ValueError(f"{flag} must be an integer, got {value!r}")
    if base is float and (isinstance(value, bool) or not isinstance(value, int | float)
                          or not math.isfinite(value)):
        raise ValueError(f"{flag} must be a finite number, got {value!r}")
    if meta.low is not None and not (value > meta.low if meta.above else value >= meta.low):
        raise ValueError(f"{flag} must be {'>' if meta.above else '>='} {meta.low:g}, got {value!r}")
    if meta.high is not None and not value <= meta.high:
        raise ValueError(f"{flag} must be <= {meta.high:g}, got {value!r}")
    if meta.choices is not None and value not in meta.names():
        raise ValueError(f"{flag} must be one of {meta.names()}, got {value!r}")


# ---------------------------------------------------------------------------------- command line
class _Names:
    """A setting's choices, read from their owner only when help is shown."""

    def __init__(self, meta: Setting) -> None:
        self.meta = meta

    def __str__(self) -> str:
        return ", ".join(map(str, self.meta.names()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per declared setting, grouped, with its help, default and choices. Flags not given stay
    out of the parsed namespace (argparse.SUPPRESS), so ``from_flags`` knows which ones were given."""
    groups: dict[str, Any] = {}

    def add(name: str, dest: str, meta: Setting, default: Any, kind: Any) -> None:
        group = groups.get(meta.group) or groups.setdefault(meta.group, parser.add_argument_group(meta.group))
        text = meta.help
        if meta.choices is not None:
            text += ": %(names)s"
        if default not in (None, False, True, "") and not meta.negate:
            text += f" (default {default})"
        kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")
                              .replace("%%(names)s", "%(names)s")}
        if meta.bare is not None:  # e.g. --tls alone, or --tls DIR
            kw.update(nargs="?", const=meta.bare, metavar="DIR" if meta.path else None)
        elif kind is bool or meta.negate:
            kw["action"] = "store_const"
            kw["const"] = not meta.negate
        else:
            kw.update(type=meta.parse or (kind if kind in (int, float) else str),
                      metavar=name.upper().replace("-", "_"))
        action = group.add_argument(f"--no-{name}" if meta.negate else f"--{name}", **kw)
        action.names = _Names(meta)

    hints = typing.get_type_hints(TrainConfig)
    optim_hints = typing.get_type_hints(OptimConfig)
    for f, meta in _settings(TrainConfig):
        if meta.flag != "":
            base = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
            add(meta.flag or f.name.replace("_", "-"), f.name, meta, f.default, base)
        if f.name == "k":
            for flag, key, code_meta in CODE_FLAGS:
                add(flag, f"code_options.{key}", code_meta, None, bool if key == "non_systematic" else str)
        if f.name == "optim":
            for of, ometa in _settings(OptimConfig):
                if ometa.flag != "":
                    base = next((a for a in typing.get_args(optim_hints[of.name]) if a is not type(None)),
                                optim_hints[of.name])
                    add(ometa.flag or of.name.replace("_", "-"), f"optim.{of.name}", ometa, of.default, base)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line: {"lr": ..., "optim.lr": ..., "code_options.nodes": ...}."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {dest: value for dest, value in vars(args).items()
            if dest in names or dest.startswith(("optim.", "code_options."))}


def apply(cfg: TrainConfig, given: Mapping[str, Any]) -> TrainConfig:
    """``cfg`` with the given settings applied (nested ones by their dotted names)."""
    optim = {k.removeprefix("optim."): v for k, v in given.items() if k.startswith("optim.")}
    options = {k.removeprefix("code_options."): v for k, v in given.items() if k.startswith("code_options.")}
    if options.pop("non_systematic", False):
        options["systematic"] = False
    top = {k: v for k, v in given.items() if "." not in k}
    if "n" not in top and {"k", "code"} & set(top):  # n follows k unless given
        top["n"] = None
    return dataclasses.replace(cfg, **top, optim=dataclasses.replace(cfg.optim, **optim),
                               code_options={**cfg.code_options, **options})


def from_flags(args: argparse.Namespace, saved: TrainConfig | None = None) -> TrainConfig:
    """The config of a command line: the declared defaults, or with ``saved`` (a checkpoint's config)
    that config, with every given flag applied over it; paths come from the command line only, and a
    backend's options lapse when the run moves to another backend."""
    given = given_settings(args)
    if saved is None:
        return apply(TrainConfig(), given)
    paths = {name: given.get(name, TrainConfig.__dataclass_fields__[name].default) for name in PATH_FIELDS}
    cfg = apply(saved, {**given, **paths})
    for f, meta in _settings(TrainConfig):
        if meta.backend not in (None, cfg.backend) and f.name not in given:
            setattr(cfg, f.name, f.default)
    return cfg
