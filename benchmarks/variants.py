"""Synthetic video top-1 of the paper's variants: late_fusion vs vgg_lstm vs single_conv5_3.

One synthetic dataset is generated, indexed and cached (pool4 + conv5_3 taps; the cache of
more taps serves single_conv5_3 too), then each variant is trained from scratch by Ray Train
(`build_trainer(...).fit()`, no MLflow) with the demo's data size, model sizes and training
settings from configs/demo.yaml (its 8 epochs; about 4 minutes a variant on 2 cores), the
same epochs and seed for all, and evaluated on every test clip. Figures:
the last epoch's val_video_top1_vote and val_video_top1_prob per variant (and the per-epoch
curve), against chance = 1 / classes.

    python benchmarks/variants.py --out benchmarks/results/variants.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import machine
import pyarrow.compute as pc
import ray
import ray.train
from epoch_clock import EpochClock

from data_shards.features import build_feature_cache
from data_shards.manifest import load_manifest
from model import JointAttentionNet
from orchestration.config import JlstmConfig
from orchestration.driver import build_trainer, prepare_data
from orchestration.session import plan_run

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
VARIANTS = ("late_fusion", "vgg_lstm", "single_conv5_3")
CACHE_TAPS = ("pool4", "conv5_3")  # serves all three variants
REPORTED = (
    "val_video_top1_vote",
    "val_video_top1_prob",
    "val_clip_top1_vote",
    "val_video_mean_class_vote",
    "train_clip_top1",
    "loss_total",
    "loss_lstm",
)


def train_variant(base: JlstmConfig, variant: str, workdir: Path) -> dict[str, Any]:
    cfg = JlstmConfig.model_validate(
        {**base.model_dump(mode="json"), "variant": variant, "run_name": f"bench-{variant}"}
    )
    log = workdir / f"{variant}.jsonl"
    log.unlink(missing_ok=True)
    started = time.time()
    data = prepare_data(cfg)
    result = build_trainer(cfg, data, plan_run(cfg), callbacks=[EpochClock(str(log))]).fit()
    if result.error:
        raise RuntimeError(f"variant {variant} failed") from result.error
    epochs = [json.loads(line) for line in log.read_text().splitlines()]
    final = epochs[-1]
    return {
        "variant": variant,
        "taps": list(data.model_cfg.taps),
        "temporal": data.model_cfg.temporal,
        "trainable_params": sum(
            p.numel() for p in JointAttentionNet(data.model_cfg).parameters() if p.requires_grad
        ),
        "wall_s": round(time.time() - started, 1),
        "epochs": len(epochs),
        "final": {k: round(final[k], 4) for k in REPORTED if k in final},
        "per_epoch": {
            k: [round(e[k], 4) for e in epochs if k in e]
            for k in ("val_video_top1_vote", "val_video_top1_prob", "loss_total")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    machine.add_out_args(parser, "benchmarks/results/variants.json", config=DEMO_CONFIG)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    machine.add_video_args(parser, videos_per_class=24, help="the demo's: 24")
    parser.add_argument("--epochs", type=int, default=0,
                        help="epochs of every variant; 0 (default): the config's")
    args = parser.parse_args()

    load_start = machine.load_average()
    workdir, tmp = machine.work_folder(args, "jlstm-variants-", create=True)
    epochs = [f"train.epochs={args.epochs}"] if args.epochs else []  # 0: the config's
    base = machine.cached_config(args, workdir, *epochs)
    variants = [v for v in args.variants.split(",") if v]
    started = time.time()
    machine.start_ray()
    try:
        machine.synthesize_videos(base, args)
        manifest = load_manifest(base.data)
        cache_spec = base.clip_spec(num_classes=args.classes).with_taps(CACHE_TAPS)
        cache_started = time.time()
        build_feature_cache(base.data, cache_spec)
        cache_s = time.time() - cache_started
        results = {}
        for variant in variants:
            results[variant] = train_variant(base, variant, workdir)
            print(json.dumps(results[variant]), flush=True)
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()

    figures = {
        v: {k: r["final"].get(k) for k in ("val_video_top1_vote", "val_video_top1_prob")}
        for v, r in results.items()
    }
    result = {
        **machine.result_head("variants", args, load_start, time.time() - started),
        "config": base.model_dump(mode="json"),
        "setup": {
            "classes": args.classes,
            "chance": round(1 / args.classes, 4),
            "train_videos": int(pc.sum(pc.equal(manifest["subset"], "train")).as_py()),
            "test_videos": int(pc.sum(pc.equal(manifest["subset"], "test")).as_py()),
            "cache_taps": list(CACHE_TAPS),
            "cache_build_s": round(cache_s, 1),
        },
        "figures": figures,
        "runs": results,
    }
    machine.write_json(args.out, result)
    print(json.dumps({"figures": figures, "setup": result["setup"]}, indent=2))


if __name__ == "__main__":
    main()
