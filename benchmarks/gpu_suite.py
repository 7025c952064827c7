"""One command, one GPU call: every figure of issue 20 as JSON, stage after stage, in a budget.

    PYTHONPATH=<deps>/site:$PWD python benchmarks/gpu_suite.py --out-dir $OUT/gpu \
        --stage-dir /tmp/gpu-stages --budget-s 520
    .venv/bin/python benchmarks/gpu_suite.py --out-dir /tmp/gpu-suite   # CPU: the rehearsal

Each stage is a subprocess that writes one JSON into --stage-dir (default: --out-dir); a
stage that fails or runs out of time is recorded with its return code and the tail of its
stderr, and the suite goes on. After every stage --out-dir/gpu_suite.json is rewritten: the
machine, each stage's status, seconds and JSON (embedded, so that file alone carries the
run), the headline figures and the issue's goals. Every JSON is written atomically (a temp
file renamed over it): a call cut at any moment returns every figure finished by then.
Stages, the most telling first, so that a run cut short still returns the most:

  step_b16_eager, step_b16_graphed    gpu_step.py --no-pipeline --modes cached_taps --profile
                                      at per-GPU batch 16, train.cuda_graphs off / on
  ray_train                           jlstm data synth / features / train / eval under Ray
                                      Train on the GPU (its own small set of full-size
                                      videos), read back from a fresh MLflow SQLite store
  equivalence                         pytest -m gpu tests/test_cuda_graphs.py (junit -> JSON)
  step_b64_eager, step_b64_graphed    gpu_step.py at per-GPU batch 64 (no profile)
  cache_build                         cache_build.py: the feature cache built on the GPU
  feed                                cache_read.py on cache_build's cache, both read designs

Each stage has a cap, counted once per stage; the caps of all stages sum to at most
--budget-s minus MARGIN_S (scaled down for a smaller budget: `stage_caps`), and a stage's
timeout is its cap or what is left of the budget, whichever is less; a stage with less than
its minimum left is skipped (recorded). A stage past its timeout is killed with every
process it started (its process group, and each descendant found before the kill, one in a
session of its own or a Ray worker too: `kill_tree`); with CUDA, the next stage first waits
for the GPU's memory to be free and records what it found. --size full (the default with
CUDA) runs the paper's config; --size reduced (the default on CPU) runs the same stages at
sizes that finish within the same budget on 2 cores, with the graphed steps recorded as
skipped (CUDA graphs need CUDA). Videos, caches, checkpoints, the MLflow store and the
stages' logs go to --work-dir (default: a temp dir, removed at the end unless --keep-work),
never to --out-dir: a GPU call brings back at most 8 small files (9 JSON files here: point
--stage-dir elsewhere and bring back the summary, which holds them all).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch
from machine import load_average, machine_info, work_folder, write_json

if TYPE_CHECKING:
    from orchestration.config import JlstmConfig

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PAPER_CONFIG = "configs/ucf101_late_fusion.yaml"
SUMMARY = "gpu_suite.json"
STDERR_TAIL = 3000  # characters of a failed stage's stderr kept in the JSON
MARGIN_S = 30  # the stages' caps sum to at most the budget minus this
KILL_GRACE_S = 3  # SIGTERM, then this long, then SIGKILL (then this long again at most)
# The ray_train stage's commands end this long before the stage's own deadline: time for
# a command's kill (2 x KILL_GRACE_S) and for writing the JSON before the suite kills it.
RAY_TRAIN_JSON_RESERVE_S = 2 * KILL_GRACE_S + 4
GPU_FREE_MIB = 2048  # the GPU counts as free below this much used memory (NVML)
GPU_FREE_WAIT_S = 10  # how long a stage waits for it


@dataclass(frozen=True)
class Sizes:
    """What each stage runs at, per --size."""

    step_batches: tuple[int, int]  # the stages' "b16" and "b64" batches
    step_args: tuple[str, ...]  # more gpu_step.py arguments
    build_args: tuple[str, ...]  # more cache_build.py arguments
    feed_args: tuple[str, ...]  # more cache_read.py arguments (after cache_build's)
    train_batch: int  # per-GPU batch of the Ray Train run (1 worker: the global batch)
    train_stride: int  # clips start this many frames apart: many clips from few videos
    train_videos: dict[str, int]  # the Ray Train run's own set: classes, videos_per_class,
    #                               num_frames (`jlstm data synth`)
    train_overrides: tuple[str, ...]  # model sizes etc. of the Ray Train run
    caps: dict[str, float]  # each stage's own timeout (seconds), by stage name
    minimum: dict[str, float]  # skip a stage of this kind with less than this left


# Seconds per stage, each counted once; each table sums to 490 = 520 (the README's
# --budget-s) - MARGIN_S. Full: gpu_step.py at batch 16 took 22.5 s on an H200 and 45.4 s
# with --profile (results/gpu_step_h200*.json, imports and CUDA start-up included);
# ray_train starts Ray three times (features, train, eval) and Ray Train once; none of the
# full caps is measured yet. Reduced, as measured in the CPU rehearsal on 2 cores shared
# with other work: steps 10 s each, equivalence 6 s, cache_build 92 s, ray_train 163 s
# (without its synth).
CAPS_FULL = {"step_b16_eager": 55, "step_b16_graphed": 55, "ray_train": 200,
             "equivalence": 50, "step_b64_eager": 30, "step_b64_graphed": 30,
             "cache_build": 45, "feed": 25}
CAPS_REDUCED = {"step_b16_eager": 25, "step_b16_graphed": 5, "ray_train": 215,
                "equivalence": 20, "step_b64_eager": 25, "step_b64_graphed": 5,
                "cache_build": 140, "feed": 55}
MINIMUM = {"step": 15, "equivalence": 15, "cache_build": 20, "feed": 15, "ray_train": 90}


def sizes_for(size: str, cpus: int) -> Sizes:
    if size == "full":
        # The feed at the paper's per-GPU batch, on every CPU but the one Ray keeps.
        feed = ("--cpus", str(max(1, cpus - 1)), "--batch", "16", "--decode-batch-size", "16",
                "--epochs", "1", "--runs", "1")
        # A third of cache_build.py's full set (its 64 x 150 frames need minutes): 4 x 6
        # videos of 150 frames, every frame needed by some clip.
        build = ("--videos-per-class", "6", "--decode-videos", "6", "--vgg-repeats", "2")
        # Stride 2: 26 clips an 80-frame video at T = 30, ~27 steps of 16 an epoch.
        # No attention plot: it runs VGG16 at S = 384 on the driver's CPUs (seconds).
        return Sizes((16, 64), (), build, feed, 16, 2,
                     {"classes": 4, "videos_per_class": 6, "num_frames": 80},
                     ("tracking.attention_examples=0",), CAPS_FULL, MINIMUM)
    from gpu_step import REDUCED  # torch and the model's config only: no Ray, no MLflow

    feed = ("--cpus", "1", "--batch", "2", "--decode-batch-size", "2", "--epochs", "1",
            "--runs", "1")
    model = (*(f"model.{k}={v}" for k, v in REDUCED.items()), "tracking.attention_examples=1")
    return Sizes((2, 4), ("--steps", "2", "--warmup", "1"), (), feed, 2, 1,
                 {"classes": 2, "videos_per_class": 2, "num_frames": 24}, model,
                 CAPS_REDUCED, MINIMUM)


def stage_caps(sizes: Sizes, budget_s: float, stages: list[tuple[str, str, Plan]] | None = None
               ) -> dict[str, float]:
    """Each stage's cap (of `stages`, default STAGES), scaled down together where the
    budget is smaller than the caps' sum plus MARGIN_S, so that all of them always fit in
    the budget with MARGIN_S to spare."""
    names = [name for name, _, _ in (STAGES if stages is None else stages)]
    total = sum(sizes.caps[name] for name in names)
    scale = min(1.0, max(0.0, budget_s - MARGIN_S) / total)
    # Rounded down: the sum of rounded caps stays within the budget.
    return {name: math.floor(sizes.caps[name] * scale * 10) / 10 for name in names}


# --- running a command in its own process group -------------------------------------------


@dataclass
class Finished:
    returncode: int | None  # None: killed at its timeout
    seconds: float
    stderr_tail: str


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a stage: the repository on PYTHONPATH (the project is
    not installed on the GPU machine; Ray's local cluster and its workers inherit it),
    RAY_ADDRESS=local (never join a cluster this suite did not start), unbuffered output."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in paths:
        paths.append(str(REPO))
    env |= {"PYTHONPATH": os.pathsep.join(paths), "RAY_ADDRESS": "local",
            "PYTHONUNBUFFERED": "1"}
    return env | (extra or {})


def run_command(argv: list[str], env: dict[str, str], timeout: float, log: Path) -> Finished:
    """Run `argv` from the repository root in a new process group, stdout and stderr into
    `log`.out / .err; at `timeout`, `kill_tree`: it and everything it started."""
    log.parent.mkdir(parents=True, exist_ok=True)
    err_path = log.with_suffix(".err")
    started = time.perf_counter()
    with open(log.with_suffix(".out"), "wb") as out, open(err_path, "wb") as err:
        err.write(f"$ {' '.join(argv)}\n".encode())
        err.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=err,
                                start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            code = None
            kill_tree(proc)
    text = err_path.read_text(errors="replace")
    return Finished(code, round(time.perf_counter() - started, 1), text[-STDERR_TAIL:])


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal_all(pgid: int, procs: list[psutil.Process], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGTERM to `proc`, its process group and each of its descendants, found before any
    of them dies (so that one in a session of its own, or a Ray worker under a raylet, is
    not missed once its parent is gone); after KILL_GRACE_S, SIGKILL to whatever is left
    and to what those started meanwhile. Returns within 2 x KILL_GRACE_S."""
    try:
        procs = [psutil.Process(proc.pid), *_descendants(proc.pid)]
    except psutil.NoSuchProcess:
        procs = _descendants(proc.pid)
    _signal_all(proc.pid, procs, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=KILL_GRACE_S)
    late = {p.pid: p for p in alive}
    for p in alive:
        late |= {d.pid: d for d in _descendants(p.pid)}
    _signal_all(proc.pid, list(late.values()), signal.SIGKILL)
    psutil.wait_procs(list(late.values()), timeout=KILL_GRACE_S)
    proc.poll()  # reaped: no zombie left behind


def gpu_memory_used_mib() -> float | None:
    """Memory in use on GPU 0 by every process (NVML), without a CUDA context here; None
    without NVML or a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / 2**20
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no nvidia-ml-py, no driver: nothing to check
        return None


def wait_for_free_gpu() -> dict[str, Any]:
    """Before a stage: wait up to GPU_FREE_WAIT_S for the GPU's memory to fall below
    GPU_FREE_MIB (a killed stage's processes let go of it), and say what was found."""
    started = time.perf_counter()
    used = gpu_memory_used_mib()
    while (used is not None and used >= GPU_FREE_MIB
           and time.perf_counter() - started < GPU_FREE_WAIT_S):
        time.sleep(0.5)
        used = gpu_memory_used_mib()
    return {"gpu_used_mib_before": None if used is None else round(used),
            "gpu_free_before": None if used is None else used < GPU_FREE_MIB,
            "gpu_wait_s": round(time.perf_counter() - started, 1)}


# --- the stages ---------------------------------------------------------------------------


@dataclass
class Launch:
    """A stage's command, its JSON file and what turns its output into that JSON."""

    argv: list[str]
    out: str
    after: Callable[[Finished], None] | None = None  # writes `out` when the command does not
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Context:
    args: argparse.Namespace
    cuda: bool
    sizes: Sizes
    out_dir: Path  # the summary
    stage_dir: Path  # each stage's JSON
    work: Path
    deadline: float
    caps: dict[str, float]  # each stage's, `stage_caps`
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    def result(self, stage: str) -> dict[str, Any] | None:
        return self.records.get(stage, {}).get("result")


def step_stage(batch_index: int, graphed: bool) -> Callable[[Context], Launch | str]:
    def launch(ctx: Context) -> Launch | str:
        if graphed and not ctx.cuda:
            return "no CUDA: train.cuda_graphs=on needs a CUDA device"
        batch = ctx.sizes.step_batches[batch_index]
        name = f"gpu_step_b{(16, 64)[batch_index]}_{'graphed' if graphed else 'eager'}.json"
        return Launch([
            sys.executable, str(HERE / "gpu_step.py"), "--no-pipeline", "--modes",
            "cached_taps", "--size", ctx.args.size, "--batch-size", str(batch),
            # Quoted: YAML would read a bare on / off as a boolean.
            "--set", f"train.cuda_graphs='{'on' if graphed else 'off'}'",
            # The profile (launch calls, device busy share) at batch 16 only: it doubles
            # a stage's time.
            *(["--profile"] if batch_index == 0 else []),
            *ctx.sizes.step_args, "--out", str(ctx.stage_dir / name),
        ], name)

    return launch


def equivalence_stage(ctx: Context) -> Launch | str:
    test = REPO / "tests" / "test_cuda_graphs.py"
    if importlib.util.find_spec("pytest") is None:
        return "pytest is not installed"
    if not test.is_file():
        return f"{test.relative_to(REPO)} does not exist"
    xml = ctx.work / "equivalence.xml"
    name = "gpu_equivalence.json"

    def after(finished: Finished) -> None:
        write_json(ctx.stage_dir / name, junit_summary(xml, finished))

    # addopts cleared: the project's --timeout needs pytest-timeout; the stage has its own.
    return Launch([
        sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
        "-m", "gpu", str(test.relative_to(REPO)), f"--junitxml={xml}",
    ], name, after)


def junit_summary(xml: Path, finished: Finished) -> dict[str, Any]:
    """pytest's junit XML as JSON: the counts and each test's outcome (and message)."""
    out: dict[str, Any] = {"benchmark": "equivalence", "returncode": finished.returncode}
    if not xml.is_file():
        return out | {"junit": None}
    suite = ET.parse(xml).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    assert suite is not None
    out |= {k: float(suite.get(k, 0)) if k == "time" else int(suite.get(k, 0))
            for k in ("tests", "failures", "errors", "skipped", "time")}
    cases = []
    for case in suite.iter("testcase"):
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        cases.append({
            "test": f"{case.get('classname')}::{case.get('name')}",
            "seconds": float(case.get("time", 0)),
            "outcome": "passed" if outcome is None else outcome.tag,
            "message": None if outcome is None else (outcome.get("message") or "")[:500],
        })
    return out | {"cases": cases}


def cache_build_workdir(ctx: Context) -> Path:
    return ctx.work / "cache_build"


def cache_build_stage(ctx: Context) -> Launch:
    return Launch([
        sys.executable, str(HERE / "cache_build.py"), "--size", ctx.args.size,
        "--workdir", str(cache_build_workdir(ctx)), *ctx.sizes.build_args,
        "--out", str(ctx.stage_dir / "gpu_cache_build.json"),
    ], "gpu_cache_build.json")


def feed_stage(ctx: Context) -> Launch | str:
    built = ctx.result("cache_build") or {}
    if ctx.records.get("cache_build", {}).get("status") != "ok" or not built.get("cache_read_args"):
        # cache_read.py would build the cache itself, on the CPU: hours at the paper's size.
        return "needs the cache that the cache_build stage leaves (it did not end ok)"
    return Launch([
        sys.executable, str(HERE / "cache_read.py"), *built["cache_read_args"],
        *ctx.sizes.feed_args, "--out", str(ctx.stage_dir / "gpu_feed.json"),
    ], "gpu_feed.json")


def ray_train_stage(ctx: Context) -> Launch:
    # Its commands' own deadline: the stage's timeout (its cap, or what the budget leaves).
    deadline = min(ctx.deadline, time.time() + ctx.caps["ray_train"])
    return Launch([
        sys.executable, str(HERE / "gpu_suite.py"), "--stage", "ray_train", "--size",
        ctx.args.size, "--out-dir", str(ctx.stage_dir), "--work-dir", str(ctx.work),
        "--deadline", str(deadline), *(f"--train-set={o}" for o in ctx.args.train_set),
    ], "gpu_ray_train.json")


# (name, kind, plan). Ray Train on the GPU, the mission's headline, right after one eager
# and one graphed step at batch 16 (the bare step it is compared with).
Plan = Callable[[Context], Launch | str]
STAGES: list[tuple[str, str, Plan]] = [
    ("step_b16_eager", "step", step_stage(0, graphed=False)),
    ("step_b16_graphed", "step", step_stage(0, graphed=True)),
    ("ray_train", "ray_train", ray_train_stage),
    ("equivalence", "equivalence", equivalence_stage),
    ("step_b64_eager", "step", step_stage(1, graphed=False)),
    ("step_b64_graphed", "step", step_stage(1, graphed=True)),
    ("cache_build", "cache_build", cache_build_stage),
    ("feed", "feed", feed_stage),
]


def run_stage(ctx: Context, name: str, kind: str, plan: Plan) -> dict[str, Any]:
    launch = plan(ctx)
    if isinstance(launch, str):
        return {"status": "skipped", "reason": launch}
    gpu = wait_for_free_gpu() if ctx.cuda else {}
    left = ctx.deadline - time.time()
    if left < ctx.sizes.minimum[kind]:
        return {"status": "skipped",
                "reason": f"budget: {left:.0f} s left, the stage needs {ctx.sizes.minimum[kind]} s"}
    timeout = min(ctx.caps[name], left)
    print(f"[gpu_suite] {name}: up to {timeout:.0f} s", flush=True)
    path = ctx.stage_dir / launch.out
    path.unlink(missing_ok=True)  # an earlier run's JSON is never taken for this one's
    finished = run_command(launch.argv, stage_env(launch.env), timeout,
                           ctx.work / "logs" / name)
    if launch.after is not None:
        launch.after(finished)
    result = read_json(path)
    status = ("timeout" if finished.returncode is None
              else "ok" if finished.returncode == 0 and result is not None else "failed")
    record: dict[str, Any] = {"status": status, "returncode": finished.returncode,
                              "seconds": finished.seconds, "timeout_s": round(timeout),
                              "json": launch.out if result is not None else None, **gpu}
    if status != "ok":
        record["stderr_tail"] = finished.stderr_tail
    return record | {"result": result}


def read_json(path: Path) -> Any:
    """A stage's JSON, or None where it wrote none (or, from a writer not yet atomic, half
    of one)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --- the ray_train stage (this file run with --stage ray_train) -----------------------------

RUN_NAME = "gpu-suite-train"
EXPERIMENT = REGISTERED_MODEL = "jlstm-gpu-suite"  # never mixed with a real model's registry


def ray_train_overrides(sizes: Sizes, cuda: bool, root: Path, work: Path) -> list[str]:
    """The paper's model config on the synthetic videos: 1 worker on the GPU, uint8 cache,
    2 epochs, random VGG16; every path inside the work dir."""
    return [
        f"run_name={RUN_NAME}", f"data.root={root}", f"data.feature_cache={work / 'features'}",
        "data.use_feature_cache=true", "data.cache_dtype=uint8",
        f"data.train_stride={sizes.train_stride}", "model.backbone_weights=null",
        "train.epochs=2", f"train.batch_size={sizes.train_batch}",
        "cluster.num_workers=1", f"cluster.use_gpu={str(cuda).lower()}",
        f"cluster.storage_path={work / 'ray'}", f"tracking.experiment={EXPERIMENT}",
        f"tracking.registered_model={REGISTERED_MODEL}", "tracking.system_metrics_interval_s=2",
        *sizes.train_overrides,
    ]


def mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def read_run(uri: str, cfg: JlstmConfig) -> dict[str, Any]:
    """The training run as MLflow has it: status, registered version, per-epoch figures,
    system metrics (GPU utilization) over the training epochs."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from orchestration import metrics, tracking

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    run_id = experiment and tracking.find_run(cfg, experiment.experiment_id)
    if not run_id:
        return {"run_status": None, "notes": ["no MLflow run of this run name"]}
    run = client.get_run(run_id)
    keys = sorted(run.data.metrics)
    system = [k for k in keys if k.startswith("system/")]
    replays = metrics.TRAIN_GRAPH_REPLAYS
    wait = metrics.TRAIN_DATA_WAIT_SHARE if metrics.TRAIN_DATA_WAIT_SHARE in keys else None
    wanted = [metrics.EPOCH, metrics.TRAIN_CLIPS_PER_S, metrics.TRAIN_STEPS, replays,
              metrics.TRAIN_GLOBAL_BATCH, metrics.loss_metric("total"),
              metrics.VIDEO_TOP1_VOTE, *([wait] if wait else [])]
    history = {k: {m.step: m for m in client.get_metric_history(run_id, k)} for k in wanted}
    start_ms = run.info.start_time
    epochs = []
    previous_end = start_ms
    for step, mark in sorted(history[metrics.EPOCH].items()):
        row = {k: (history[k][step].value if step in history[k] else None) for k in wanted}
        row |= {"end_s": round((mark.timestamp - start_ms) / 1e3, 1),
                "epoch_s": round((mark.timestamp - previous_end) / 1e3, 1)}
        epochs.append(row | {"window_ms": (previous_end, mark.timestamp)})
        previous_end = mark.timestamp
    gpu_keys = [k for k in system if "gpu" in k and k.endswith("utilization_percentage")]
    gpu_samples = [m for k in gpu_keys for m in client.get_metric_history(run_id, k)]
    for row in epochs:
        lo, hi = row.pop("window_ms")
        row["gpu_util_mean_percent"] = mean(
            [m.value for m in gpu_samples if lo < m.timestamp <= hi])
    last_end = previous_end
    version = run.data.tags.get(tracking.VERSION_TAG)
    registered = None
    if version:
        found = client.get_model_version(cfg.tracking.registered_model, version)
        registered = {"name": found.name, "version": found.version, "status": found.status}
    steps = [row[metrics.TRAIN_STEPS] for row in epochs]
    graph_replays = [row[replays] for row in epochs]
    notes = []
    if wait is None:
        notes.append(f"the run logged no {metrics.TRAIN_DATA_WAIT_SHARE}: data_wait_share is null")
    if any(r is None for r in graph_replays):
        notes.append(f"the run logged no {replays}: graph replays unknown")
    return {
        "run_id": run_id, "run_status": run.info.status,
        "model_version": version, "registered_model": registered,
        "batch_size": cfg.train.batch_size // cfg.cluster.num_workers,
        "epochs": epochs,
        "epochs_note": "end_s: the epoch's report after the MLflow run's start; epoch_s: after "
        "the previous report (the first epoch's includes Ray Train's start-up); "
        "gpu_util_mean_percent: the samples of that span",
        "steady_train_clips_per_s": epochs[-1][metrics.TRAIN_CLIPS_PER_S] if epochs else None,
        "data_wait_metric": wait,
        "data_wait_share": epochs[-1][wait] if epochs and wait else None,
        # The first epoch's first steps run eager, before the capture (graphed_step's
        # warm-up); every later step is a replay unless `auto` fell back to eager.
        "graph_replays_equal_steps": None if len(epochs) < 2 or None in graph_replays
        else graph_replays[1:] == steps[1:],
        "first_epoch_eager_steps": None if not epochs or None in graph_replays
        else steps[0] - graph_replays[0],
        "gpu_util_keys": gpu_keys,
        "gpu_util_mean_percent": mean(
            [m.value for m in gpu_samples if m.timestamp <= last_end]),
        # The first epoch's span holds Ray Train's start-up, with the GPU idle.
        "gpu_util_last_epoch_percent": epochs[-1]["gpu_util_mean_percent"] if epochs else None,
        "system_metric_keys": system,
        "metric_keys": [k for k in keys if k not in system],
        "notes": notes,
    }


def run_ray_train(args: argparse.Namespace) -> int:
    """`jlstm data synth`, `jlstm data features`, `jlstm train` and `jlstm eval` as a user
    runs them (python -m jlstm), on a small set of full-size videos of its own; the JSON is
    rewritten (atomically) after each command, and each command ends
    RAY_TRAIN_JSON_RESERVE_S before the stage's deadline, killed with all it started."""
    from orchestration.config import load_config

    cuda = torch.cuda.is_available()
    sizes = sizes_for(args.size, os.cpu_count() or 1)
    deadline = args.deadline or time.time() + sizes.caps["ray_train"]
    work = args.work_dir.resolve() / "ray_train"
    out_path = args.out_dir.resolve() / "gpu_ray_train.json"
    root = work / "data"
    overrides = [*ray_train_overrides(sizes, cuda, root, work), *args.train_set]
    cfg = load_config(REPO / PAPER_CONFIG, overrides)  # refused here, before any work
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = stage_env({"MLFLOW_TRACKING_URI": uri})
    result: dict[str, Any] = {
        "benchmark": "ray_train", "size": args.size, "config": PAPER_CONFIG,
        "overrides": overrides, "data_root": str(root), "machine": machine_info(),
        "commands": {},
    }

    def save() -> None:
        write_json(out_path, result)

    def command(name: str, *cli: str) -> bool:
        left = deadline - time.time() - RAY_TRAIN_JSON_RESERVE_S
        if left < 10:
            result["commands"][name] = {"status": "skipped", "reason": "no time left"}
            save()
            return False
        finished = run_command([sys.executable, "-m", "jlstm", *cli], env, left,
                               work / "logs" / name)
        record: dict[str, Any] = {"returncode": finished.returncode, "seconds": finished.seconds}
        if finished.returncode != 0:
            record["stderr_tail"] = finished.stderr_tail
        result["commands"][name] = record
        save()
        return finished.returncode == 0

    work.mkdir(parents=True, exist_ok=True)
    configured = ["--config", PAPER_CONFIG, *(f"--set={o}" for o in overrides)]
    videos = sizes.train_videos
    ok = command("synth", "data", "synth", "--out", str(root),
                 "--classes", str(videos["classes"]),
                 "--videos-per-class", str(videos["videos_per_class"]),
                 "--frame-size", str(cfg.resolve_model(2).frame_size * 3 // 4),
                 "--num-frames", str(videos["num_frames"]))
    ok = ok and command("features", "data", "features", *configured)
    trained = ok and command("train", "train", *configured)
    if "train" in result["commands"]:
        result |= read_run(uri, cfg)
        save()
    version = result.get("model_version")
    evaluated = False
    if trained and version:
        out = work / "eval"
        evaluated = command("eval", "eval", "--model", f"models:/{REGISTERED_MODEL}/{version}",
                            *configured, "--out", str(out))
        metrics_file = out / "metrics.json"
        result["eval"] = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        save()
    save()
    return 0 if evaluated and result.get("run_status") == "FINISHED" else 1


# --- the summary ---------------------------------------------------------------------------


def step_figures(result: dict[str, Any] | None) -> dict[str, Any] | None:
    mode = ((result or {}).get("modes") or {}).get("cached_taps")
    if not mode:
        return None
    profile = mode.get("profile") or {}
    return {
        "batch_size": mode.get("batch_size"), "cuda_graphs": mode.get("cuda_graphs"),
        "clips_per_s": mode.get("clips_per_s"), "step_s_median": mode.get("step_s_median"),
        "clips_per_s_with_host_copy": (mode.get("with_host_copy") or {}).get("clips_per_s"),
        "mfu": mode.get("mfu"), "device_busy_share": profile.get("device_busy_share"),
        # A graph replay runs its kernels from one launch call: launches are what the goal
        # counts, kernels stay about the same.
        **{k: profile.get(k) for k in ("kernels_per_step", "launch_calls_per_step",
                                       "graph_launches_per_step")},
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def goal(value: float | None, target: float, at_least: bool = True) -> dict[str, Any]:
    met = None if value is None else (value >= target if at_least else value <= target)
    return {"value": value, "goal": (">= " if at_least else "<= ") + f"{target:g}", "met": met}


def headline(ctx: Context) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The figures a reader wants first, the issue's goals, and notes on what is missing."""
    steps = {name: step_figures(ctx.result(name)) for name, kind, _ in STAGES if kind == "step"}
    clips = {name: (s or {}).get("clips_per_s") for name, s in steps.items()}
    build = (ctx.result("cache_build") or {}).get("build") or {}
    feed = ctx.result("feed") or {}
    train = ctx.result("ray_train") or {}
    notes: list[str] = []
    # Ray Train against the bare step at the same per-GPU batch: graphed where it ran.
    bare_name = bare = None
    for name in ("step_b16_graphed", "step_b64_graphed", "step_b16_eager", "step_b64_eager"):
        figures = steps.get(name)
        if figures and figures["batch_size"] == train.get("batch_size"):
            bare_name, bare = name, figures["clips_per_s"]
            break
    if bare_name and bare_name.endswith("eager"):
        notes.append(f"ray_train compared with {bare_name}: no graphed step at its batch ran")
    train_clips = train.get("steady_train_clips_per_s")
    step_b16 = clips["step_b16_graphed"] or clips["step_b16_eager"]
    stage_bytes = feed["stage_mb_per_s"] * 1e6 if feed.get("stage_mb_per_s") else None
    graphed_launches = (steps.get("step_b16_graphed") or {}).get("launch_calls_per_step")
    replayed = train.get("graph_replays_equal_steps") if ctx.cuda else None
    figures = {
        "step_clips_per_s": clips,
        "graphed_over_eager_b16": ratio(clips["step_b16_graphed"], clips["step_b16_eager"]),
        "graphed_over_eager_b64": ratio(clips["step_b64_graphed"], clips["step_b64_eager"]),
        "steps": steps,
        "ray_train_clips_per_s": train_clips,
        "ray_train_over_bare_step": ratio(train_clips, bare),
        "ray_train_bare_step": bare_name,
        "ray_train_data_wait_share": train.get("data_wait_share"),
        "ray_train_gpu_util_mean_percent": train.get("gpu_util_mean_percent"),
        "ray_train_gpu_util_last_epoch_percent": train.get("gpu_util_last_epoch_percent"),
        "ray_train_graph_replays_equal_steps": train.get("graph_replays_equal_steps"),
        "ray_train_status": train.get("run_status"),
        "ray_train_model_version": train.get("model_version"),
        "eval_video_top1_vote": (train.get("eval") or {}).get("video_top1_vote"),
        "cache_build_frames_per_s": build.get("frames_per_s"),
        "cache_build_mfu": build.get("mfu"),
        "cache_build_bound_by": (ctx.result("cache_build") or {}).get("bound_by"),
        # The reader designs against the step they feed (>= 1 keeps up), at cache_read's
        # float16 taps: twice the bytes a clip of the uint8 cache that ray_train reads.
        "feed_stream_clips_per_s": feed.get("stream_clips_per_s"),
        "feed_stage_clips_per_s": ratio(stage_bytes, (feed.get("setup") or {}).get(
            "bytes_per_clip")),
        "feed_stream_mb_per_s": feed.get("stream_mb_per_s"),
        "feed_stage_mb_per_s": feed.get("stage_mb_per_s"),
        "feed_stream_over_step_b16": ratio(feed.get("stream_clips_per_s"), step_b16),
    }
    goals = {
        "graphed_step_b16_clips_per_s": goal(clips["step_b16_graphed"], 600),
        "graphed_step_b64_clips_per_s": goal(clips["step_b64_graphed"], 1500),
        "ray_train_over_bare_graphed_step": goal(
            figures["ray_train_over_bare_step"] if bare_name and "graphed" in bare_name
            else None, 0.9),
        "ray_train_data_wait_share": goal(train.get("data_wait_share"), 0.05, at_least=False),
        "cache_build_frames_per_s": goal(build.get("frames_per_s"), 4000),
        # "a few dozen" launches a graphed step (5,356 kernels, each its own launch, eager).
        "graphed_step_b16_launch_calls": goal(graphed_launches, 60, at_least=False),
        # Without CUDA every step is eager: no graph to replay, no goal.
        "ray_train_graph_replays_equal_steps": {
            "value": replayed, "goal": "true", "met": replayed},
    }
    if float((feed.get("setup") or {}).get("cpus", 1)) > 1:
        notes.append("feed: cache_read.py gives each read task of its map_batches stage --cpus "
                     "CPUs, so that stage ran one read task at a time: its per-CPU figures "
                     "hold, its total is one task's")
    notes += train.get("notes", [])
    return figures, goals, notes


def write_summary(ctx: Context, started: float) -> None:
    figures, goals, notes = headline(ctx)
    device = next((r["result"]["machine"].get("device") for r in ctx.records.values()
                   if (r.get("result") or {}).get("machine", {}).get("device")), None)
    summary = {
        "benchmark": "gpu_suite",
        "machine": machine_info() | {"device": device, "cuda_available": ctx.cuda},
        "size": ctx.args.size,
        "budget_s": ctx.args.budget_s,
        "stage_dir": str(ctx.stage_dir),
        "elapsed_s": round(time.time() - started, 1),
        "load_average": load_average(),
        "stages": {name: {k: v for k, v in r.items() if k != "result"}
                   for name, r in ctx.records.items()},
        "headline": figures,
        "goals": goals,
        "notes": notes,
        "results": {name: r.get("result") for name, r in ctx.records.items()},
    }
    write_json(ctx.out_dir / SUMMARY, summary)  # a reader (or a kill) never sees half of it


def run_suite(args: argparse.Namespace, stages: list[tuple[str, str, Plan]] | None = None,
              sizes: Sizes | None = None) -> int:
    """Every stage of `stages` (default STAGES) in order, at `sizes` (default --size's)."""
    stages = STAGES if stages is None else stages
    started = time.time()
    cuda = torch.cuda.is_available()  # no CUDA context here: the stages own the GPU
    args.size = args.size or ("full" if cuda else "reduced")
    out_dir = args.out_dir.resolve()
    stage_dir = (args.stage_dir or args.out_dir).resolve()
    for folder in (out_dir, stage_dir):
        folder.mkdir(parents=True, exist_ok=True)
    work, tmp = work_folder(args, "jlstm-gpu-suite-", attr="work_dir", create=True)
    sizes = sizes or sizes_for(args.size, os.cpu_count() or 1)
    ctx = Context(args, cuda, sizes, out_dir, stage_dir, work, started + args.budget_s,
                  stage_caps(sizes, args.budget_s, stages))
    only = set(args.stages.split(",")) if args.stages else None
    try:
        for name, kind, plan in stages:
            if only is not None and name not in only:
                ctx.records[name] = {"status": "skipped", "reason": "not in --stages"}
            else:
                ctx.records[name] = run_stage(ctx, name, kind, plan)
            record = ctx.records[name]
            print(f"[gpu_suite] {name}: {record['status']}"
                  + (f" in {record['seconds']} s" if "seconds" in record else "")
                  + (f" ({record['reason']})" if "reason" in record else ""), flush=True)
            write_summary(ctx, started)
    finally:
        if tmp is not None and not args.keep_work:
            tmp.cleanup()
    print(json.dumps({"out": str(out_dir / SUMMARY), "elapsed_s": round(time.time() - started, 1),
                      "statuses": {n: r["status"] for n, r in ctx.records.items()}}))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="the JSON files go here")
    parser.add_argument("--size", choices=["full", "reduced"],
                        help="default: full with CUDA, else reduced")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="the whole suite's time (one 10-minute GPU call, with margin)")
    parser.add_argument("--stage-dir", type=Path,
                        help="each stage's JSON (default: --out-dir); the summary embeds them "
                        "all, so a GPU call may bring back the summary alone")
    parser.add_argument("--work-dir", type=Path,
                        help="videos, caches, MLflow store, logs (default: a temp dir)")
    parser.add_argument("--keep-work", action="store_true", help="keep the default temp dir")
    parser.add_argument("--stages", help="comma-separated subset of the stages (others skipped)")
    parser.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                        help="more config overrides of the ray_train stage, e.g. "
                        "data.cache_read=stage (repeatable)")
    parser.add_argument("--stage", choices=["ray_train"], help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = [name for name, _, _ in STAGES]
    if args.stages and (unknown := set(args.stages.split(",")) - set(names)):
        parser.error(f"unknown stages {sorted(unknown)}; the stages: {names}")
    if args.stage == "ray_train":
        raise SystemExit(run_ray_train(args))
    raise SystemExit(run_suite(args))


if __name__ == "__main__":
    main()
