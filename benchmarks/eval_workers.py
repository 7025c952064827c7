"""Evaluation time on 1 vs 2 Ray Train workers: the demo's test set, every clip scored once.

The demo's data (configs/demo.yaml: 4 classes x 24 synthetic videos, feature cache) is
generated, indexed and cached once; then `evaluate_distributed` (what `jlstm eval` and
each training epoch's evaluation run: every worker scores its shard of the test clips,
rank 0 gathers them) scores the same model on 1 and on 2 workers, in interleaved rounds.
Evaluation cost does not depend on the weights, so the model is freshly initialized.
Figures per worker count: median wall seconds of a whole evaluation (TorchTrainer start
included), median seconds of the scoring itself (rank 0's `val_seconds`: every shard
scored and gathered), test clips/s of each, the fewest test clips one worker scored
(`worker_clips_min`: each worker's share), and whether the metrics agree across worker
counts (all but that share).

    python benchmarks/eval_workers.py --out benchmarks/results/eval_workers.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from machine import load_average, machine_info

from data_shards.clip_spec import ClipSpec
from data_shards.cluster import init_ray
from data_shards.features import build_feature_cache
from data_shards.index import ensure_index
from data_shards.sizing import data_size
from data_shards.splits import class_names
from data_shards.synth import synthesize_dataset
from model import JointAttentionNet
from orchestration.config import JlstmConfig, load_config
from orchestration.demo import DEMO_CLASSES, DEMO_CONFIG, DEMO_VIDEOS_PER_CLASS
from orchestration.inference import evaluate_distributed


def prepare(workdir: Path, videos_per_class: int) -> JlstmConfig:
    """The demo config on a fresh copy of the demo's data, indexed and cached."""
    cfg = load_config(DEMO_CONFIG, [
        f"data.root={workdir / 'data'}",
        f"data.feature_cache={workdir / 'features'}",
        f"cluster.storage_path={workdir / 'ray'}",
    ])
    synthesize_dataset(
        cfg.data.root, layout="ucf101", classes=DEMO_CLASSES, videos_per_class=videos_per_class,
        seed=cfg.data.seed, frame_size=cfg.model["frame_size"] * 4 // 3,
    )
    manifest = ensure_index(cfg.data)
    build_feature_cache(cfg.data, cfg.clip_spec(len(class_names(manifest))))
    return cfg


def evaluate_once(cfg: JlstmConfig, workers: int, net: JointAttentionNet, out: Path) -> dict:
    one = cfg.model_copy(
        update={"cluster": cfg.cluster.model_copy(update={"num_workers": workers})}
    )
    names = class_names(cfg.data.manifest_path())
    started = time.perf_counter()
    metrics = evaluate_distributed(one, net.cfg, net.state_dict(), names, out)
    return {
        "wall_s": time.perf_counter() - started,
        "scoring_s": metrics.pop("seconds"),
        "worker_clips_min": metrics.pop("worker_clips_min"),
        "metrics": metrics,
    }


def summarize(runs: list[dict[str, Any]], test_clips: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("wall_s", "scoring_s"):
        median = statistics.median(r[key] for r in runs)
        out[f"{key}_median"] = round(median, 2)
        out[key] = [round(r[key], 2) for r in runs]
        out[f"test_clips_per_s_{key.removesuffix('_s')}"] = round(test_clips / median, 1)
    out["worker_clips_min"] = [int(r["worker_clips_min"]) for r in runs]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--videos-per-class", type=int, default=DEMO_VIDEOS_PER_CLASS)
    parser.add_argument("--workers", default="1,2", help="worker counts, comma separated")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    counts = [int(w) for w in args.workers.split(",") if w]
    load_start = load_average()
    init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = prepare(Path(tmp), args.videos_per_class)
        names = class_names(cfg.data.manifest_path())
        net = JointAttentionNet(cfg.resolve_model(len(names)))
        test_clips = data_size(cfg.data, ClipSpec.of(net.cfg)).test_clips
        runs: dict[int, list[dict[str, Any]]] = {w: [] for w in counts}
        for round_ in range(args.rounds):
            for workers in counts:
                run = evaluate_once(cfg, workers, net, Path(tmp) / f"eval_{workers}_{round_}")
                runs[workers].append(run)
                print(f"round {round_}: {workers} workers {run['wall_s']:.1f} s "
                      f"(scoring {run['scoring_s']:.1f} s)", flush=True)
    ray.shutdown()
    reference = runs[counts[0]][0]["metrics"]
    result = {
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "config": str(DEMO_CONFIG),
        "test_clips": test_clips,
        "rounds": args.rounds,
        "metrics_agree": all(r["metrics"] == reference for rs in runs.values() for r in rs),
        "by_workers": {str(w): summarize(rs, test_clips) for w, rs in runs.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["by_workers"], indent=2), "metrics agree:", result["metrics_agree"])


if __name__ == "__main__":
    main()
