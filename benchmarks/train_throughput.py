"""Training clips/s: 1 vs 2 Ray Train workers, feature cache vs decoding, Ray Train overhead.

One synthetic dataset (demo sizes from configs/demo.yaml) is generated in a work dir, indexed
and cached, then trained by these runs, one after the other, each from scratch:

  ray_cache_w1    TorchTrainer, 1 worker, feature cache input
  ray_cache_w2    TorchTrainer, 2 workers, feature cache input
  plain_cache     one process, no Ray Train: the worker loop's per-epoch work (the same
                  `train_epoch` step, rank 0's evaluation, checkpoint state and report files)
                  on the same model, config and Ray Data datasets, iterated in the driver
  plain_cache_split  as plain_cache, the train set read through `streaming_split(1)` as
                  Ray Train hands it to its worker (a diagnostic: the split iterator's share)
  ray_decode_wN   TorchTrainer, --decode-workers workers, decoding the videos (no cache)

Figures per run: `train_clips_per_s` as the worker loop reports it (rank 0's clips / its
train time x world size) and as train clips / epoch wall time (training, evaluation,
checkpoint and report), each the median over the epochs after the first (warm-up), then
the median over --rounds rounds of the cached runs (interleaved, so load changes hit all
runs alike; every round is kept in the JSON). The Ray Train overhead is ray_cache_w1 over
plain_cache (goal <= 1.15). The test set is trimmed to --test-videos-per-class videos per
class, so rank 0's per-epoch evaluation stays short.

    python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import machine
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.train
import torch
from epoch_clock import EpochClock

from data_shards.clip_spec import ClipSpec
from data_shards.datasets import iter_clip_batches, subset_clips
from data_shards.features import build_feature_cache
from data_shards.manifest import load_manifest
from model import JointAttentionNet
from orchestration.checkpoint import EVAL_DIR, TrainState
from orchestration.config import JlstmConfig
from orchestration.driver import build_trainer, prepare_data
from orchestration.evaluate import evaluate
from orchestration.session import plan_run
from orchestration.step import EagerTrainStep, build_optimizer
from orchestration.worker import predict_clips, train_epoch

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def median_after_warmup(values: list[float]) -> float | None:
    """Median of the epochs after the first one (the first pays Ray Data's start-up)."""
    steady = values[1:] if len(values) > 1 else values
    return round(statistics.median(steady), 2) if steady else None


def worker_process_settings(resources: dict[str, float]) -> dict[str, int]:
    """torch threads and niceness of a Ray actor holding `resources`, as a Train worker.

    Ray sets OMP_NUM_THREADS from the actor's CPUs and runs workers at niceness 15
    (RAY_worker_niceness); the driver runs at 0. On a busy machine a niced worker gets
    far less CPU than the driver, so the plain loop adopts both settings.
    """

    @ray.remote
    class Probe:
        def settings(self) -> dict[str, int]:
            import os

            import torch

            return {"threads": torch.get_num_threads(), "nice": os.getpriority(os.PRIO_PROCESS, 0)}

    probe = Probe.options(num_cpus=resources["CPU"]).remote()
    settings = ray.get(probe.settings.remote())
    ray.kill(probe)
    return settings


@contextlib.contextmanager
def niceness(value: int) -> Iterator[int]:
    """Every thread of this process at `value` for the block; restored after when allowed."""
    # On Linux niceness is per thread: set it on each (threads started later inherit it).
    tasks = Path("/proc/self/task")
    threads = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]
    saved = {}
    for tid in threads:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            saved[tid] = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, value)
    try:
        yield os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        for tid, nice in saved.items():
            with contextlib.suppress(OSError):  # lowering niceness needs CAP_SYS_NICE
                os.setpriority(os.PRIO_PROCESS, tid, nice)


def run_config(
    base: JlstmConfig, name: str, storage: Path, **sections: dict[str, Any]
) -> JlstmConfig:
    """`base` with a run name of its own (a reused name would resume) and section updates."""
    update: dict[str, Any] = {"run_name": name}
    cluster = {**sections.get("cluster", {}), "storage_path": str(storage)}
    sections = {**sections, "cluster": cluster}
    for section, values in sections.items():
        update[section] = getattr(base, section).model_copy(update=values)
    cfg = base.model_copy(update=update)
    return JlstmConfig.model_validate(cfg.model_dump(mode="json"))


def summarize(
    name: str, epochs: list[dict[str, float]], started: float, wall_s: float, train_clips: int
) -> dict[str, Any]:
    """Per-epoch rows (with epoch_s from consecutive timestamps) and the steady-state figures."""
    times = [started] + [e["t"] for e in epochs]
    epoch_s = [round(b - a, 2) for a, b in itertools.pairwise(times)]
    reported = [round(e["train_clips_per_s"], 2) for e in epochs]
    wall_rate = [round(train_clips / s, 2) for s in epoch_s]
    # The train step's share of each epoch (rank 0's train time); the rest is evaluation,
    # checkpoint state, report files and, under Ray Train, report() and its bookkeeping.
    train_s = [round(train_clips / r, 2) for r in reported]
    other_s = [round(e - t, 2) for e, t in zip(epoch_s, train_s, strict=True)]
    return {
        "run": name,
        "epochs": len(epochs),
        "wall_s": round(wall_s, 1),
        "epoch_s": epoch_s,
        "train_clips_per_s_per_epoch": reported,
        "train_clips_per_s": median_after_warmup(reported),
        "epoch_clips_per_s": median_after_warmup(wall_rate),
        "epoch_s_steady": median_after_warmup(epoch_s),
        "train_s_steady": median_after_warmup(train_s),
        "other_s_steady": median_after_warmup(other_s),
        "first_epoch_s": epoch_s[0] if epoch_s else None,
        "final_val_video_top1_vote": epochs[-1].get("val_video_top1_vote") if epochs else None,
        "final_loss_total": epochs[-1].get("loss_total") if epochs else None,
    }


AGGREGATED = (
    "wall_s", "first_epoch_s", "epoch_s_steady", "train_s_steady", "other_s_steady",
    "train_clips_per_s", "epoch_clips_per_s",
)


def aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's figures over the rounds: the median of each (the rounds are kept as well)."""
    out = {
        k: v for k, v in results[0].items() if k not in AGGREGATED and not isinstance(v, list)
    }
    out |= {"rounds": len(results)}
    for key in AGGREGATED:
        values = [r[key] for r in results if r.get(key) is not None]
        out[key] = round(statistics.median(values), 2) if values else None
    return out


def ray_run(cfg: JlstmConfig, workdir: Path, train_clips: int, label: str) -> dict[str, Any]:
    """TorchTrainer(...).fit() with no MLflow callback; epochs timed by EpochClock."""
    clock = workdir / f"{cfg.run_name}.jsonl"
    clock.unlink(missing_ok=True)
    started = time.time()
    data = prepare_data(cfg)
    plan = plan_run(cfg)
    result = build_trainer(cfg, data, plan, callbacks=[EpochClock(str(clock))]).fit()
    wall = time.time() - started
    if result.error:
        raise RuntimeError(f"{cfg.run_name} failed") from result.error
    epochs = [json.loads(line) for line in clock.read_text().splitlines()]
    out = summarize(label, epochs, started, wall, train_clips)
    out |= {"num_workers": cfg.cluster.num_workers, "cpus_per_worker": plan.cpus_per_worker}
    out["use_feature_cache"] = cfg.data.use_feature_cache
    return out


@ray.remote
class CpuHolder:
    """Holds a Train worker's CPUs while the plain loop runs, so Ray Data sees the same cluster."""

    def ready(self) -> bool:
        return True


def plain_run(
    cfg: JlstmConfig, workdir: Path, train_clips: int, worker: dict[str, int], split: bool = False
) -> dict[str, Any]:
    """The worker loop's epochs in this process: same model, optimizer, step, eval, state.

    Batches come from the same Ray Data datasets (`build_datasets`), iterated here instead
    of through a Ray Train shard (`split`: through `streaming_split(1, equal=True)`, as
    Ray Train hands the train set to its one worker). An idle actor holds the CPUs a
    Train worker would, and this process takes the worker's torch threads and niceness
    (from the start, data set-up included), so only Ray Train differs.
    """
    with niceness(worker["nice"]) as nice:
        out = _plain_epochs(cfg, workdir, train_clips, worker["threads"], split)
    return out | {"nice": nice}


def _plain_epochs(
    cfg: JlstmConfig, workdir: Path, train_clips: int, threads: int, split: bool
) -> dict[str, Any]:
    started = time.time()
    data = prepare_data(cfg)
    holder = CpuHolder.options(num_cpus=plan_run(cfg).cpus_per_worker).remote()
    ray.get(holder.ready.remote())
    train = data.datasets["train"]
    if split:
        train = train.streaming_split(1, equal=True)[0]
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(cfg.train.seed)
        core = JointAttentionNet(data.model_cfg)
        optimizer, scheduler = build_optimizer(core, cfg.train)
        device = torch.device("cpu")
        batch = cfg.train.batch_size
        step = EagerTrainStep(core, core, optimizer, cfg.train.grad_clip, device)
        epochs: list[dict[str, float]] = []
        for epoch in range(cfg.train.epochs):
            train_batches = iter_clip_batches(train, batch, data.readers["train"])
            metrics, _ = train_epoch(step, train_batches, device)
            scheduler.step()
            val_batches = iter_clip_batches(data.datasets["val"], batch, data.readers["val"])
            preds, _, _ = predict_clips(core, val_batches, device)
            report = evaluate(preds, data.class_names)
            metrics |= {f"val_{k}": float(v) for k, v in report.metrics.items()}
            with tempfile.TemporaryDirectory(dir=workdir) as tmp:
                TrainState(
                    model=core.state_dict(),
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    epoch=epoch + 1,
                    best_metric=metrics["val_video_top1_vote"],
                    history=[metrics],
                    model_config=data.model_cfg.model_dump(mode="json"),
                    class_names=data.class_names,
                ).save(Path(tmp))
                report.write(Path(tmp) / EVAL_DIR)
            epochs.append({**metrics, "t": time.time()})
    finally:
        torch.set_num_threads(saved_threads)
        ray.kill(holder)
    out = summarize(cfg.run_name, epochs, started, time.time() - started, train_clips)
    out |= {"num_workers": 0, "torch_threads": threads, "streaming_split": split}
    out["use_feature_cache"] = cfg.data.use_feature_cache
    return out


def prepare_workdir(base: JlstmConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Synthesize, index, trim the test set, build the feature cache; returns set-up figures."""
    started = time.time()
    manifest_path = machine.synthesize_videos(base, args)
    table = load_manifest(base.data)
    if args.test_videos_per_class is not None:
        # Throughput is about training: a few test videos per class keep rank 0's per-epoch
        # evaluation short. Trimmed before the cache is built, so the cache key matches.
        test = table.filter(pc.equal(table["subset"], "test")).to_pandas()
        keep = test.groupby("label").head(args.test_videos_per_class)["video_id"].tolist()
        is_train = pc.equal(table["subset"], "train")
        kept = pc.is_in(table["video_id"], value_set=pa.array(keep, table["video_id"].type))
        table = table.filter(pc.or_(is_train, kept))
        pq.write_table(table, manifest_path)
    synth_s = time.time() - started
    model_cfg = base.resolve_model(num_classes=args.classes)
    started = time.time()
    build_feature_cache(base.data, ClipSpec.of(model_cfg))
    cache_s = time.time() - started
    clip_len, interval = model_cfg.clip_len, base.data.frame_interval
    train = subset_clips(table, "train", clip_len, base.data.train_stride, interval)
    val = subset_clips(table, "test", clip_len, base.data.eval_stride_for(clip_len), interval)
    return {
        "train_videos": int(pc.sum(pc.equal(table["subset"], "train")).as_py()),
        "test_videos": int(pc.sum(pc.equal(table["subset"], "test")).as_py()),
        "train_clips": train.num_rows,
        "val_clips": val.num_rows,
        "synth_index_s": round(synth_s, 1),
        "cache_build_s": round(cache_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    machine.add_out_args(parser, "benchmarks/results/train_throughput.json", config=DEMO_CONFIG)
    machine.add_video_args(parser, videos_per_class=6)
    parser.add_argument("--test-videos-per-class", type=int, default=1,
                        help="trim the test set to this many videos per class (-1: keep all)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs of each cached run; the first is warm-up")
    parser.add_argument("--decode-epochs", type=int, default=1,
                        help="epochs of the decoding run, the first one warm-up when there are"
                        " more (at ~0.5 s a clip its start-up is a few %%); 0: skip")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of the cached runs (interleaved); figures are medians")
    parser.add_argument("--decode-workers", type=int, default=1)
    parser.add_argument("--workers", default="1,2", help="worker counts of the cached runs")
    parser.add_argument("--no-plain-split", dest="plain_split", action="store_false",
                        help="skip the plain loop reading the train set through streaming_split")
    args = parser.parse_args()
    if args.test_videos_per_class is not None and args.test_videos_per_class < 0:
        args.test_videos_per_class = None

    load_start = machine.load_average()
    workdir, tmp = machine.work_folder(args, "jlstm-throughput-", create=True)
    base = machine.cached_config(args, workdir, f"train.epochs={args.epochs}")
    started = time.time()
    machine.start_ray()
    try:
        setup = prepare_workdir(base, args)
        train_clips = setup["train_clips"]
        storage = workdir / "ray"
        rounds: dict[str, list[dict[str, Any]]] = {}

        def record(run: dict[str, Any]) -> None:
            rounds.setdefault(run["run"], []).append(run)
            print(json.dumps(run), flush=True)

        worker_counts = [int(w) for w in args.workers.split(",") if w]
        one = run_config(base, "plain_cache", storage, cluster={"num_workers": 1})
        worker = worker_process_settings(plan_run(one).worker_resources())
        # Rounds interleave the runs so that a change in machine load hits them alike.
        for round_ in range(args.rounds):
            for workers in worker_counts:
                name = f"ray_cache_w{workers}"
                # A run name of its own per round: a finished one would only be resumed.
                cfg = run_config(
                    base, f"{name}-r{round_}", storage, cluster={"num_workers": workers}
                )
                record(ray_run(cfg, workdir, train_clips, name))
            record(plain_run(one, workdir, train_clips, worker))
            if args.plain_split:
                split = one.model_copy(update={"run_name": "plain_cache_split"})
                record(plain_run(split, workdir, train_clips, worker, split=True))
        if args.decode_epochs:
            name = f"ray_decode_w{args.decode_workers}"
            cfg = run_config(
                base, name, storage,
                cluster={"num_workers": args.decode_workers},
                data={"use_feature_cache": False},
                train={"epochs": args.decode_epochs},
            )
            record(ray_run(cfg, workdir, train_clips, name))
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()

    runs = {name: aggregate(results) for name, results in rounds.items()}

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in runs and b in runs and runs[a][key] and runs[b][key]:
            return round(runs[a][key] / runs[b][key], 3)
        return None

    decode = f"ray_decode_w{args.decode_workers}"
    cached = f"ray_cache_w{args.decode_workers}"
    figures = {
        "clips_per_s_by_workers": {
            str(w): runs[f"ray_cache_w{w}"]["train_clips_per_s"] for w in worker_counts
        },
        "epoch_clips_per_s_by_workers": {
            str(w): runs[f"ray_cache_w{w}"]["epoch_clips_per_s"] for w in worker_counts
        },
        "speedup_2_vs_1_workers": ratio("ray_cache_w2", "ray_cache_w1", "train_clips_per_s"),
        "cache_clips_per_s": runs.get(cached, {}).get("train_clips_per_s"),
        "decode_clips_per_s": runs.get(decode, {}).get("train_clips_per_s"),
        "cache_vs_decode": ratio(cached, decode, "train_clips_per_s"),
        # Ray Train overhead, >1 means Ray Train is slower (goal <= 1.15).
        "ray_overhead_train_step": ratio("plain_cache", "ray_cache_w1", "train_clips_per_s"),
        "ray_overhead_epoch": ratio("ray_cache_w1", "plain_cache", "epoch_s_steady"),
        "ray_overhead_total_wall": ratio("ray_cache_w1", "plain_cache", "wall_s"),
        "ray_overhead_goal": 1.15,
        # The plain loop reading the train set through streaming_split(1), as Ray Train
        # does: how much of the overhead is the split iterator rather than Train itself.
        "split_iterator_train_step": ratio(
            "plain_cache", "plain_cache_split", "train_clips_per_s"
        ),
    }
    result = {
        **machine.result_head("train_throughput", args, load_start, time.time() - started),
        "config": base.model_dump(mode="json"),
        "setup": setup,
        "worker_process": worker,
        "figures": figures,
        "runs": runs,
        "rounds": rounds,
    }
    machine.write_json(args.out, result)
    print(json.dumps({"figures": figures, "setup": setup}, indent=2))


if __name__ == "__main__":
    main()
