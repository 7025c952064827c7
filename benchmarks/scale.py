"""The data path at UCF101's video count: time and peak RSS of the driver and of the Ray workers.

For each size (1,332 and 13,320 videos by default: every 10th and every video of the real
split lists in tests/fixtures/ucfTrainTestlist), a synthetic dataset is written with
`synthesize_from_splits` (tiny frames, few frames per video; timed, reported apart), then a
fresh process, so that its peak RSS is this size's alone, runs on a local Ray cluster:

- index: `index_videos` from scratch (every video probed by the Ray actor pool);
- cache: `build_feature_cache` (frozen random VGG16, conv4_3 at S = 32, K = 2);
- epoch_cached: one pass over `build_datasets(...)["train"]`, iterated in the driver with
  `iter_clip_batches`, which reads the cached taps in the consumer (`clip_readers`);
- epoch_decode: the same pass on the decode path (decord in Ray Data tasks), no cache.

A thread samples every `--sample-s` seconds: the driver's RSS, and each Ray worker process
("ray::..." in its command line: probe actors, Ray Data tasks and actors) with its RSS and
CPU time; `getrusage` gives the driver's peak over the whole process. Per step the JSON
holds the wall time, the driver's peak RSS, the largest worker's peak RSS and the CPU time
of the busiest worker (the slowest: every step waits for its last worker), counting the
workers whose CPU time grew during the step; and the Ray daemons' (GCS, raylet) summed
peak RSS. RSS counts the object-store pages a process has touched, so a worker's figure
includes the blocks it read or wrote.

    python benchmarks/scale.py --out benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from machine import load_average, machine_info

REPO = Path(__file__).resolve().parents[1]
SPLITS = REPO / "tests" / "fixtures" / "ucfTrainTestlist"
MB = 2**20
STEPS = ("index", "cache", "epoch_cached", "epoch_decode")


class Sampler:
    """Background sampling of this process and the Ray processes below it, per step."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.me = psutil.Process()
        self.lock = threading.Lock()
        self.step: dict[str, Any] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start_step(self) -> None:
        with self.lock:
            self.step = {"driver": 0, "daemons": 0, "workers": {}}

    def end_step(self) -> dict[str, Any]:
        """Peaks since `start_step`: driver, largest worker, busiest worker, Ray daemons."""
        self._sample()
        with self.lock:
            # A worker counts if it ran during the step: an actor left idle by an earlier
            # step (Ray Data releases its pool lazily) is not this step's.
            workers = [w for w in self.step["workers"].values() if w["cpu_last"] > w["cpu_first"]]
            biggest = max(workers, key=lambda w: w["rss"], default=None)
            busiest = max(workers, key=lambda w: w["cpu_last"] - w["cpu_first"], default=None)
            return {
                "driver_peak_rss_mb": round(self.step["driver"] / MB, 1),
                "worker_max_peak_rss_mb": round(biggest["rss"] / MB, 1) if biggest else None,
                "worker_max_peak_rss_process": biggest["title"] if biggest else None,
                "worker_max_cpu_s": (
                    round(busiest["cpu_last"] - busiest["cpu_first"], 1) if busiest else None
                ),
                "worker_max_cpu_process": busiest["title"] if busiest else None,
                "workers_active": len(workers),
                "ray_daemons_peak_rss_mb": round(self.step["daemons"] / MB, 1),
            }

    def _sample(self) -> None:
        driver = self.me.memory_info().rss
        workers, daemons = {}, 0
        for proc in self.me.children(recursive=True):
            try:
                with proc.oneshot():
                    command = proc.cmdline()
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
            except psutil.Error:  # a worker that exited between listing and reading
                continue
            if command and command[0].startswith("ray::"):
                workers[proc.pid] = (command[0][:60], rss, times.user + times.system)
            else:
                daemons += rss
        with self.lock:
            if not self.step:
                return
            self.step["driver"] = max(self.step["driver"], driver)
            self.step["daemons"] = max(self.step["daemons"], daemons)
            for pid, (title, rss, cpu) in workers.items():
                seen = self.step["workers"].setdefault(
                    pid, {"title": title, "rss": 0, "cpu_first": cpu, "cpu_last": cpu}
                )
                seen["cpu_last"] = cpu
                if rss >= seen["rss"]:  # the title at the peak: a worker's next task renames it
                    seen["rss"], seen["title"] = rss, title

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self._sample()


def _result_file(root: Path) -> Path:
    """Where the child process measuring the dataset at `root` leaves its figures."""
    return root.parent / f"{root.name}_run" / "result.json"


def _start_ray(cpus: int) -> None:
    """A local Ray cluster of our own: address="local" even when a `ray start` one runs here
    (this machine is shared), so the processes sampled are this run's alone. Ray gives its
    raylet a fixed 30 s to start, which a loaded machine can exceed: then one more try."""
    import ray

    try:
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    except Exception:  # Ray raises a bare Exception ("timed out during startup")
        ray.shutdown()
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)


def measure(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Index, cache and one epoch each way of the dataset at `root`, on a fresh local Ray."""
    import ray

    from data_shards.clip_spec import ClipSpec
    from data_shards.cluster import RAY_NODE_ENV
    from data_shards.config import DataConfig
    from data_shards.datasets import build_datasets, clip_readers, iter_clip_batches
    from data_shards.features import build_feature_cache
    from data_shards.index import index_videos
    from model import ModelConfig

    for key, value in RAY_NODE_ENV.items():
        os.environ.setdefault(key, value)
    sampler = Sampler(args.sample_s)
    sampler.thread.start()
    _start_ray(args.cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = _result_file(root).parent
    work.mkdir(parents=True, exist_ok=True)
    data_cfg = DataConfig(
        dataset="ucf101",
        root=str(root),
        manifest=str(work / "manifest.parquet"),
        train_stride=args.clip_len,
        decode_batch_size=args.decode_batch_size,
        feature_cache=str(work / "features"),
        use_feature_cache=True,
    )
    clip_spec = ClipSpec.of(ModelConfig(
        num_classes=101,
        frame_size=args.frame_size,
        clip_len=args.clip_len,
        last_steps=args.clip_len,
        taps=["conv4_3"],
        map_size=args.map_size,
    ))
    data_cfg.manifest_path().unlink(missing_ok=True)  # probe every video, reuse nothing

    def epoch(cfg: DataConfig) -> dict[str, int]:
        clips = bad = 0
        train = build_datasets(cfg, clip_spec)["train"]
        read = clip_readers(cfg, clip_spec)["train"]  # cached taps: read by the consumer
        for batch in iter_clip_batches(train, args.batch, read):
            clips += len(batch["ok"])
            bad += int((~batch["ok"]).sum())
        return {"clips": clips, "bad_clips": bad}

    actions = {
        "index": lambda: index_videos(data_cfg, show_progress=False).summary().splitlines()[0],
        "cache": lambda: vars(
            build_feature_cache(data_cfg, clip_spec, actors=args.cpus, rebuild=True)
        ),
        "epoch_cached": lambda: epoch(data_cfg),
        "epoch_decode": lambda: epoch(data_cfg.model_copy(update={"use_feature_cache": False})),
    }
    steps = {}
    for step in STEPS:
        sampler.start_step()
        started = time.perf_counter()
        outcome = actions[step]()
        seconds = time.perf_counter() - started
        steps[step] = {"seconds": round(seconds, 1), **sampler.end_step()}
        if step == "cache":
            outcome = {k: str(v) if isinstance(v, Path) else v for k, v in outcome.items()}
            outcome.pop("key")
        steps[step]["outcome"] = outcome
        print(f"{root.name} {step}: {steps[step]}", file=sys.stderr, flush=True)
    sampler.stop.set()
    ray.shutdown()
    return {
        "steps": steps,
        "seconds": round(sum(s["seconds"] for s in steps.values()), 1),
        # ru_maxrss is in KiB on Linux: the driver's peak over the whole process.
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "worker_max_peak_rss_mb": max(s["worker_max_peak_rss_mb"] or 0 for s in steps.values()),
        "dominant_step": max(steps, key=lambda s: steps[s]["seconds"]),
    }


def run_size(every: int, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Synthesize (or reuse) the dataset of every `every`-th video, then measure it apart."""
    from data_shards.synth import synthesize_from_splits

    root = workdir / f"ucf101_every{every}"
    synth_s = None
    if not (root / "ucfTrainTestlist").is_dir():  # the split files are written last
        started = time.perf_counter()
        synthesize_from_splits(
            root, SPLITS, every=every, frame_size=args.source_size, num_frames=args.num_frames
        )
        synth_s = round(time.perf_counter() - started, 1)
    videos = sum(1 for _ in (root / "UCF-101").rglob("*.avi"))
    subprocess.run([sys.executable, __file__, "--measure", str(root), *sys.argv[1:]], check=True)
    measured = json.loads(_result_file(root).read_text())
    return {"videos": videos, "synth_s": synth_s, **measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    parser.add_argument(
        "--every",
        default="10,1",
        help="sizes: keep every n-th listed video (10,1 = 1,332 and "
        "13,320 videos); the first size is the baseline of the ratios",
    )
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--source-size", type=int, default=32, help="side of the AVI frames")
    parser.add_argument("--num-frames", type=int, default=2, help="frames per video")
    parser.add_argument("--frame-size", type=int, default=32, help="S, VGG16's input side")
    parser.add_argument("--map-size", type=int, default=2, help="K of the conv4_3 tap")
    parser.add_argument("--clip-len", type=int, default=2, help="T, also the train stride")
    parser.add_argument("--decode-batch-size", type=int, default=32, help="clips per task")
    parser.add_argument("--batch", type=int, default=32, help="clips per driver batch")
    parser.add_argument("--sample-s", type=float, default=0.2, help="RSS sampling interval")
    parser.add_argument("--workdir", help="keep (and reuse) the synthetic datasets here")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the per-size child process
    args = parser.parse_args()
    if args.measure:
        root = Path(args.measure)
        _result_file(root).write_text(json.dumps(measure(root, args)))
        return

    load_start = load_average()
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        workdir = Path(args.workdir or scratch)
        sizes = [run_size(int(every), workdir, args) for every in args.every.split(",")]
    base, top = sizes[0], sizes[-1]
    videos_ratio = top["videos"] / base["videos"]
    time_ratio = top["seconds"] / base["seconds"]
    rss_ratio = top["driver_peak_rss_mb"] / base["driver_peak_rss_mb"]
    result = {
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "setup": {k: v for k, v in vars(args).items() if k != "measure"},
        "sizes": sizes,
        "videos_ratio": round(videos_ratio, 2),
        "time_ratio": round(time_ratio, 2),
        "step_time_ratios": {
            s: round(top["steps"][s]["seconds"] / base["steps"][s]["seconds"], 2) for s in STEPS
        },
        "driver_peak_rss_ratio": round(rss_ratio, 3),
        "worker_peak_rss_ratio": round(
            top["worker_max_peak_rss_mb"] / base["worker_max_peak_rss_mb"], 3
        ),
        "goal_met": {
            "driver_peak_rss_ratio_le_1.2": rss_ratio <= 1.2,
            "time_ratio_le_1.1_x_videos": time_ratio <= 1.1 * videos_ratio,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "sizes")}, indent=2))


if __name__ == "__main__":
    main()
