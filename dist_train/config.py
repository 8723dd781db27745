"""One typed, validated config object: YAML file + dotted command-line overrides.

Every mistake (unknown key, wrong type, missing path) becomes a ``ConfigError``
whose one-line message names the key; the entry points turn it into exit code 2
before any process group or file is created.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from shards.remote import is_remote


class ConfigError(ValueError):
    """A configuration mistake; its message is one line naming the key."""


def path_field(default: str = "", remote: bool = False, **kw: Any) -> Any:
    """A string field that, when non-empty, must name an existing path; with
    ``remote`` also a dataset URL (``shards/remote.py``), checked by preflight
    when it fetches the manifest."""
    return field(default=default, metadata={"path": True, "remote": remote}, **kw)


NO_SPLIT = "none"  # data.val_split=none: train without validation
# Bounds of values that otherwise overflow deep inside (timedelta, RNG seeds) or
# only make a run diverge: one line at load time instead of a traceback.
MAX_LR = 10.0
MAX_TIMEOUT_S = 7 * 24 * 3600
MAX_SEED = 2**32 - 1  # numpy's seed range; torch and random take it too


@dataclass
class ExperimentConfig:
    name: str = "run"
    seed: int = 42
    output_dir: str = "runs"


@dataclass
class SyntheticDataConfig:
    num_identities: int = 40
    samples_per_identity: int = 20
    twin_fraction: float = 0.25
    image_size: int = 64
    split_by: Literal["sample", "identity"] = "sample"
    modalities: list[str] = field(default_factory=lambda: ["vis"])
    # Where the generated set is kept: empty = $BIOMTL_CACHE, else <experiment.output_dir>/cache
    # (synthetic_cache_dir); never the working folder.
    cache_dir: str = ""
    # > 0: the many-identities mode (shards/synthetic/many.py): this many drawn base
    # faces, each identity one of them under its own cheap transform; vis only.
    # 10^5 identities in about a minute, for the identity-head benchmarks.
    base_faces: int = 0
    # how co-twins differ: "subtle" (sub-pixel, mirrored parting) or "marked" (docs/differences.md)
    twin_style: Literal["subtle", "marked"] = "subtle"


@dataclass
class DataConfig:
    source: Literal["synthetic", "shards"] = "synthetic"
    shards: str = path_field(remote=True)  # a folder, http(s)://HOST/DIR, s3://BUCKET/PREFIX or pipe:CMD with {}
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    batch_size: int = 32  # micro-batch per rank
    num_workers: int = 0
    shuffle_buffer: int = 1000
    train_split: str = "train"
    val_split: str = "val"  # "none": no validation (no best/top-k checkpoints, no early stopping)
    test_split: str = "test"
    max_corrupt_fraction: float = 0.01
    # hash every shard against the manifest's sha256 before streaming it; a
    # mismatch is a corrupt shard (counted, named). Off: hashing costs a read.
    verify_checksums: bool = False
    resampled: bool = False  # stream: shards drawn with replacement, virtual epochs (shards/stream.py)
    batching: Literal["stream", "pk", "triplet"] = "stream"  # train batches; pk/triplet: shards/batching.py
    pk_k: int = 4  # pk: samples per identity; P = batch_size // pk_k identities per batch
    twin_prob: float = 1.0  # pk: co-twin joins the batch / triplet: negative is the co-twin
    # insightface verification .bin files (LFW, CFP-FP, AgeDB-30...) scored at every validation
    # as <file stem>_acc / _acc_std / _eer (dist_train/val_bins.py); contents checked by the preflight
    val_bins: list[str] = field(default_factory=list)


@dataclass
class RecipeConfig:
    name: str = "facecom"
    # Validated against the recipe's own ``Params`` dataclass after loading.
    params: dict[str, Any] = field(default_factory=dict)
    # ``params`` as the recipe's typed ``Params``, made once by the loader
    # (:func:`recipe_params`); not a config key, not written out.
    resolved: Any = field(default=None, repr=False, compare=False, metadata={"internal": True})


@dataclass
class SchedulerConfig:
    name: Literal["warmup_cosine", "warmup_poly", "cosine_restarts", "constant"] = "warmup_cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    min_lr_ratio: float = 0.0
    power: float = 1.0  # warmup_poly
    restart_period: int = 100  # cosine_restarts: optimizer steps of the first cycle
    restart_mult: int = 1


@dataclass
class EarlyStoppingConfig:
    metrics: list[str] = field(default_factory=list)  # empty = off
    modes: list[Literal["min", "max"]] = field(default_factory=list)
    patience: int = 5  # validations without improvement of any metric
    min_delta: float = 0.0


@dataclass
class TrainConfig:
    strategy: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 where native, else fp32
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0 = run ``epochs`` epochs
    stop_at_step: int = 0  # leave early (as if preempted) keeping the full schedule
    grad_accum: int = 1
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    nesterov: bool = False
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    val_every_steps: int = 0  # 0 = use val_every_epochs
    val_every_epochs: float = 1.0  # may be a fraction, e.g. 0.25
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    log_every_steps: int = 10
    find_unused_parameters: bool = False
    # torch.compile of the training model (ddp, fsdp); the first steps pay for compilation
    compile: bool = False
    # conv nets: weights and 4-D image batches in channels-last (NHWC), faster with bf16 on GPUs
    channels_last: bool = False
    # FSDP2 / ZeRO-3: build the model with each parameter sliced over the ranks as soon as its
    # module is built (peak about 1/world of the model; the same initial weights, bit for bit).
    # (values YAML keeps as text: 'on'/'off' would read as booleans)
    # auto: with fsdp and ZeRO stage 3 at world > 1; always: the same, any other strategy refused;
    # never: every rank builds it whole
    low_memory_build: Literal["auto", "always", "never"] = "auto"


@dataclass
class CheckpointConfig:
    monitor: str = "loss"  # a validation metric name
    mode: Literal["min", "max"] = "min"
    top_k: int = 1
    every_steps: int = 0  # periodic checkpoints kept forever; 0 = off
    every_epochs: int = 0  # also kept forever: at the end of every N-th epoch; 0 = off


@dataclass
class LoggingConfig:
    tracking: Literal["tensorboard", "mlflow", "wandb", "none"] = "tensorboard"  # mlflow, wandb: dist_train/tracking.py
    # logging.tracking=mlflow: the tracking store; "" = sqlite:///<experiment.output_dir>/mlflow.db
    # (one store for every run of the output dir); a server URL or another store otherwise
    mlflow_uri: str = ""
    progress: bool = True
    plot: bool = True


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # A stopped rank blocks the others in a collective for this long before the
    # job fails; raise it when a first step (compilation, cold caches) is slower.
    timeout_s: int = 300
    # Intra-op CPU threads per rank: 0 = this host's usable cores / its ranks (at least 1).
    # OpenMP threads that outnumber the cores spin against each other: a rank sharing
    # cores with another process ran 5-20x slower (benchmarks/face_verification.py notes).
    cpu_threads: int = 0


@dataclass
class DeepSpeedConfig:
    config: str = path_field()


@dataclass
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


# --------------------------------------------------------------------------
# Building dataclasses from plain data, with one-line errors.


def _suggest(key: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return build_dataclass(tp, value, prefix=key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}"
                              f"{_suggest(str(value), [str(a) for a in args])}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:  # Optional[X]: X's own message says more
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads "3e-4" as a string; accept any float literal.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


# Keys earlier versions accepted: a user's config that still sets one gets one line
# saying so (as for any unknown key); a config stored in an older checkpoint or
# model.pt drops them (config_from_dict), since biomtl wrote it.
REMOVED_KEYS = {"checkpoint.save_last": "it never changed anything: checkpoints/latest is always kept",
                "recipe.params.grl_steps": "the photometric GRL schedule now runs over the whole training run "
                                           "(train.max_steps or train.epochs)"}


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "",
                    check_path: typing.Callable[[dataclasses.Field], bool] = lambda f: True) -> Any:
    """Instantiate ``cls`` from ``data`` checking keys, types and paths (the
    path fields for which ``check_path(field)`` holds must exist)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            if full in REMOVED_KEYS:
                raise ConfigError(f"{full}: removed ({REMOVED_KEYS[full]}); delete it from the config")
            raise ConfigError(f"unknown config key '{full}'{_suggest(str(key), fields)}")
        value = _coerce(value, hints[key], full)
        if fields[key].metadata.get("path") and value and check_path(fields[key]) \
                and not (fields[key].metadata.get("remote") and is_remote(value)) and not Path(value).exists():
            raise ConfigError(f"{full}: path does not exist: {value}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # a dataclass's own __post_init__ checks
        raise ConfigError(f"{prefix or 'config'}: {str(exc).splitlines()[0]}") from None


def to_dict(obj: Any) -> Any:
    """Plain data of a config dataclass (its internal fields left out)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_dict(v) for v in obj)
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


# --------------------------------------------------------------------------
# YAML from users: bounded. PyYAML composes nested nodes recursively (5 000
# levels are a RecursionError) and shares aliased nodes, so a 1 KB file can
# stand for 10**9 values that asdict / dump_config then copy one by one.

YAML_MAX_DEPTH = 64          # nesting levels; the configs use fewer than 6
YAML_MAX_VALUES = 100_000    # values once every alias is expanded
YAML_MAX_BYTES = 1 << 20     # a config file; the largest shipped is a few KB


class _InvalidYaml(ConfigError):
    """Text that is not YAML at all (an override value is then the plain string)."""


class _BoundedLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > YAML_MAX_DEPTH:
                raise ConfigError(f"YAML nested deeper than {YAML_MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_values(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Scalars + collections under ``node`` with aliases expanded (each node is
    counted once per reference; ``sizes`` memoises shared nodes)."""
    if id(node) not in sizes:
        sizes[id(node)] = YAML_MAX_VALUES + 1  # a node under itself (a recursive alias): refused too
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        sizes[id(node)] = min(1 + sum(_expanded_values(c, sizes) for c in children), YAML_MAX_VALUES + 1)
    return sizes[id(node)]


def load_yaml(text: str, where: str) -> Any:
    """The one reader of YAML that a user hands over (config files, ``base:``
    presets, override values): ``yaml.safe_load`` with the nesting depth and the
    alias expansion bounded; a breach or a syntax error is one ``ConfigError``
    line starting with ``where`` that quotes nothing of the text."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_values(node, {}) > YAML_MAX_VALUES:
            raise ConfigError(f"YAML aliases expand to more than {YAML_MAX_VALUES} values (a 'billion laughs'?)")
        return loader.construct_document(node)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]  # the problem; later lines quote the text
        raise _InvalidYaml(f"{where}: invalid YAML: {first}") from None
    finally:
        loader.dispose()


def read_yaml_file(path: Path, where: str) -> Any:
    """``path``'s YAML (:func:`load_yaml`); only a regular, small, UTF-8 file is read."""
    try:
        if path.stat().st_size > YAML_MAX_BYTES:
            raise ConfigError(f"{where}: larger than {YAML_MAX_BYTES >> 20} MiB, not a config file")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    return load_yaml(text, where)


# --------------------------------------------------------------------------
# Overrides and loading.


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = load_yaml(raw, f"override '{key}'") if raw.strip() else ""
    except _InvalidYaml:  # not YAML: the plain string the user typed
        value = raw
    return key.split("."), value


def apply_override(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{'.'.join(parts)}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


BASE_KEY = "base"  # a config file may name the file it builds on (a preset)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML tree of ``path`` merged over its ``base:`` file, recursively; a
    base that comes back round is refused. As documented, a base is a path
    relative to ``path``'s folder naming a .yaml/.yml file; a file whose top level
    is not config sections is refused without quoting it (it may be anything)."""
    if not path.is_file():
        where = f" (base of {chain[-1]})" if chain else ""
        raise ConfigError(f"--config: file not found: {path}{where}")
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in chain + (resolved,))
        raise ConfigError(f"--config {chain[0]}: '{BASE_KEY}' files form a cycle: {cycle}")
    loaded = read_yaml_file(path, f"--config {path}") or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping")
    _check_sections(path, loaded)
    base = loaded.pop(BASE_KEY, None)
    if base is None:
        return loaded
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"--config {path}: '{BASE_KEY}' must be the path of a config file, got {base!r}")
    if Path(base).is_absolute() or base.startswith("~"):
        raise ConfigError(f"--config {path}: '{BASE_KEY}' must be a path relative to {path.parent} "
                          f"(the config's own folder), e.g. ../dcal_twins.yaml")
    if Path(base).suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"--config {path}: '{BASE_KEY}' must name a .yaml or .yml file")
    return deep_merge(read_config_tree(path.parent / base, chain + (resolved,)), loaded)


def _check_sections(path: Path, tree: dict[Any, Any]) -> None:
    """Every top-level key is a section of :class:`Config` (or ``base``). An
    unknown key close to a section is a typo, named with the fix; otherwise the
    file is not a config and none of it is repeated."""
    sections = [f.name for f in dataclasses.fields(Config)] + [BASE_KEY]
    for key in tree:
        if key in sections:
            continue
        close = difflib.get_close_matches(str(key), sections, n=1, cutoff=0.6) if isinstance(key, str) else []
        if close:
            raise ConfigError(f"unknown config key '{key}' (did you mean '{close[0]}'?)")
        raise ConfigError(f"--config {path}: not a biomtl config (a top-level key is none of the sections "
                          f"{', '.join(sections)})")


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = (), start: bool = True) -> Config:
    """The config of a run. ``start=False``: the run resumes from a checkpoint,
    which holds the trained weights, so the files read only to start one
    (``start_only`` recipe params: ``init_from``, ``weights_path`` ...) need
    not exist any more."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_config_tree(Path(path))
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(tree, parts, value)
    cfg = build_dataclass(Config, tree)
    validate(cfg, start)
    return cfg


def validate(cfg: Config, start: bool = True) -> None:
    """Cross-field checks and the recipe's own parameters."""
    from recipes.base import get_recipe, recipe_names

    positive = {
        "data.batch_size": cfg.data.batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "train.epochs": cfg.train.epochs,
        "checkpoint.top_k": cfg.checkpoint.top_k,
        "train.log_every_steps": cfg.train.log_every_steps,
        "dist.timeout_s": cfg.dist.timeout_s,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    t, sch = cfg.train, cfg.train.scheduler
    for key, value in {"train.max_steps": t.max_steps, "data.num_workers": cfg.data.num_workers,
                       "train.stop_at_step": t.stop_at_step,
                       "train.val_every_steps": t.val_every_steps,
                       "checkpoint.every_steps": cfg.checkpoint.every_steps,
                       "checkpoint.every_epochs": cfg.checkpoint.every_epochs,
                       "dist.cpu_threads": cfg.dist.cpu_threads,
                       "data.shuffle_buffer": cfg.data.shuffle_buffer,
                       "train.grad_clip": t.grad_clip, "train.weight_decay": t.weight_decay,
                       "train.momentum": t.momentum, "train.scheduler.warmup_steps": sch.warmup_steps,
                       "train.early_stopping.min_delta": t.early_stopping.min_delta}.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    for key, value in {"train.scheduler.restart_period": sch.restart_period,
                       "train.scheduler.restart_mult": sch.restart_mult,
                       "train.early_stopping.patience": t.early_stopping.patience}.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if not 0 < t.lr <= MAX_LR:
        raise ConfigError(f"train.lr: must be > 0 and at most {MAX_LR:g}, got {t.lr}")
    if not 0 < cfg.dist.timeout_s <= MAX_TIMEOUT_S:
        raise ConfigError(f"dist.timeout_s: must be in [1, {MAX_TIMEOUT_S}] (7 days), got {cfg.dist.timeout_s}")
    if not 0 <= cfg.experiment.seed <= MAX_SEED:
        raise ConfigError(f"experiment.seed: must be in [0, {MAX_SEED}], got {cfg.experiment.seed}")
    if sch.power <= 0:
        raise ConfigError(f"train.scheduler.power: must be > 0, got {sch.power}")
    name = cfg.experiment.name
    if name in ("", ".", "..") or any(c in name for c in "/\\\0") or len(name) > 100:
        raise ConfigError(f"experiment.name: must be a single folder name (no '/', '\\', '..'; at most 100 "
                          f"characters), got {name[:100]!r}")
    if t.val_every_epochs <= 0:
        raise ConfigError(f"train.val_every_epochs: must be > 0, got {t.val_every_epochs}")
    if not 0.0 <= cfg.data.max_corrupt_fraction < 1.0:
        raise ConfigError(f"data.max_corrupt_fraction: must be in [0, 1), got {cfg.data.max_corrupt_fraction}")
    for key, value in {"train.scheduler.warmup_ratio": sch.warmup_ratio,
                       "train.scheduler.min_lr_ratio": sch.min_lr_ratio}.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}: must be in [0, 1], got {value}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas: expected two numbers in [0, 1), got {t.betas}")
    es = t.early_stopping
    if len(es.modes) != len(es.metrics):
        raise ConfigError("train.early_stopping.modes: needs one mode (min|max) per metric "
                          f"in train.early_stopping.metrics, got {len(es.modes)} for {len(es.metrics)}")
    if es.metrics and not validates(cfg):
        raise ConfigError(f"train.early_stopping.metrics: early stopping needs validation, but "
                          f"data.val_split is '{NO_SPLIT}'; set data.val_split or train.early_stopping.metrics=[]")
    if cfg.data.batching == "pk" and (cfg.data.pk_k < 1 or cfg.data.batch_size % cfg.data.pk_k):
        raise ConfigError(f"data.pk_k: must be >= 1 and divide data.batch_size ({cfg.data.batch_size}), "
                          f"got {cfg.data.pk_k}")
    if not 0.0 <= cfg.data.twin_prob <= 1.0:
        raise ConfigError(f"data.twin_prob: must be in [0, 1], got {cfg.data.twin_prob}")
    if cfg.data.source == "shards" and not cfg.data.shards:
        raise ConfigError("data.shards: required when data.source is 'shards'")
    if cfg.data.source == "synthetic":
        _check_synthetic(cfg)
    if cfg.data.source == "shards" and is_remote(cfg.data.shards) and cfg.data.batching != "stream":
        raise ConfigError(f"data.batching: {cfg.data.batching} reads samples by random access and needs local "
                          f"shards; data.shards is remote ({cfg.data.shards}): use data.batching=stream")
    if cfg.data.source == "shards" and not is_remote(cfg.data.shards) \
            and not (Path(cfg.data.shards) / "manifest.json").is_file():  # a remote one: preflight fetches it
        raise ConfigError(f"data.shards: no manifest.json in {cfg.data.shards}")
    for path in cfg.data.val_bins:
        if not Path(path).is_file():
            raise ConfigError(f"data.val_bins: file not found: {path}")
    if cfg.train.strategy == "deepspeed" and not cfg.deepspeed.config:
        raise ConfigError("deepspeed.config: required when train.strategy is 'deepspeed'")
    if cfg.train.strategy == "deepspeed" and (cfg.train.compile or cfg.train.channels_last):
        raise ConfigError("train.compile / train.channels_last: supported with train.strategy=ddp "
                          "(DeepSpeed has its own compile setting in its JSON config)")
    if cfg.train.low_memory_build == "always" and cfg.train.strategy == "ddp":
        raise ConfigError("train.low_memory_build: 'always' needs train.strategy=fsdp or deepspeed with ZeRO stage 3 "
                          "(DDP keeps the whole model on every rank); use auto or never")
    if cfg.train.strategy == "fsdp" and cfg.train.channels_last:
        raise ConfigError("train.channels_last: supported with train.strategy=ddp (FSDP shards parameters along "
                          "their first dimension)")
    try:
        get_recipe(cfg.recipe.name)
    except KeyError:
        raise ConfigError(f"recipe.name: unknown recipe '{cfg.recipe.name}'"
                          f"{_suggest(cfg.recipe.name, recipe_names())}; "
                          f"known: {', '.join(recipe_names())}") from None
    resolve_recipe_params(cfg, check_path=lambda f: start or not f.metadata.get("start_only"))


def synthetic_spec(cfg: Config) -> Any:
    """The built-in dataset ``data.synthetic`` describes (its cache folder is a hash of it)."""
    from shards.synthetic import SyntheticSpec

    s = cfg.data.synthetic
    return SyntheticSpec(num_identities=s.num_identities, samples_per_identity=s.samples_per_identity,
                         twin_fraction=s.twin_fraction, image_size=s.image_size, split_by=s.split_by,
                         modalities=tuple(s.modalities), seed=cfg.experiment.seed, base_faces=s.base_faces,
                         twin_style=s.twin_style)


def _check_synthetic(cfg: Config) -> None:
    """``data.synthetic`` by the generator's own rules (shards/synthetic/spec.py), one line naming the key."""
    from shards.synthetic import SpecError

    try:
        synthetic_spec(cfg)
    except SpecError as e:
        raise ConfigError(f"data.synthetic.{e.field}: {e.reason}") from None


def validates(cfg: Config) -> bool:
    """Whether the run validates (``data.val_split`` other than ``none``)."""
    return cfg.data.val_split.strip().lower() != NO_SPLIT


def resolve_recipe_params(cfg: Config, check_path: typing.Callable[[dataclasses.Field], bool] = lambda f: True) -> Any:
    """Make ``cfg.recipe.resolved``, the typed params (ConfigError on bad ``recipe.params``)."""
    from recipes.base import get_recipe

    cfg.recipe.resolved = build_dataclass(get_recipe(cfg.recipe.name).Params, cfg.recipe.params,
                                          prefix="recipe.params", check_path=check_path)
    return cfg.recipe.resolved


CACHE_ENV = "BIOMTL_CACHE"  # the cache folder of data biomtl generates, when the config names none


def synthetic_cache_dir(cfg: Config, output_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the synthetic sets (``synthetic-<hash>/``): ``data.synthetic.cache_dir``,
    else ``$BIOMTL_CACHE``, else ``cache/`` in the output folder (``output_dir``, by default the
    config's ``experiment.output_dir``; a command about a run passes the run's own parent)."""
    if cfg.data.synthetic.cache_dir:
        return Path(cfg.data.synthetic.cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(output_dir if output_dir is not None else cfg.experiment.output_dir) / "cache"


def recipe_params(cfg: Config) -> Any:
    """The recipe's typed params, resolved once when the config was loaded."""
    return cfg.recipe.resolved if cfg.recipe.resolved is not None else resolve_recipe_params(cfg)


def resolved_config_dict(cfg: Config) -> dict[str, Any]:
    tree = to_dict(cfg)
    tree["recipe"]["params"] = to_dict(recipe_params(cfg))  # resolved, with defaults
    return tree


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config saved in a checkpoint (paths there need not exist here),
    its recipe params resolved."""
    tree = _without_removed_keys(tree)
    cfg = build_dataclass(Config, {**tree, "data": {**tree["data"], "shards": ""},
                                   "deepspeed": {"config": ""}})
    cfg.data.shards = tree["data"].get("shards", "")
    resolve_recipe_params(cfg, check_path=lambda f: False)
    return cfg


def _without_removed_keys(tree: dict[str, Any]) -> dict[str, Any]:
    out = dict(tree)
    for dotted in REMOVED_KEYS:
        *sections, key = dotted.split(".")
        node = out
        for section in sections:  # copy the path down to the key, never the caller's dicts
            if not isinstance(node.get(section), dict):
                break
            node[section] = dict(node[section])
            node = node[section]
        else:
            node.pop(key, None)
    return out


def config_changes(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf that differs
    between two resolved config dicts (a resumed checkpoint's and this run's)."""
    if prefix.rstrip(".") in REMOVED_KEYS:  # an older checkpoint's: no setting of this run
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            out += config_changes(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(resolved_config_dict(cfg), sort_keys=False)
