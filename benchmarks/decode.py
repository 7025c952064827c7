"""Clips/s: a plain single-process decord loop vs the Ray Data pipeline vs the feature cache.

The pipeline is measured twice in the same run: decoding in each task's bounded decoder
(`data.decode_timeout_s`, the default: a child process per worker, frames sent back through
shared memory) and in the task's own process without a deadline (`decode_timeout_s: null`,
the pipeline before the deadline existed), alternating run by run; `bounded_vs_in_process`
(best run against best run) and `bounded_vs_in_process_median` (median against median) are
the deadline's cost. On a loaded 2-core machine single runs vary by +-10%: use `--runs 5`.

All of them read the same evaluation clips (every clip of every test video, in order; eval
stride 2, so many overlapping clips) of a synthetic dataset generated in a temp dir, at the
same frame size S. The pipeline runs on a local Ray cluster of `--cpus` CPUs, one CPU per
decode task; its rate per CPU is compared with the plain loop's, which uses one CPU.

    python benchmarks/decode.py --out benchmarks/results/decode.json --videos-per-class 16 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from machine import load_average

from data_shards.clip_spec import ClipSpec
from data_shards.clips import clip_table, frame_indices
from data_shards.cluster import RAY_NODE_ENV
from data_shards.config import DataConfig
from data_shards.datasets import build_datasets, clip_readers, iter_clip_batches
from data_shards.features import build_feature_cache
from data_shards.index import index_videos
from data_shards.manifest import load_manifest, video_file
from data_shards.synth import synthesize_dataset
from model import ModelConfig
from model.decode_process import open_video

BATCH = 32  # clips per batch a training worker asks for


def plain_loop(data_cfg: DataConfig, clip_spec: ClipSpec) -> dict[str, float]:
    """Decode the evaluation clips in one process, each video opened once, in order."""
    manifest = load_manifest(data_cfg)
    stride = data_cfg.eval_stride_for(clip_spec.clip_len)
    clips = clip_table(manifest, clip_spec.clip_len, stride).to_pylist()
    started, cpu_started = time.perf_counter(), time.process_time()
    reader, current = None, None
    for row in clips:
        if row["video_path"] != current:
            current = row["video_path"]
            reader = open_video(video_file(data_cfg.root, current), clip_spec.frame_size)
        reader.get_batch(
            frame_indices(row["clip_start"], row["num_frames"], clip_spec.clip_len)
        ).asnumpy()
    # decord may decode on more threads than one: the CPU it used, not only the wall time.
    return {"clips": len(clips), "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started}


def pipeline(data_cfg: DataConfig, clip_spec: ClipSpec) -> dict[str, float]:
    """Iterate the "val" dataset in batches of BATCH clips, as a training worker does
    (cached taps read by this consumer, `iter_clip_batches`).

    Timed from the first batch on; the executor's start-up before it (a fixed cost per
    epoch, not throughput) is reported as first_batch_s.
    """
    batches = iter_clip_batches(
        build_datasets(data_cfg, clip_spec)["val"], BATCH,
        clip_readers(data_cfg, clip_spec)["val"],
    )
    started = time.perf_counter()
    next(batches)
    first_batch_s = time.perf_counter() - started
    started = time.perf_counter()
    clips = sum(len(batch["video_id"]) for batch in batches)
    return {
        "clips": clips,
        "seconds": time.perf_counter() - started,
        "first_batch_s": first_batch_s,
    }


def best_of(runs: int, measure, *args) -> dict[str, float]:
    """The fastest of `runs` runs, with its rate in clips/s."""
    best = min((measure(*args) for _ in range(runs)), key=lambda r: r["seconds"] / r["clips"])
    return {**best, "clips_per_s": best["clips"] / best["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--videos-per-class", type=int, default=8)
    parser.add_argument("--num-frames", type=int, default=150)
    parser.add_argument("--source-size", type=int, default=128, help="side of the AVI frames")
    parser.add_argument("--frame-size", type=int, default=64, help="S, decoded side")
    parser.add_argument("--clip-len", type=int, default=16)
    parser.add_argument("--decode-batch-size", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-cache", dest="cache", action="store_false",
                        help="decoding only (VGG16 on CPU at S=224 takes long)")
    args = parser.parse_args()

    for key, value in RAY_NODE_ENV.items():  # the node settings jlstm's own clusters get
        os.environ.setdefault(key, value)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        root = synthesize_dataset(
            Path(tmp) / "data",
            classes=4,
            videos_per_class=args.videos_per_class,
            frame_size=args.source_size,
            num_frames=args.num_frames,
        )
        manifest = Path(tmp) / "manifest.parquet"
        data_cfg = DataConfig(
            dataset="ucf101",
            root=str(root),
            manifest=str(manifest),
            eval_stride=2,
            decode_cpus=1.0,
            decode_batch_size=args.decode_batch_size,
            feature_cache=str(Path(tmp) / "features"),
        )
        clip_spec = ClipSpec.of(ModelConfig(
            num_classes=4,
            frame_size=args.frame_size,
            clip_len=args.clip_len,
            last_steps=args.clip_len // 2,
            map_size=args.frame_size // 16,
        ))
        index_videos(data_cfg, show_progress=False)
        # Keep only the test videos: the cache then runs VGG16 on the frames measured alone.
        table = load_manifest(data_cfg)
        pq.write_table(table.filter(pc.equal(table["subset"], "test")), manifest)

        plain = best_of(args.runs, plain_loop, data_cfg, clip_spec)
        in_process_cfg = data_cfg.model_copy(update={"decode_timeout_s": None})
        # Alternated, so a change in the machine's load hits both alike.
        decodes: dict[str, list[dict[str, float]]] = {"bounded": [], "in_process": []}
        for _ in range(args.runs):
            decodes["bounded"].append(best_of(1, pipeline, data_cfg, clip_spec))
            decodes["in_process"].append(best_of(1, pipeline, in_process_cfg, clip_spec))
        decode, in_process = (max(decodes[k], key=lambda r: r["clips_per_s"])
                              for k in ("bounded", "in_process"))
        if args.cache:
            started = time.perf_counter()
            info = build_feature_cache(data_cfg, clip_spec)
            build_s = time.perf_counter() - started
            cached_cfg = data_cfg.model_copy(update={"use_feature_cache": True})
            cache = best_of(args.runs, pipeline, cached_cfg, clip_spec)

    result = {
        "setup": {
            "eval_clips": plain["clips"],
            "clip_len": args.clip_len,
            "frame_size": args.frame_size,
            "source_size": args.source_size,
            "frames_per_video": args.num_frames,
            "eval_stride": 2,
            "ray_cpus": args.cpus,
            "decode_cpus_per_task": 1.0,
            "decode_batch_size": args.decode_batch_size,
            "iter_batch_size": BATCH,
            "runs": args.runs,
            "machine_cpus": os.cpu_count(),
            "python": platform.python_version(),
            "ray": ray.__version__,
            "taps": list(clip_spec.taps),
            "map_size": clip_spec.map_size,
        },
        "plain_clips_per_s": round(plain["clips_per_s"], 1),
        "plain_cpus_used": round(plain["cpu_seconds"] / plain["seconds"], 2),
        "pipeline_clips_per_s": round(decode["clips_per_s"], 1),
        "pipeline_per_cpu_vs_plain": round(
            decode["clips_per_s"] / args.cpus / plain["clips_per_s"], 3
        ),
        "pipeline_vs_plain": round(decode["clips_per_s"] / plain["clips_per_s"], 3),
        "pipeline_first_batch_s": round(decode["first_batch_s"], 2),
        "decode_timeout_s": data_cfg.decode_timeout_s,
        "in_process_pipeline_clips_per_s": round(in_process["clips_per_s"], 1),
        "bounded_vs_in_process": round(decode["clips_per_s"] / in_process["clips_per_s"], 3),
        "bounded_vs_in_process_median": round(
            statistics.median(r["clips_per_s"] for r in decodes["bounded"])
            / statistics.median(r["clips_per_s"] for r in decodes["in_process"]), 3
        ),
        "bounded_runs_clips_per_s": [round(r["clips_per_s"], 1) for r in decodes["bounded"]],
        "in_process_runs_clips_per_s": [
            round(r["clips_per_s"], 1) for r in decodes["in_process"]
        ],
        "load_average_end": load_average(),
    }
    if args.cache:
        result |= {
            "cache_clips_per_s": round(cache["clips_per_s"], 1),
            "cache_vs_pipeline": round(cache["clips_per_s"] / decode["clips_per_s"], 2),
            "cache_first_batch_s": round(cache["first_batch_s"], 2),
            "cache_build_s": round(build_s, 1),
            "cache_bytes_per_video": round(info.bytes_per_video),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
