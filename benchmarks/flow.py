"""Optical flow through the data pipeline against a plain loop of OpenCV DIS, per CPU.

Both make the flow of the same clips: every test clip (eval grid, `--clip-len` frames every
`--frame-interval`) of a synthetic camera-scene dataset (`jlstm data synth --scene camera`:
a panning, shaking camera), each clip's flow pairs as `model.video.flow_frames` gives them.

- `dis_loop`: one process, the frames decoded beforehand (not timed), then a plain loop of
  `cv2.DISOpticalFlow.calc` on gray frames over each clip's distinct pairs: DIS alone, one
  thread, the floor any pipeline pays.
- `decode_loop`: one process decoding the same frames (decord, in process): what decoding
  adds on top.
- `pipeline`: Ray Data `map_batches(decode_batch, flow=...)`, what a flow run's decode tasks
  do (bounded decoder, DIS, camera compensation, uint8 encoding), on a local Ray cluster of
  this machine's CPUs, one CPU a task; its pairs/s divided by those CPUs.

Goal (issue 30): the pipeline per CPU >= 0.8 of the plain DIS loop. Each is timed at 224 px
and at the videos' native size (`--native`), `--runs` times (the best run counts: a loaded
2-core machine varies by +-10%).

    python benchmarks/flow.py --out benchmarks/results/flow.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import cv2
import machine
import numpy as np
import pyarrow as pa
import ray

from data_shards.clips import clip_table, flow_frames
from data_shards.config import DataConfig
from data_shards.decode import decode_batch
from data_shards.index import ensure_index
from data_shards.manifest import load_manifest, video_file
from data_shards.synth import synthesize_dataset
from model.config import FlowConfig
from model.decode_process import open_video
from model.flow import flow_fields, use_one_thread

PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
           "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST, "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}


def clip_plans(clips: list[dict], interval: int, stack: int) -> list[tuple[dict, list, list]]:
    """(clip row, frames to decode, distinct pairs that are not a frame with itself)."""
    plans = []
    for row in clips:
        frames = [(row["clip_start"] + i * interval) % row["num_frames"]
                  for i in range(row["clip_len"])]
        decode, pairs = flow_frames(frames, row["num_frames"], interval, stack)
        plans.append((row, decode, sorted({p for p in pairs if p[0] != p[1]})))
    return plans


def decoded(root: str, plans: list, size: int) -> list[np.ndarray]:
    """Each clip's frames to decode, uint8 [F, S, S, 3], decoded once (not timed)."""
    return [open_video(video_file(root, row["video_path"]), size).get_batch(decode).asnumpy()
            for row, decode, _ in plans]


def dis_loop(frames: list[np.ndarray], plans: list, preset: str) -> dict[str, float]:
    use_one_thread()
    dis = cv2.DISOpticalFlow_create(PRESETS[preset])
    started = time.perf_counter()
    pairs = 0
    for clip, (_, _, clip_pairs) in zip(frames, plans, strict=True):
        gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in clip]
        for i, j in clip_pairs:
            dis.calc(gray[i], gray[j], None)
        pairs += len(clip_pairs)
    seconds = time.perf_counter() - started
    return {"pairs": pairs, "seconds": round(seconds, 3), "pairs_per_s": round(pairs / seconds, 1)}


def fields_loop(frames: list[np.ndarray], plans: list, flow: FlowConfig) -> dict[str, float]:
    """`model.flow.flow_fields` (DIS + compensation + encoding) in one process."""
    started = time.perf_counter()
    pairs = 0
    for clip, (_, _, clip_pairs) in zip(frames, plans, strict=True):
        flow_fields(clip, clip_pairs, preset=flow.preset, compensation=flow.compensation,
                    bound=flow.bound_px)
        pairs += len(clip_pairs)
    seconds = time.perf_counter() - started
    return {"pairs": pairs, "seconds": round(seconds, 3), "pairs_per_s": round(pairs / seconds, 1)}


def decode_loop(root: str, plans: list, size: int) -> dict[str, float]:
    started = time.perf_counter()
    decoded(root, plans, size)
    seconds = time.perf_counter() - started
    return {"clips": len(plans), "seconds": round(seconds, 3),
            "clips_per_s": round(len(plans) / seconds, 1)}


def pipeline(table: pa.Table, root: str, size: int, clip_len: int, interval: int,
             flow: FlowConfig, pairs: int, cpus: float) -> dict[str, float]:
    ds = ray.data.from_arrow(table).repartition(target_num_rows_per_block=8).map_batches(
        decode_batch, batch_size=8, batch_format="numpy", num_cpus=1,
        fn_kwargs={"clip_len": clip_len, "frame_interval": interval, "frame_size": size,
                   "root": root, "flow": flow},
    )
    started = time.perf_counter()
    clips = bad = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        clips += len(batch["ok"])
        bad += int((~batch["ok"]).sum())
    seconds = time.perf_counter() - started
    return {"clips": clips, "bad_clips": bad, "pairs": pairs, "seconds": round(seconds, 3),
            "pairs_per_s": round(pairs / seconds, 1),
            "pairs_per_s_per_cpu": round(pairs / seconds / cpus, 1)}


def measure(args: argparse.Namespace, data_cfg: DataConfig, size: int, cpus: float) -> dict:
    manifest = load_manifest(data_cfg)
    test = manifest.filter(pa.compute.equal(manifest["subset"], "test"))
    table = clip_table(test, args.clip_len, args.clip_len, args.frame_interval)
    rows = [r | {"clip_len": args.clip_len} for r in table.to_pylist()]
    plans = clip_plans(rows, args.frame_interval, args.stack)
    pairs = sum(len(p) for _, _, p in plans)
    flow = FlowConfig(stack=args.stack, preset=args.preset)
    frames = decoded(data_cfg.root, plans, size)
    runs: dict[str, list[dict]] = {"dis_loop": [], "fields_loop": [], "decode_loop": [],
                                   "pipeline": []}
    for _ in range(args.runs):
        runs["dis_loop"].append(dis_loop(frames, plans, args.preset))
        runs["fields_loop"].append(fields_loop(frames, plans, flow))
        runs["decode_loop"].append(decode_loop(data_cfg.root, plans, size))
        runs["pipeline"].append(pipeline(table, str(Path(data_cfg.root).resolve()), size,
                                         args.clip_len, args.frame_interval, flow, pairs, cpus))
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    dis_rate = best["dis_loop"]["pairs_per_s"]
    per_cpu = best["pipeline"]["pairs_per_s_per_cpu"]
    return {
        "frame_size": size, "clips": len(plans), "pairs": pairs,
        "dis_pairs_per_s": dis_rate,
        "fields_pairs_per_s": best["fields_loop"]["pairs_per_s"],
        "decode_clips_per_s": best["decode_loop"]["clips_per_s"],
        "pipeline_pairs_per_s_per_cpu": per_cpu,
        "pipeline_vs_dis_loop": round(per_cpu / dis_rate, 3),
        "goal": 0.8,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    machine.add_out_args(parser, "benchmarks/results/flow.json")
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--videos-per-class", type=int, default=4)
    parser.add_argument("--num-frames", type=int, default=48)
    parser.add_argument("--native", type=int, default=320, help="the videos' side, px")
    parser.add_argument("--sizes", default="224,native", help="frame sides timed")
    parser.add_argument("--clip-len", type=int, default=8)
    parser.add_argument("--frame-interval", type=int, default=2)
    parser.add_argument("--stack", type=int, default=1)
    parser.add_argument("--preset", default=FlowConfig().preset, choices=sorted(PRESETS))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    load_start = machine.load_average()
    workdir, tmp = machine.work_folder(args, "jlstm-flow-", create=True)
    started = time.time()
    machine.start_ray()
    try:
        root = workdir / "data"
        if not (root / "ucfTrainTestlist").is_dir():
            synthesize_dataset(root, classes=args.classes, videos_per_class=args.videos_per_class,
                               frame_size=args.native, num_frames=args.num_frames,
                               scene="camera")
        data_cfg = DataConfig(dataset="ucf101", root=str(root))
        ensure_index(data_cfg)
        cpus = float(ray.cluster_resources().get("CPU", 1))
        sizes = [args.native if s == "native" else int(s) for s in args.sizes.split(",")]
        results = {}
        for size in sizes:
            results[str(size)] = measure(args, data_cfg, size, cpus)
            print(json.dumps({k: v for k, v in results[str(size)].items() if k != "runs"}),
                  flush=True)
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    result: dict[str, Any] = {
        **machine.result_head("flow", args, load_start, time.time() - started),
        "ray_cpus": cpus,
        "sizes": results,
    }
    machine.write_json(args.out, result)


if __name__ == "__main__":
    main()
