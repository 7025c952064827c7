"""Search spaces as data: a sweep YAML names a base run config, overrides and the space.

    name: tune-demo
    base_config: configs/demo.yaml         # any `jlstm train` config
    overrides: {train.epochs: 4}           # dotted keys, applied to every trial
    space:                                 # dotted key -> one distribution
      model.attention_reg_weight: {loguniform: [1, 10000]}
      train.weight_decay: {loguniform: [1.0e-6, 1.0e-3]}
      model.fusion: {choice: [early, late]}
      model.inputs: {choice: [[pool4], [conv5_3], [pool4, conv5_3], [pool4, conv5_3, flow]]}

`{grid: [...]}` runs every value (Ray Tune's `grid_search`): each of the `num_samples`
repetitions runs every combination of the grids, with the other keys sampled anew.
Any key of the run config can be swept without code. Every key, each end of its range
and each choice are validated against `JlstmConfig` when the sweep is loaded, so a typo
or an impossible value is refused (naming the key) before any trial starts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestration.config import (
    parse_override,
    read_config_raw,
    read_yaml_mapping,
    resolve_paths,
    set_dotted,
    validate_config,
)
from orchestration.errors import ConfigError
from orchestration.metrics import VIDEO_TOP1_VOTE

# The paper's setting (Wu et al. 2016): lambda = 1000, zeta = 1e-5, late fusion, 2 branches.
PAPER_POINT: dict[str, Any] = {
    "model.attention_reg_weight": 1000.0,
    "train.weight_decay": 1e-5,
    "model.fusion": "late",
    "model.taps": ["pool4", "conv5_3"],
}
# The paper's point under either name of the inputs a space may sweep.
_PAPER_VALUES = {**PAPER_POINT, "model.inputs": PAPER_POINT["model.taps"]}
# Set by the sweep for every trial (run name, storage) or the same for all trials by design
# (resources are planned once per sweep), so a space may not vary them.
RESERVED_PREFIXES = ("run_name", "cluster.")
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
LISTED = ("choice", "grid")  # the kinds that list their values


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Dimension(_Strict):
    """One swept key: a range (`loguniform`, `uniform`, `randint` inclusive), a `choice`
    sampled from, or a `grid` whose every value runs."""

    kind: Literal["loguniform", "uniform", "randint", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    options: list[Any] | None = None

    @classmethod
    def parse(cls, key: str, spec: Any) -> Dimension:
        """`{loguniform: [lo, hi]}` etc. -> Dimension; ValueError naming `key` otherwise."""
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ValueError(f"{key}: expected one of {{{', '.join(DISTRIBUTIONS)}}}: ..., "
                             f"got {spec!r}")
        (kind, args), = spec.items()
        if kind not in DISTRIBUTIONS:
            raise ValueError(f"{key}: unknown distribution {kind!r}; use one of {DISTRIBUTIONS}")
        if kind in LISTED:
            if not isinstance(args, list) or not args:
                raise ValueError(f"{key}: {kind} needs a non-empty list, got {args!r}")
            return cls(kind=kind, options=args)
        if (
            not isinstance(args, list | tuple)
            or len(args) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in args)
        ):
            raise ValueError(f"{key}: {kind} needs [low, high] numbers, got {args!r}")
        low, high = args
        if low > high:
            raise ValueError(f"{key}: {kind} low = {low!r} > high = {high!r}")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"{key}: loguniform needs low > 0, got {low!r}")
        if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
            raise ValueError(f"{key}: randint needs integer bounds, got {args!r}")
        return cls(kind=kind, low=low, high=high)

    @property
    def encoded(self) -> bool:
        """Whether choices travel through Tune as JSON text.

        Optuna's categorical distribution takes only scalars, so a choice of lists (the
        branch sets) is passed as JSON strings and decoded in the trial.
        """
        return self.kind in LISTED and any(
            not isinstance(o, str | int | float | bool | None) for o in self.options or []
        )

    def corners(self) -> list[Any]:
        """The values that bound the dimension: both ends of a range, or every listed one."""
        if self.kind in LISTED:
            return list(self.options or [])
        if self.kind == "randint":
            return [int(self.low or 0), int(self.high or 0)]
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        if self.kind in LISTED:
            return value in (self.options or [])
        return (
            isinstance(value, int | float)
            and float(self.low or 0) <= value <= float(self.high or 0)
            and (self.kind != "randint" or float(value).is_integer())
        )

    def to_tune(self) -> Any:
        """The Ray Tune domain (choices JSON-encoded when `encoded`)."""
        from ray import tune

        if self.kind in LISTED:
            options = [self.encode(o) for o in self.options or []]
            return tune.choice(options) if self.kind == "choice" else tune.grid_search(options)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        return tune.randint(int(self.low or 0), int(self.high or 0) + 1)  # Tune's is exclusive

    def encode(self, value: Any) -> Any:
        return json.dumps(value) if self.encoded else value

    def decode(self, value: Any) -> Any:
        return json.loads(value) if self.encoded else value


class AshaConfig(_Strict):
    """ASHA early stopping on the reported `epoch`; `max_t: null` means `train.epochs`."""

    grace_period: int = Field(1, ge=1, description="epochs every trial runs before a cut")
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1)


class SweepConfig(_Strict):
    """A whole sweep: the base run config, what varies, how trials are scheduled."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Tune experiment and run prefix")
    base_config: str = Field(description="a `jlstm train` config YAML")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value")
    space: dict[str, Dimension]
    include_paper_point: bool = True
    use_feature_cache: bool = Field(
        True, description="trials read cached VGG16 taps (sets data.use_feature_cache)"
    )
    num_samples: int = Field(
        8, ge=1, description="trials in all, the paper's point included; each repetition "
        "runs every combination of the grids",
    )
    metric: str = VIDEO_TOP1_VOTE
    mode: Literal["max", "min"] = "max"
    asha: AshaConfig | None = AshaConfig()
    searcher: Literal["random", "optuna"] = "random"
    seed: int | None = 0
    max_failures: int = Field(1, ge=0, description="retries of a failed trial")
    max_concurrent_trials: int | None = Field(None, ge=1, description="upper bound")
    trial_cpus: float = Field(0.01, gt=0, description="CPU held by each trial's driver function")
    storage_path: str | None = Field(None, description="default: the base cluster.storage_path")

    @field_validator("space", mode="before")
    @classmethod
    def _parse_space(cls, space: Any) -> dict[str, Dimension]:
        if not isinstance(space, dict) or not space:
            raise ValueError(f"space must map dotted config keys to distributions, got {space!r}")
        parsed = {}
        for key, spec in space.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"space key {key!r} must be a dotted config key")
            if key.startswith(RESERVED_PREFIXES):
                raise ValueError(f"{key}: set by the sweep for every trial; it cannot be swept")
            parsed[key] = spec if isinstance(spec, Dimension) else Dimension.parse(key, spec)
        return parsed

    @model_validator(mode="after")
    def _grid_needs_the_random_searcher(self) -> SweepConfig:
        grids = [key for key, dim in self.space.items() if dim.kind == "grid"]
        if grids and self.searcher != "random":
            raise ValueError(f"space {grids}: grid needs searcher: random (Optuna samples)")
        return self

    @property
    def num_trials(self) -> int:
        """Trials in all: num_samples times every grid's length (Tune's grid_search)."""
        return self.num_samples * math.prod(
            len(dim.options or []) for dim in self.space.values() if dim.kind == "grid"
        )

    def tune_space(self) -> dict[str, Any]:
        """The Tuner's `param_space`: one flat entry per dotted key."""
        return {key: dim.to_tune() for key, dim in self.space.items()}

    def paper_point(self) -> dict[str, Any] | None:
        """The paper's values of the swept keys, encoded for Tune; None when not asked for."""
        if not self.include_paper_point:
            return None
        return {
            key: self.space[key].encode(value)
            for key, value in _PAPER_VALUES.items()
            if key in self.space and self.space[key].kind != "grid"
        }

    def decode(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """A trial's Tune config -> dotted key -> config value."""
        return {key: self.space[key].decode(sampled[key]) for key in self.space if key in sampled}


def trial_raw(base_raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `base_raw` with each dotted key of `values` set."""
    raw = yaml.safe_load(yaml.safe_dump(base_raw)) or {}
    for key, value in values.items():
        set_dotted(raw, key, value)
    return raw


def _format_errors(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        parts.append(message if loc in ("", "space") else f"{loc}: {message}")
    return f"{source}: " + "; ".join(parts)


def validate_sweep(raw: dict[str, Any], source: str = "<sweep>") -> tuple[SweepConfig, dict]:
    """Validate a sweep mapping and its space against the base config.

    Returns the sweep and the base run config as a raw mapping (overrides applied, local
    paths absolute) that every trial starts from. Raises ConfigError naming the key.
    """
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    base_path = Path(sweep.base_config)
    if not base_path.is_file():
        raise ConfigError(f"{source}: base_config = {sweep.base_config!r} does not exist")
    base_raw = read_config_raw(base_path)  # its own base_config chain resolved
    # Before the overrides, so that `overrides: {data.use_feature_cache: false}` still wins.
    base_raw = trial_raw(base_raw, {"data.use_feature_cache": sweep.use_feature_cache})
    base_raw = trial_raw(base_raw, sweep.overrides)
    resolve_paths(base_raw)
    base = validate_config(base_raw, source=f"{base_path} with the sweep's overrides")
    for key, dim in sweep.space.items():
        for value in dim.corners():
            try:
                validate_config(trial_raw(base_raw, {key: value}))
            except ConfigError as err:
                raise ConfigError(
                    f"{source}: space.{key} = {value!r} is not a valid run config: "
                    f"{str(err).removeprefix('<config>: ')}"
                ) from None
    _check_paper_point(sweep, base_raw, source)
    if sweep.asha and sweep.asha.max_t and sweep.asha.max_t > base.train.epochs:
        raise ConfigError(
            f"{source}: asha.max_t = {sweep.asha.max_t} exceeds train.epochs = "
            f"{base.train.epochs}"
        )
    return sweep, base_raw


def _check_paper_point(sweep: SweepConfig, base_raw: dict[str, Any], source: str) -> None:
    if not sweep.include_paper_point:
        return
    point = {k: v for k, v in _PAPER_VALUES.items() if k in sweep.space}
    grids = [k for k in point if sweep.space[k].kind == "grid"]
    if grids:
        # Tune would pin those keys for one repetition and skip the rest of their grid.
        raise ConfigError(
            f"{source}: include_paper_point = true with a grid on {grids}: put the paper's "
            "value in the grid and set include_paper_point: false"
        )
    outside = [k for k, v in point.items() if not sweep.space[k].contains(v)]
    if outside:
        details = "; ".join(f"{k} = {_PAPER_VALUES[k]!r}" for k in outside)
        raise ConfigError(
            f"{source}: include_paper_point = true but the space excludes the paper's "
            f"{details}; widen the space or set include_paper_point: false"
        )
    try:
        validate_config(trial_raw(base_raw, point))
    except ConfigError as err:
        raise ConfigError(f"{source}: the paper's point is not a valid run config: {err}") from None


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, dict]:
    """Read a sweep YAML; `--set key=value` goes to the sweep for its own keys (num_samples,
    asha.grace_period, ...) and to the base run config otherwise (train.epochs, ...)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep config")
    for override in overrides or []:
        key, value = parse_override(override)
        if key.split(".", 1)[0] in SweepConfig.model_fields:
            set_dotted(raw, key, value)
        else:
            raw.setdefault("overrides", {})[key] = value
    return validate_sweep(raw, source=str(path))
