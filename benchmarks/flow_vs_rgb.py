"""RGB against RGB + optical flow, at the same budget, on a set where motion is the only cue.

The set (`jlstm data synth --scene camera`): classes that differ only in the speed and the
pattern of one object's motion (steady slow or fast, oscillating, zig-zag, circle,
stop-and-go), the camera panning and shaking, a distractor moving too, backgrounds, colours
and looks shared by every class. One dataset is generated, indexed and cached once with
every frozen input (`pool4`, `conv5_3`, `flow`: the cache of more taps serves the RGB model
too), then each model is trained from scratch by Ray Train (`build_trainer(...).fit()`, no
MLflow, no registry: nothing of the demo's is touched) with configs/demo_flow.yaml's sizes
and settings, the same epochs, batch, clips and seed for both, over `--seeds` seeds
(`train.seed` and `data.seed`: initial weights and clip order).

- `rgb`: inputs [pool4, conv5_3] (the demo's model);
- `rgb_flow`: inputs [pool4, conv5_3, flow] (a frozen flow VGG16, cross-modality init);
- the two flow encoders alone (`--encoders`, on the first seed): `flow_only` (the frozen
  flow VGG16, cached) against `flow_cnn_only` (a small encoder trained with the network on
  the flow; it cannot be cached, so its run decodes every clip and computes its flow every
  epoch: its own cost line). Alone, because beside the RGB taps a flow_cnn run would run
  the frozen RGB VGG16 on every decoded frame every epoch too (about the whole cache
  build's cost an epoch on 2 cores).

Figures: each epoch's video top-1 (vote) of each model and seed (accuracy after 1, 2 and 8
epochs: how fast each learns, read from the one run of `train.epochs`), the mean over seeds,
the seconds of each epoch and per training clip, and the cache build's seconds with and
without flow. Goal (issue 30): RGB + flow >= 0.9 after the last epoch and never more than 2
points below RGB at any reported epoch.

    python benchmarks/flow_vs_rgb.py --out benchmarks/results/flow_vs_rgb.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import machine
import pyarrow.compute as pc
import ray
from epoch_clock import EpochClock

from data_shards.features import build_feature_cache
from data_shards.index import ensure_index
from data_shards.manifest import load_manifest
from data_shards.synth import synthesize_dataset
from orchestration.config import JlstmConfig
from orchestration.driver import build_trainer, prepare_data
from orchestration.resources import feature_pool, live_nodes
from orchestration.session import plan_run

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "demo_flow.yaml"
MODELS = {
    "rgb": ["pool4", "conv5_3"],
    "rgb_flow": ["pool4", "conv5_3", "flow"],
    "flow_only": ["flow"],
    "flow_cnn_only": ["flow_cnn"],
}
METRIC = "val_video_top1_vote"
REPORT_EPOCHS = (1, 2, 8)


def train(base: JlstmConfig, model: str, seed: int, workdir: Path) -> dict[str, Any]:
    raw = base.model_dump(mode="json")
    raw["model"] = {**raw["model"], "inputs": MODELS[model]}
    raw["model"].pop("taps", None)
    raw["run_name"] = f"flow-vs-rgb-{model}-seed{seed}"
    raw["train"] = {**raw["train"], "seed": seed}
    raw["data"] = {**raw["data"], "seed": seed}
    if model == "flow_cnn_only":  # trained with the network: read from the videos, not a cache
        raw["data"] = {**raw["data"], "use_feature_cache": False}
    cfg = JlstmConfig.model_validate(raw)
    # From scratch: a finished run of an earlier call in this workdir would only resume.
    shutil.rmtree(Path(cfg.cluster.storage_path) / cfg.resolved_run_name(), ignore_errors=True)
    log = workdir / f"{model}-seed{seed}.jsonl"
    log.unlink(missing_ok=True)
    started = time.time()
    data = prepare_data(cfg)
    result = build_trainer(cfg, data, plan_run(cfg), callbacks=[EpochClock(str(log))]).fit()
    if result.error:
        raise RuntimeError(f"{model} seed {seed} failed") from result.error
    epochs = [json.loads(line) for line in log.read_text().splitlines()]
    times = [e["t"] for e in epochs]
    epoch_s = [round(b - a, 1) for a, b in zip([started, *times[:-1]], times, strict=True)]
    train_clips = data.train_clips
    return {
        "model": model, "seed": seed, "inputs": MODELS[model],
        "wall_s": round(time.time() - started, 1),
        "top1_per_epoch": [round(e[METRIC], 4) for e in epochs],
        "epoch_s": epoch_s,
        # The first epoch pays the workers' start; the later ones are the steady cost.
        "s_per_train_clip": round(statistics.median(epoch_s[1:] or epoch_s) / train_clips, 4),
        "train_clips": train_clips,
    }


def summary(runs: list[dict[str, Any]], epochs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model]
        at = {}
        for epoch in (e for e in REPORT_EPOCHS if e <= epochs):
            values = [r["top1_per_epoch"][epoch - 1] for r in mine]
            at[str(epoch)] = {"mean": round(statistics.mean(values), 4), "per_seed": values}
        out[model] = {
            "seeds": [r["seed"] for r in mine], "top1_after_epoch": at,
            "s_per_epoch": round(statistics.mean(statistics.median(r["epoch_s"][1:] or
                                                                   r["epoch_s"]) for r in mine), 1),
            "s_per_train_clip": round(statistics.mean(r["s_per_train_clip"] for r in mine), 4),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    machine.add_out_args(parser, "benchmarks/results/flow_vs_rgb.json", config=CONFIG)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--videos-per-class", type=int, default=16)
    parser.add_argument("--num-frames", type=int, default=48)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--models", default="rgb,rgb_flow")
    parser.add_argument("--encoders", action="store_true",
                        help="also flow_only against flow_cnn_only, on the first seed")
    args = parser.parse_args()

    load_start = machine.load_average()
    workdir, tmp = machine.work_folder(args, "jlstm-flow-vs-rgb-", create=True)
    base = machine.cached_config(args, workdir, f"train.epochs={args.epochs}",
                                 "tracking.attention_examples=0")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    started = time.time()
    machine.start_ray()
    try:
        root = Path(base.data.root)
        if not (root / "ucfTrainTestlist").is_dir():
            synthesize_dataset(root, classes=args.classes, videos_per_class=args.videos_per_class,
                               frame_size=base.model["frame_size"] * 4 // 3,
                               num_frames=args.num_frames, scene="camera")
        ensure_index(base.data)
        manifest = load_manifest(base.data)
        cache_s = {}
        for name, taps in (("rgb", MODELS["rgb"]), ("rgb_flow", MODELS["rgb_flow"])):
            # Timed apart; the second build (with flow) is the one the runs read.
            spec = base.clip_spec(num_classes=args.classes).with_taps(taps)
            cache_started = time.time()
            build_feature_cache(base.data, spec, rebuild=True, **feature_pool(live_nodes()))
            cache_s[name] = round(time.time() - cache_started, 1)
        runs = []
        for seed in seeds:
            for model in args.models.split(","):
                runs.append(train(base, model, seed, workdir))
                print(json.dumps(runs[-1]), flush=True)
        if args.encoders:
            for model in ("flow_only", "flow_cnn_only"):
                runs.append(train(base, model, seeds[0], workdir))
                print(json.dumps(runs[-1]), flush=True)
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    figures = summary(runs, args.epochs)
    result = {
        **machine.result_head("flow_vs_rgb", args, load_start, time.time() - started),
        "config": base.model_dump(mode="json"),
        "setup": {
            "scene": "camera", "classes": args.classes, "chance": round(1 / args.classes, 4),
            "train_videos": int(pc.sum(pc.equal(manifest["subset"], "train")).as_py()),
            "test_videos": int(pc.sum(pc.equal(manifest["subset"], "test")).as_py()),
            "cache_build_s": cache_s,
        },
        "figures": figures,
        "runs": runs,
    }
    machine.write_json(args.out, result)
    print(json.dumps({"figures": figures, "setup": result["setup"]}, indent=2))


if __name__ == "__main__":
    main()
