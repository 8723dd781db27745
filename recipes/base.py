"""The contract between the trainer and a recipe.

A recipe is data in, losses and metrics out. The trainer only ever talks to a
recipe through this interface and finds recipes through the registry, so a new
recipe (THz, photometric, ear, ...) is one module in ``recipes/`` plus a config
file. A recipe knows nothing about distribution: metric states are gathered by
the trainer, and what ``write_artifacts`` needs (a gather function, a way to
publish files atomically, the raw images of a split) comes in an
:class:`ArtifactContext`.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from shards.manifest import DataInfo

__all__ = ["ArtifactContext", "DataInfo", "EmbeddingModel", "EvalContext", "Metrics", "ParallelContext", "Recipe",
           "RecipeDataError",
           "START_ONLY", "get_recipe", "has_attention_rollout", "recipe_names", "register", "start_file", "start_option",
           "without_start_files"]

# Field metadata of a recipe param read only to start a run's weights (a local
# weights file, a previous run's model, hub weights): a checkpoint already holds
# what it gave, so rebuilding a recipe from a checkpoint or a model file, or
# resuming, neither needs nor reads it (:func:`without_start_files`).
START_ONLY = "start_only"


def start_file(**kw: Any) -> Any:
    """A path param read only to start a run (must exist then, and only then)."""
    return dataclasses.field(default="", metadata={"path": True, START_ONLY: True}, **kw)


def start_option(default: Any = False) -> Any:
    """A non-path param that only says where the starting weights come from (``pretrained``)."""
    return dataclasses.field(default=default, metadata={START_ONLY: True})


def without_start_files(params: Any) -> Any:
    """``params`` with every start-only field off (``""`` / ``False``): the recipe
    then builds its model without reading or downloading starting weights."""
    off = {f.name: ("" if isinstance(getattr(params, f.name), str) else False)
           for f in dataclasses.fields(params) if f.metadata.get(START_ONLY)}
    return dataclasses.replace(params, **off) if off else params


@runtime_checkable
class EmbeddingModel(Protocol):
    """What ``biomtl eval`` / ``verify`` / ``extract`` / ``demo`` / ``predict`` need
    of a recipe's model: ``embed(images [B, C, H, W]) -> [B, D]``. Optional:
    ``attention_rollout(images) -> [B, H', W']`` (``verify --show-attention``,
    the demo's attention picture; DCAL)."""

    def embed(self, images: torch.Tensor) -> torch.Tensor: ...


def has_attention_rollout(model: Any) -> bool:
    """Whether the optional part of :class:`EmbeddingModel` is there."""
    return callable(getattr(model, "attention_rollout", None))


class RecipeDataError(ValueError):
    """The recipe cannot train on these data (e.g. a modality it needs is missing).
    Raised from ``Recipe.__init__``; the trainer reports it as one line, exit 2."""


@dataclass(frozen=True)
class ParallelContext:
    """The training ranks, for a model part split across them (a sharded identity
    head, :mod:`recipes.identity_head`): this rank, their number, the process group
    (``None``: the default group). The trainer hands it over with
    :meth:`Recipe.use_ranks` before ``build_model``; a recipe rebuilt to evaluate,
    export or serve a model keeps the default, a world of one (every centre in one
    process). ``training``: set by the trainer (a one-process run says once that a
    sharded head is a plain one there)."""

    rank: int = 0
    world: int = 1
    group: Any = None
    training: bool = False


class Metrics:
    """Accumulates per-rank state during evaluation; the trainer gathers the
    states of all ranks and calls :meth:`compute` with the list, so every rank
    obtains the same numbers."""

    def update(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def state(self) -> Any:
        """A picklable summary of what this rank saw."""
        raise NotImplementedError

    @staticmethod
    def compute(states: list[Any]) -> dict[str, float]:
        raise NotImplementedError


@dataclass
class ArtifactContext:
    """What the trainer hands to :meth:`Recipe.write_artifacts`.

    ``loaders``: evaluation loaders by role (``"val"``, ``"test"``; a role is
    missing when the data has no such split). ``gather(obj)``: every rank's
    ``obj`` as a list, in rank order (``[obj]`` on one process); every rank
    must call it the same number of times. ``publish(path, write)``: calls
    ``write(tmp_path)`` and renames the result to ``path`` atomically.
    ``read_images(role, keys)``: ``{key: PIL.Image}`` straight from the shards
    of that role's split (for pictures of hard cases). ``validation_history``:
    the rows logged at each validation so far (``step``, ``epoch``, the metrics;
    resumed runs included), on rank 0 (empty elsewhere; plot it with
    :func:`recipes.history_plots.plot_history`)."""

    run_dir: Path
    is_main: bool
    loaders: Mapping[str, Iterable[Any]]
    gather: Callable[[Any], list[Any]]
    publish: Callable[[Path, Callable[[Path], None]], Path]
    read_images: Callable[[str, Sequence[str]], dict[str, Any]]
    validation_history: Sequence[Mapping[str, Any]] = ()


@dataclass
class EvalContext:
    """What ``biomtl eval`` hands to :meth:`Recipe.eval_report` (one process).

    ``loader()``: the evaluated split's batches (the recipe's eval transform,
    padding rows ``_valid=False``). ``table``: the split's embedding table
    (:func:`recipes.verification.embed_batches`) and ``pairs`` the verification
    pairs on it (the command's protocol: ``--pairs``, the dataset's pairs, else
    generated); ``threshold`` with ``threshold_source`` as resolved by the
    command. ``publish`` writes files atomically; ``extra`` is what the standard
    report records about the run (checkpoint, data, split, recipe)."""

    out_dir: Path
    split: str
    data_dir: Path
    loader: Callable[[], Iterable[Any]]
    table: Mapping[str, Any]
    pairs: Any
    threshold: float | None
    threshold_source: str
    publish: Callable[[Path, Callable[[Path], None]], Path]
    identity_names: Sequence[str]
    extra: Mapping[str, Any]
    device: torch.device
    seed: int = 0
    progress: bool = False


class Recipe:
    """Base class of all recipes. Subclasses set ``name`` and ``Params``."""

    name: ClassVar[str]
    # A dataclass holding the recipe's own options; the config loader validates
    # ``recipe.params`` from YAML/overrides against it (types, unknown keys).
    Params: ClassVar[type]

    # a world of one until the trainer says otherwise (use_ranks)
    parallel: ParallelContext = ParallelContext()
    # Training forward passes (micro-batches) of the whole run: set by the trainer before
    # build_model, for schedules that follow the run's progress (the photometric GRL).
    # None where no run is being trained (inference, export, a model built alone).
    train_forwards: int | None = None
    # Loads any biomtl model file (a run's model.pt, a checkpoint, a run directory) as a frozen
    # module with ``embed(images)``, on the training device: set by the trainer before build_model
    # (``dist_train.inference.load_frozen_model``, the owner of rebuilding a model from its file),
    # for teachers a recipe distils from. None where no run is being trained.
    frozen_model_loader: Callable[[str], nn.Module] | None = None

    def __init__(self, params: Any, data_info: DataInfo):
        self.params = params
        self.data_info = data_info

    def use_ranks(self, parallel: ParallelContext) -> None:
        """The trainer's ranks, before ``build_model``. A recipe that cannot use them
        (a sharded head with more ranks than identities) raises
        :class:`RecipeDataError` with one line; the run then stops before it writes."""
        self.parallel = parallel

    # --- data -------------------------------------------------------------
    def transform(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        """Turn one decoded shard sample into tensors (runs in data workers).

        ``sample`` maps shard extensions to decoded values: image members ->
        ``PIL.Image``, ``*.npy`` -> ``np.ndarray``, ``json`` -> dict, plus
        ``__key__``. Torch's, NumPy's and Python's global RNGs are seeded per
        sample by the stream before this is called, so random augmentations
        are reproducible and resumable.
        """
        raise NotImplementedError

    # --- model ------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """A module whose ``forward(batch)`` returns a dict with ``loss`` (a
        scalar tensor), ``terms`` (dict of scalar tensors, each loss term) and
        whatever the metrics need. Loss weights that are learned live inside
        this module so every strategy (DDP, DeepSpeed) optimises them."""
        raise NotImplementedError

    # --- features (``biomtl extract --feature-type``) ----------------------
    def feature_types(self) -> tuple[str, ...]:
        """The kinds of features this recipe's model gives (``biomtl extract
        --feature-type``); the first is what ``model.embed`` returns."""
        return ("embedding",)

    def embed_as(self, model: nn.Module, images: torch.Tensor, feature_type: str) -> torch.Tensor:
        """``[B, D]`` features of ``feature_type`` (one of :meth:`feature_types`)."""
        return model.embed(images)

    def param_groups(self, model: nn.Module, base_lr: float) -> list[dict[str, Any]] | None:
        """Optional per-group options (e.g. a smaller LR for a pretrained backbone)."""
        return None

    # --- evaluation ---------------------------------------------------------
    def new_metrics(self) -> Metrics:
        raise NotImplementedError

    @classmethod
    def validation_metric_names(cls, params: Any) -> frozenset[str]:
        """Every name ``new_metrics().compute`` may return with these ``params``
        (a metric the data cannot give, e.g. an attribute without labels, may be
        missing at run time; the trainer adds ``loss``). ``checkpoint.monitor`` and
        ``train.early_stopping.metrics`` are checked against it before a run
        starts, so a misspelt name is an error, not a run without ``best.pt``.
        Every recipe declares it; a class method, since it is asked before the
        data (which the recipe needs to be built) exist."""
        raise NotImplementedError(f"recipe {cls.name} does not declare its validation metric names")

    def validation_images(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Optional pictures of the first validation batch (the same samples every
        time), logged to TensorBoard as ``val/<tag>`` at every validation on rank 0:
        ``{tag: [3|1, H, W] float in [0, 1]}``, e.g. input | output | target grids.
        With :meth:`validation_picture_rows` > 0, ``outputs`` and ``batch`` hold the
        drawn rows instead (their tensors with one row per sample; nested dicts and
        scalars such as ``loss`` and ``terms`` are left out)."""
        return {}

    def validation_picture_rows(self) -> int:
        """Optional: ``k > 0`` makes :meth:`validation_images` show ``k`` rows drawn at
        random from rank 0's validation rows, a new draw at every validation epoch,
        the same for the same ``(experiment.seed, epoch)`` (a resumed run too), drawn
        with a generator of its own so no global RNG moves
        (:mod:`dist_train.picture_draw`). 0 (the default): the first validation batch."""
        return 0

    def validation_image_file(self, tag: str, epoch: int) -> str | None:
        """Optional: also save the picture ``tag`` of :meth:`validation_images` as a PNG
        at this path, relative to the run directory (rank 0, atomically; e.g.
        ``f"collages/epoch_{epoch:04d}.png"``). ``epoch``: epochs completed when the
        validation ran. ``None`` (the default): TensorBoard only."""
        return None

    def on_epoch_start(self, model: nn.Module, epoch: int, ctx: ArtifactContext) -> None:
        """Optional: runs on every rank before training epoch ``epoch`` (0-based) starts,
        the first one included, with ``model`` (the bare module, not a DDP wrapper) in
        eval mode. ``ctx.loaders["train"]``: the training split through the evaluation
        transform, every sample once over all ranks (padding rows ``_valid=False``);
        ``ctx.gather`` as in :meth:`write_artifacts` (every rank calls it equally often).
        Use it for state recomputed from the data now and then (e.g. pseudo-labels):
        keep that state in the model (buffers or ``get_extra_state``) so checkpoints
        carry it, since a run resumed in the middle of an epoch does not call the hook
        again. The trainer restores the global RNG states afterwards; parameters
        changed here keep their optimizer state (a ZeRO strategy keeps its own master
        copy of them: change buffers, not parameters, there)."""
        return None

    def export_for_inference(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[str, Any, dict[str, Any]]:
        """What the exported ``model.pt`` holds: ``(recipe name, its Params, weights)``.
        Default: this recipe as trained. A recipe trained with privileged inputs
        (a teacher that sees modalities inference never has) returns its
        student's recipe and weights, so inference needs only what it will have."""
        return self.name, self.params, dict(state_dict)

    def deploy_inputs(self) -> dict[str, tuple[int, ...]] | None:
        """The inputs of the deployment graph (``biomtl export --format onnx|torchscript``)
        when the model reads named maps rather than one image: ``{name: per-sample shape}``
        of float32 tensors as the evaluation transform makes them, and the model has
        ``predict({name: batch}) -> {output: tensor}``. None (default): one image input."""
        return None

    def write_artifacts(self, model: nn.Module, ctx: ArtifactContext) -> dict[str, float]:
        """Called once after training on every rank; rank 0 (``ctx.is_main``)
        writes recipe-specific pictures and files. Returns test metrics."""
        return {}

    @classmethod
    def check_start_files(cls, params: Any) -> None:
        """Optional: check what a fresh run reads to start (the ``start_only``
        params, e.g. that an ``init_from`` file fits this model), before any run
        directory exists; raise ``ValueError`` with one line. Not called on
        ``--resume`` nor when a model is rebuilt from a checkpoint."""
        return None

    @classmethod
    def frozen_model_files(cls, params: Any) -> dict[str, str]:
        """Optional: ``{param name: path}`` of the model files training loads frozen through
        ``frozen_model_loader`` (a distillation teacher), fresh runs and resumes alike. The
        preflight loads each once, so a missing or unreadable one is one line, exit 2, before
        any run directory exists; raise ``ValueError`` (one line) for params that contradict."""
        return {}

    def eval_report(self, model: nn.Module, ctx: EvalContext) -> dict[str, Any] | None:
        """Optional: a recipe-specific ``biomtl eval`` report written into
        ``ctx.out_dir`` (``model`` is in eval mode on ``ctx.device``); returns its
        metrics. ``None`` (the default) means: the standard verification report."""
        return None


_REGISTRY: dict[str, type[Recipe]] = {}


def register(cls: type[Recipe]) -> type[Recipe]:
    """Add a recipe under its ``name``; a name already taken by another class is
    an error (the same class registered again, e.g. its module reloaded, replaces it)."""
    if not dataclasses.is_dataclass(cls.Params):
        raise TypeError(f"{cls.__name__}.Params must be a dataclass")
    taken = _REGISTRY.get(cls.name)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"recipe name {cls.name!r} is taken by {taken.__module__}.{taken.__qualname__}; "
                         f"{cls.__module__}.{cls.__qualname__} needs another name")
    _REGISTRY[cls.name] = cls
    return cls


def recipe_names() -> list[str]:
    _import_builtin_recipes()
    return sorted(_REGISTRY)


def get_recipe(name: str) -> type[Recipe]:
    _import_builtin_recipes()
    if name not in _REGISTRY:
        raise KeyError(name)
    return _REGISTRY[name]


_HELPER_MODULES = {"base", "batch", "bin_verification", "history_plots", "identity_head", "image_input",
                   "init_weights", "labels", "metrics_json", "model_file", "param_docs", "verification",
                   "verification_plots"}


def _import_builtin_recipes() -> None:
    """Import every recipe module of this package (importing one registers it),
    so adding a recipe touches no list anywhere."""
    import recipes

    for info in pkgutil.iter_modules(recipes.__path__):
        if info.name not in _HELPER_MODULES and not info.name.startswith("_"):
            importlib.import_module(f"recipes.{info.name}")
