"""The one validated config of a jlstm run: YAML in `configs/` plus `--set key=value` overrides.

Every section refuses unknown keys and bad values before any work starts; the error names
the key, the value given and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from data_shards.clip_spec import ClipSpec
from data_shards.config import DataConfig
from model import VARIANTS, ModelConfig, model_config
from orchestration.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainConfig(_Section):
    """How to optimize: the paper's batch 64 and zeta = 1e-5 are the defaults."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch, split over the workers")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-5, ge=0, description="zeta: the optimizer's weight decay")
    lr_schedule: Literal["cosine", "constant", "step"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    step_size: int = Field(10, ge=1, description="epochs per 10x decay for lr_schedule=step")
    grad_clip: float | None = Field(5.0, gt=0)
    seed: int = 0
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto",
        description="capture the training step as one CUDA graph (orchestration/graphed_step.py); "
        "auto: on a CUDA device with optimizer adamw, eager elsewhere; on: refuse to run "
        "without them",
    )
    precision: Literal["bf16", "fp32"] = Field(
        "bf16",
        description="the training step's arithmetic on CUDA: bf16 autocast (the default) or "
        "fp32 throughout; the CPU always trains in fp32",
    )

    @field_validator("cuda_graphs", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on / off (`--set train.cuda_graphs=off`) as a boolean.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _check_cuda_graphs(self) -> TrainConfig:
        if self.cuda_graphs == "on" and self.optimizer != "adamw":
            raise ValueError(
                f"train.cuda_graphs = on needs train.optimizer = adamw (got {self.optimizer!r}): "
                "the graphed step uses fused, capturable AdamW; set cuda_graphs to auto or off"
            )
        return self


class ClusterConfig(_Section):
    """Where and how wide to train (sized by `orchestration/resources.py`).

    `cpus_per_worker: null` means 2 CPUs beside each worker's GPU on a GPU cluster, and on
    a CPU-only cluster an equal share of what Ray Data's reserve leaves.

    Elastic training: with `min_workers` below `num_workers`, a run starts with as many
    workers as fit (at least `min_workers`), goes on with fewer when a node is lost and
    grows back to `num_workers` when nodes come (Ray Train's `ScalingConfig(num_workers=
    (min, max))`; every resize restarts the workers from the last epoch's checkpoint).
    """

    num_workers: int = Field(2, ge=1, description="workers to train with (the most, elastic)")
    min_workers: int | None = Field(
        None, ge=1,
        description="the fewest workers a run trains with; below num_workers the run is "
        "elastic; default: num_workers (a fixed size)",
    )
    resize_interval_s: float = Field(
        60.0, gt=0,
        description="elastic runs: how often Ray Train looks for room to grow the workers",
    )
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(None, gt=0)
    wait_for_resources_s: float = Field(
        600.0, ge=0,
        description="on a cluster jlstm joined (RAY_ADDRESS), how long to wait for it to grow "
        "to the plan before refusing; a local Ray jlstm started never waits",
    )
    max_failures: int = Field(
        2, ge=-1, description="restarts after worker errors (a lost node counts); -1: no limit"
    )
    max_preemption_failures: int = Field(
        -1, ge=-1,
        description="restarts after node preemptions (spot or preemptible nodes), counted "
        "apart from max_failures; -1: no limit",
    )
    storage_path: str = "runs/ray"
    checkpoints_to_keep: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _check_min_workers(self) -> ClusterConfig:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(
                f"cluster.min_workers = {self.min_workers} is more than cluster.num_workers = "
                f"{self.num_workers}: set min_workers <= num_workers"
            )
        return self

    @property
    def fewest_workers(self) -> int:
        """The fewest workers a run trains with (`min_workers`, else `num_workers`)."""
        return self.min_workers or self.num_workers

    @property
    def elastic(self) -> bool:
        """Whether the run may change its number of workers."""
        return self.fewest_workers < self.num_workers


class TrackingConfig(_Section):
    """MLflow: the URI comes from MLFLOW_TRACKING_URI or the SQLite store under runs/."""

    experiment: str = "jlstm"
    register_model: bool = True
    registered_model: str | None = Field(
        None, description="registry name; default jlstm-<dataset> (the demo: jlstm-demo)"
    )
    attention_examples: int = Field(3, ge=0, description="test videos drawn as attention grids")
    system_metrics_interval_s: float | None = Field(
        10.0, gt=0, description="MLflow system metrics (CPU, memory, GPU) from every training "
        "node, sampled this often; null turns them off",
    )


class JlstmConfig(_Section):
    """A whole run: which variant of the network, on which data, trained how."""

    variant: str = "late_fusion"
    run_name: str | None = None
    model: dict[str, Any] = Field(default_factory=dict, description="overrides of the variant")
    data: DataConfig
    train: TrainConfig = TrainConfig()
    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _check_model(self) -> JlstmConfig:
        if self.variant not in VARIANTS:
            raise ValueError(
                f"variant = {self.variant!r} is not one of {sorted(VARIANTS)}"
            )
        if self.train.cuda_graphs == "on" and not self.cluster.use_gpu:
            raise ValueError(
                "train.cuda_graphs = on needs CUDA: set cluster.use_gpu = true, or "
                "train.cuda_graphs = auto (graphs where CUDA is) or off"
            )
        if "num_classes" in self.model:
            raise ValueError("model.num_classes is read from the dataset's manifest; remove it")
        # num_classes is unknown until the manifest exists; 2 stands in so every other
        # model key is checked now, before any work starts.
        try:
            model = self.resolve_model(num_classes=2)
        except ValidationError as err:
            raise ValueError(_format_errors(err, prefix="model.")) from None
        trained = ClipSpec.of(model).trained
        if trained and self.data.use_feature_cache:
            raise ValueError(
                f"model.inputs {list(trained)} are trained with the network, so the feature "
                "cache cannot hold them: set data.use_feature_cache = false, or use a frozen "
                "input instead (flow for flow_cnn)"
            )
        return self

    def resolve_model(self, num_classes: int) -> ModelConfig:
        return model_config(self.variant, num_classes=num_classes, **self.model)

    def clip_spec(self, num_classes: int) -> ClipSpec:
        """What the data side reads of the resolved model (`data_shards.clip_spec`); from
        the model config of `num_classes`, so the model's checks run first, as before."""
        return ClipSpec.of(self.resolve_model(num_classes))

    def resolved_run_name(self) -> str:
        return self.run_name or f"{self.data.dataset}-split{self.data.split}-{self.variant}"


def _format_errors(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = prefix + ".".join(str(part) for part in e["loc"])
        given = e.get("input")
        value = "" if isinstance(given, dict) else f" = {given!r}"
        lines.append(f"{key or '<config>'}{value}: {e['msg']}")
    return "; ".join(lines)


def parse_override(override: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", value), the value parsed as YAML (numbers, booleans,
    null and lists get their natural types)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected key=value, e.g. train.lr=0.01")
    try:
        return key.strip(), yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "not a YAML value"
        raise ConfigError(f"--set {override!r}: {problem}; quote strings, e.g. k='a: b'") from None


# Two names of one key (`model.taps` is the old name of `model.inputs`): setting either one,
# by an override, a sweep or a config over its base, replaces the other.
SAME_KEYS = {"model.inputs": "model.taps", "model.taps": "model.inputs"}


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """`raw["a"]["b"] = value` for key `a.b`, creating sections; refuses a non-section."""
    *sections, leaf = key.split(".")
    node = raw
    for part in sections:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is not a section of the config")
        node = child
    if key in SAME_KEYS:
        node.pop(SAME_KEYS[key].rpartition(".")[2], None)
    node[leaf] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `a.b.c=value` applied (value parsed as YAML)."""
    merged = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for override in overrides:
        set_dotted(merged, *parse_override(override))
    return merged


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping in YAML file `path`; ConfigError naming the file when it is missing, not
    YAML, or not a mapping."""
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML: fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def validate_config(raw: dict[str, Any], source: str = "<config>") -> JlstmConfig:
    try:
        return JlstmConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_format_errors(err)}") from None


BASE_KEY = "base_config"


def deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """`base` with `child` laid over it: sections merge key by key, anything else (values,
    lists) is replaced by the child's. Neither argument is changed."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    model = child.get("model")
    if isinstance(model, dict) and isinstance(merged.get("model"), dict):
        for key in ("inputs", "taps"):  # the child's name of the inputs replaces the base's
            if key in model:
                merged["model"].pop(SAME_KEYS[f"model.{key}"].rpartition(".")[2], None)
                merged["model"][key] = model[key]
    return merged


def read_config_raw(path: str | Path) -> dict[str, Any]:
    """The mapping of run config `path` with its `base_config` chain resolved.

    A config may name `base_config: <path relative to this file>`: the base is read first
    (itself maybe with a base) and this file's keys are merged over it, so the paper's
    settings live once per dataset and each variant's file says only what differs. A
    missing base or a cycle is a ConfigError naming the file.
    """
    chain: list[Path] = []
    raw: dict[str, Any] = {}
    current: Path | None = Path(path)
    layers: list[dict[str, Any]] = []
    while current is not None:
        resolved = current.resolve()
        if resolved in chain:
            cycle = " -> ".join(str(p) for p in [*chain, resolved])
            raise ConfigError(f"{chain[-1]}: {BASE_KEY} makes a cycle: {cycle}")
        what = "config file" if not chain else f"{BASE_KEY} of {chain[-1]}:"
        layer = read_yaml_mapping(current, what)
        chain.append(resolved)
        base = layer.pop(BASE_KEY, None)
        layers.append(layer)
        if base is None:
            current = None
        elif not isinstance(base, str) or not base:
            raise ConfigError(f"{current}: {BASE_KEY} = {base!r}: expected a YAML file path")
        else:
            current = resolved.parent / base
    for layer in reversed(layers):
        raw = deep_merge(raw, layer)
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> JlstmConfig:
    """Read a YAML config (with its `base_config` chain), apply `--set` overrides, make
    its paths absolute (`resolve_paths`), validate; raise ConfigError naming the key."""
    raw = apply_overrides(read_config_raw(path), overrides or [])
    resolve_paths(raw)
    return validate_config(raw, source=str(path))


# Every filesystem path a run config holds, as (section, key). Each is made absolute when
# the config is loaded, against the caller's working directory: Ray Train runs each worker
# in a folder of its own, and Tune each trial, so a relative path would point elsewhere
# there (the demo's relative cache once failed every clip that way).
PATH_KEYS: tuple[tuple[str, str], ...] = (
    ("data", "root"), ("data", "splits_dir"), ("data", "manifest"), ("data", "feature_cache"),
    ("model", "backbone_weights"), ("cluster", "storage_path"),
)


def is_uri(path: str) -> bool:
    """Whether `path` names remote storage (s3://, gs://, ...) rather than a local path."""
    return "://" in path


def absolute_path(path: str) -> str:
    """A URI as is; a local path made absolute against the current working directory."""
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def resolve_paths(raw: dict[str, Any]) -> None:
    """Make every local path of run config mapping `raw` (`PATH_KEYS`) absolute, in place."""
    for section, key in PATH_KEYS:
        value = (raw.get(section) or {}).get(key)
        if isinstance(value, str) and value:
            raw[section][key] = absolute_path(value)


def config_to_yaml(cfg: JlstmConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
