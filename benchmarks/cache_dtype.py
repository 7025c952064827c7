"""What `data.cache_dtype = uint8` costs: cache size, tap error, and the demo's accuracy.

One synthetic dataset of the demo's size is generated and indexed; the feature cache is
built twice from it (pool4 + conv5_3 taps, the demo's model sizes), as float16 and as uint8
with a per-video, per-channel scale. Figures, side by side in one run:

  cache bytes of each, and their ratio;
  the uint8 taps (byte x scale) against the float16 ones over every cached value:
    max_error_of_channel_peak  max |q - x| / (the channel's largest value in the video);
                               quantization bounds it by 0.5 / 255 = 0.00196
    mean_relative_error        mean |q - x| / x over the values x > 0
    relative_l2_error          ||q - x|| / ||x|| over all values
    zeroed_fraction            share of values x > 0 stored as 0;
  the demo's late_fusion model trained on each cache by Ray Train (the same seed and
  epochs; `train_variant` of benchmarks/variants.py): final video top-1 vote and prob.

    python benchmarks/cache_dtype.py --out benchmarks/results/cache_dtype.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import machine
import numpy as np
import ray
from variants import CACHE_TAPS, DEMO_CONFIG, train_variant

from data_shards.features import build_feature_cache, cache_file, scale_file
from orchestration.config import load_config

DTYPES = ("float16", "uint8")


def tap_errors(fp16_dir: Path, uint8_dir: Path) -> dict[str, float]:
    """The uint8 cache's values against the float16 cache's, over every video both hold."""
    worst, abs_sum, rel_sum, positive, zeroed, err_sq, ref_sq = 0.0, 0.0, 0.0, 0, 0, 0.0, 0.0
    videos = 0
    for path in sorted(fp16_dir.glob("video_*.npy")):
        if path.name.endswith(".scale.npy"):
            continue
        video_id = int(path.stem.removeprefix("video_"))
        x = np.load(path).astype(np.float64)
        scale = np.load(scale_file(uint8_dir, video_id)).astype(np.float64)
        q = np.load(cache_file(uint8_dir, video_id)) * scale[:, None, :, None, None]
        error = np.abs(q - x)
        peak = x.max(axis=(1, 3, 4), keepdims=True)  # [taps, 1, 512, 1, 1]
        worst = max(worst, float((error / np.where(peak > 0, peak, 1)).max()))
        nonzero = x > 0
        rel_sum += float((error[nonzero] / x[nonzero]).sum())
        abs_sum += float(error.sum())
        positive += int(nonzero.sum())
        zeroed += int((nonzero & (q == 0)).sum())
        err_sq += float((error**2).sum())
        ref_sq += float((x**2).sum())
        videos += 1
    return {
        "videos": videos,
        "max_error_of_channel_peak": round(worst, 6),
        "bound_of_channel_peak": round(0.5 / 255, 6),
        "mean_relative_error": round(rel_sum / max(positive, 1), 6),
        "relative_l2_error": round((err_sq / max(ref_sq, 1e-30)) ** 0.5, 6),
        "zeroed_fraction": round(zeroed / max(positive, 1), 6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    machine.add_out_args(parser, "benchmarks/results/cache_dtype.json")
    machine.add_video_args(parser, videos_per_class=24, help="the demo's: 24")
    parser.add_argument("--epochs", type=int, default=0, help="0 (default): the demo's")
    parser.add_argument("--no-training", dest="training", action="store_false",
                        help="sizes and tap errors only")
    args = parser.parse_args()

    load_start, started = machine.load_average(), time.time()
    workdir, tmp = machine.work_folder(args, "jlstm-cache-dtype-")
    configs = {
        dtype: load_config(DEMO_CONFIG, [
            f"data.root={workdir / 'data'}", f"data.feature_cache={workdir / dtype}",
            "data.use_feature_cache=true", f"data.cache_dtype={dtype}",
            # One Ray Train folder per dtype: train_variant names its runs by variant alone.
            f"cluster.storage_path={workdir / f'ray-{dtype}'}",
            *([f"train.epochs={args.epochs}"] if args.epochs else []),
        ])
        for dtype in DTYPES
    }
    base = configs["float16"]
    machine.start_ray()
    caches: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    try:
        machine.synthesize_videos(base, args)
        cache_spec = base.clip_spec(num_classes=args.classes).with_taps(CACHE_TAPS)
        for dtype, cfg in configs.items():
            built = time.time()
            info = build_feature_cache(cfg.data, cache_spec)
            caches[dtype] = {"bytes": info.total_bytes, "failed_videos": info.num_failed,
                             "build_s": round(time.time() - built, 1)}
        errors = tap_errors(workdir / "float16", workdir / "uint8")
        if args.training:
            for dtype, cfg in configs.items():
                runs[dtype] = train_variant(
                    cfg.model_copy(update={"run_name": f"bench-{dtype}"}), "late_fusion",
                    workdir,
                )
                print(json.dumps({dtype: runs[dtype]["final"]}), flush=True)
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()

    result = {
        **machine.result_head("cache_dtype", args, load_start, time.time() - started),
        "cache_taps": list(CACHE_TAPS),
        "caches": caches,
        "uint8_size_ratio": round(caches["uint8"]["bytes"] / caches["float16"]["bytes"], 4),
        "uint8_tap_error": errors,
        "late_fusion": {
            dtype: {k: run["final"].get(k) for k in ("val_video_top1_vote", "val_video_top1_prob")}
            for dtype, run in runs.items()
        },
        "runs": runs,
    }
    machine.write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("caches", "uint8_tap_error", "late_fusion")},
                     indent=2))


if __name__ == "__main__":
    main()
