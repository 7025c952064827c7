"""`jlstm`: the command line (also `python -m orchestration.cli`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from orchestration.config import ConfigError, load_config


def _splits(text: str) -> list[int]:
    try:
        splits = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--splits {text!r}: expected e.g. 1,2,3") from None
    if not splits or any(s not in (1, 2, 3) for s in splits):
        raise argparse.ArgumentTypeError(f"--splits {text!r}: each split must be 1, 2 or 3")
    return splits


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=3 (repeatable)",
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from orchestration.trainer import print_results, train_splits

    cfg = load_config(args.config, args.overrides)
    splits = args.splits or [args.split or cfg.data.split]
    print_results(train_splits(cfg, splits))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from orchestration.inference import evaluate_model

    cfg = load_config(args.config, args.overrides)
    report = evaluate_model(args.model, cfg, out_dir=args.out)
    for key, value in sorted(report.metrics.items()):
        print(f"{key:28s} {value:.4f}")
    print(f"report written to {args.out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from orchestration.inference import predict_video

    ranked = predict_video(
        args.video, args.model, top_k=args.top_k, attention_png=args.attention,
        frame_interval=args.frame_interval,
    )
    for name, prob in ranked:
        print(f"{prob:7.2%}  {name}")
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from data_shards import build_feature_cache, class_names, ensure_index
    from orchestration.trainer import init_ray

    cfg = load_config(args.config, args.overrides)
    init_ray()
    manifest = ensure_index(cfg.data)
    info = build_feature_cache(
        cfg.data, cfg.resolve_model(len(class_names(manifest))), rebuild=args.rebuild
    )
    print(
        f"feature cache {info.cache_dir}: {info.num_videos} videos ({info.num_failed} failed), "
        f"{info.total_bytes / 2**20:.1f} MiB, {info.bytes_per_video / 2**20:.2f} MiB per video"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from orchestration.demo import run_demo

    return run_demo(workdir=args.workdir, overrides=args.overrides)


def build_parser() -> argparse.ArgumentParser:
    from data_shards.cli import add_data_commands
    from tune_spaces.cli import add_tune_command

    parser = argparse.ArgumentParser(
        prog="jlstm",
        description="Train and evaluate the joint-attention LSTM (Wu et al. 2016) with Ray "
        "and MLflow.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="index videos, synthesize a dataset, cache features")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    add_data_commands(data_commands)
    features = data_commands.add_parser(
        "features", help="compute the frozen VGG16 taps once and cache them (fp16 Parquet)"
    )
    _add_config_args(features)
    features.add_argument("--rebuild", action="store_true", help="rebuild even a fresh cache")
    features.set_defaults(func=_cmd_features)

    train = commands.add_parser("train", help="train with Ray Train DDP, evaluate, log to MLflow")
    _add_config_args(train)
    which = train.add_mutually_exclusive_group()
    which.add_argument("--split", type=int, choices=(1, 2, 3), help="one official split")
    which.add_argument("--splits", type=_splits, help="several splits, e.g. 1,2,3 (averaged)")
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a logged model on every test clip")
    evaluate.add_argument("--model", required=True, help="models:/jlstm-ucf101@champion, runs:/...")
    _add_config_args(evaluate)
    evaluate.add_argument("--out", default="runs/eval", help="folder for the report files")
    evaluate.set_defaults(func=_cmd_eval)

    predict = commands.add_parser("predict", help="top-k classes of one video")
    predict.add_argument("video", help="a video file")
    predict.add_argument("--model", required=True, help="models:/jlstm-<dataset>@champion")
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument(
        "--frame-interval", type=int, help="default: the one the model was trained with"
    )
    predict.add_argument("--attention", metavar="OUT.png", help="also draw the attention maps")
    predict.set_defaults(func=_cmd_predict)

    demo = commands.add_parser(
        "demo", help="synthetic videos -> index -> features -> 2-worker training -> MLflow"
    )
    demo.add_argument("--workdir", default="runs/demo", help="where the demo's data goes")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.set_defaults(func=_cmd_demo)
    add_tune_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from orchestration.tracking import TrackingUnavailable

    try:
        return args.func(args)
    except ConfigError as err:
        print(f"jlstm: config error: {err}", file=sys.stderr)
        return 2
    except TrackingUnavailable as err:
        print(f"jlstm: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
