"""The run commands of `jlstm` (train, eval, predict, plan, demo, data features), registered
on the top-level parser by `jlstm.cli`.

Each command imports what it runs when it runs: `jlstm --help` (and a mistyped flag) then
answers without importing Ray, torch or MLflow (seconds of imports).
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestration.config import JlstmConfig
    from orchestration.resources import NodeShape


def _splits(text: str) -> list[int]:
    try:
        splits = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--splits {text!r}: expected e.g. 1,2,3") from None
    if not splits or any(s not in (1, 2, 3) for s in splits):
        raise argparse.ArgumentTypeError(f"--splits {text!r}: each split must be 1, 2 or 3")
    return splits


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds > 0")
    return value


def add_overrides_arg(
    parser: argparse.ArgumentParser,
    text: str = "override a config key, e.g. --set train.epochs=3 (repeatable)",
) -> None:
    """`--set KEY=VALUE` (repeatable) into `args.overrides`: every command that reads a
    config takes it alike."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=text
    )


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    add_overrides_arg(parser)


def _cmd_train(args: argparse.Namespace) -> int:
    from orchestration.config import load_config
    from orchestration.run import print_results, train_splits

    cfg = load_config(args.config, args.overrides)
    if args.new_run:  # a fresh run (and Ray Train folder) beside the one of this name
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        cfg = cfg.model_copy(update={"run_name": f"{cfg.resolved_run_name()}-{stamp}"})
    splits = args.splits or [args.split or cfg.data.split]
    print_results(train_splits(cfg, splits))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from orchestration.config import load_config
    from orchestration.inference import evaluate_model
    from orchestration.tracking import log_evaluation

    cfg = load_config(args.config, args.overrides)
    metrics = evaluate_model(args.model, cfg, out_dir=args.out)
    for key, value in sorted(metrics.items()):
        print(f"{key:28s} {value:.4f}")
    run_id = log_evaluation(args.model, metrics, args.out)
    print(f"report written to {args.out}, logged to MLflow run {run_id}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from data_shards.splits import VIDEO_EXTENSIONS
    from orchestration.batch_predict import DEFAULT_OUT, LIST_SUFFIXES, predict_many
    from orchestration.config import load_config
    from orchestration.errors import ConfigError
    from orchestration.inference import predict_video

    source = Path(args.input)
    if not source.exists():  # before loading a model: a typo answers at once
        raise FileNotFoundError(f"INPUT {args.input!r} does not exist")
    if args.overrides and not args.config:
        raise ConfigError("--set needs --config")
    cfg = load_config(args.config, args.overrides) if args.config else None
    timeout_s = args.decode_timeout_s or (cfg and cfg.data.decode_timeout_s) or None
    one_video = not source.is_dir() and source.suffix.lower() not in LIST_SUFFIXES
    if args.attention and not (one_video and args.out is None):
        raise ConfigError("--attention draws one video: give one video and no --out")
    if one_video and args.out is None:
        ranked = predict_video(
            source, args.model, top_k=args.top_k, attention_png=args.attention,
            frame_interval=args.frame_interval,
            **({"decode_timeout_s": timeout_s} if timeout_s else {}),
        )
        for name, prob in ranked:
            print(f"{prob:7.2%}  {name}")
        return 0
    if one_video and source.suffix.lower() not in VIDEO_EXTENSIONS:
        print(f"jlstm: {source} is read as a video (a list file ends "
              f"{', '.join(sorted(LIST_SUFFIXES))})")
    summary = predict_many(
        source, args.model, args.out or DEFAULT_OUT, top_k=args.top_k,
        frame_interval=args.frame_interval, use_gpu=bool(cfg and cfg.cluster.use_gpu),
        **({"decode_timeout_s": timeout_s} if timeout_s else {}),
    )
    print(
        f"{summary.videos} videos: {summary.predicted} predicted ({summary.errors} with an "
        f"error), {summary.skipped} already there; {summary.seconds:.1f} s; rows in {summary.out}"
    )
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from data_shards.cluster import init_ray
    from data_shards.features import build_feature_cache
    from data_shards.index import ensure_index
    from data_shards.splits import class_names
    from orchestration.config import load_config
    from orchestration.resources import feature_pool, live_nodes

    cfg = load_config(args.config, args.overrides)
    init_ray()
    manifest = ensure_index(cfg.data)
    info = build_feature_cache(
        cfg.data, cfg.clip_spec(len(class_names(manifest))), rebuild=args.rebuild,
        **feature_pool(live_nodes()),
    )
    print(
        f"feature cache {info.cache_dir}: {info.num_videos} videos ({info.num_failed} failed), "
        f"{info.total_bytes / 2**20:.1f} MiB, {info.bytes_per_video / 2**20:.2f} MiB per video"
    )
    if info.num_failed:  # their clips will be bad clips: say which and why, once
        print(f"  {info.num_failed} failed; first: {info.first_error}")
    return 0


def plan_report(cfg: JlstmConfig, nodes: list[NodeShape]) -> dict[str, Any]:
    """`jlstm plan --json`: the resource plan on `nodes` and the size of an epoch; for an
    elastic run (`cluster.min_workers`) also the placement at each end of its range."""
    from data_shards.sizing import data_size
    from data_shards.splits import class_names
    from orchestration.batching import rank_batch_sizes, steps_per_epoch
    from orchestration.resources import plan_resources

    manifest = cfg.data.manifest_path()
    num_classes = len(class_names(manifest)) if manifest.is_file() else 2
    size = data_size(cfg.data, cfg.clip_spec(num_classes))
    plan = plan_resources(cfg.cluster, cfg.data.decode_cpus, nodes)
    report: dict[str, Any] = plan.to_dict()
    if plan.elastic:
        for key, workers in (("at_min_workers", plan.min_workers),
                             ("at_num_workers", plan.max_workers)):
            fixed = cfg.cluster.model_copy(update={"num_workers": workers, "min_workers": None})
            report[key] = plan_resources(fixed, cfg.data.decode_cpus, nodes).to_dict()
    steps = None
    if size.train_clips is not None:
        steps = steps_per_epoch(size.train_clips, cfg.train.batch_size)
    return {
        **report,
        "global_batch": cfg.train.batch_size,
        "rank_batch_sizes": rank_batch_sizes(cfg.train.batch_size, plan.num_workers),
        "clips_per_epoch": size.train_clips,
        "test_clips": size.test_clips,
        "steps_per_epoch": steps,
        "cache_bytes": size.cache_bytes,
        "bytes_per_clip": size.bytes_per_clip,
        "data_source": size.source,
        "flow_pairs": size.flow_pairs,
        "flow_cpu_hours": size.flow_cpu_hours,
        "flow_when": size.flow_when,
    }


def print_plan(report: dict[str, Any]) -> None:
    """The plan as a short table a person reads."""
    verdict = "fits" if report["fits"] else f"does not fit: {report['reason']}"
    print(f"nodes: {report['node_shapes']}  ->  {verdict}")
    if report["min_workers"] < report["max_workers"]:
        print(f"  elastic: {report['min_workers']} to {report['max_workers']} workers; "
              + (f"starts with {report['num_workers']}" if report["fits"] else "cannot start"))
        for key, title in (("at_min_workers", "min_workers"), ("at_num_workers", "num_workers")):
            placed = report[key]
            fits = "fits" if placed["fits"] else f"not on these nodes: {placed['reason']}"
            print(f"  at cluster.{title} = {placed['num_workers']}: {fits}")
            _print_workers(placed, indent="    ")
    else:
        _print_workers(report, indent="  ")
    if report["fits"]:
        print(f"  Ray Data keeps {report['data_cpus']:g} CPUs")

    def number(key: str, unit: str = "") -> str:
        value = report[key]
        return "unknown" if value is None else f"{value:,}{unit}"

    gib = report["cache_bytes"] / 2**30 if report["cache_bytes"] is not None else None
    print(f"  data ({report['data_source']}): {number('clips_per_epoch')} training clips, "
          f"{number('steps_per_epoch')} steps of {report['global_batch']} clips per epoch "
          f"(at any number of workers), {number('test_clips')} test clips")
    print(f"  {report['bytes_per_clip'] / 2**20:.2f} MiB per clip; feature cache "
          + ("unknown" if gib is None else f"{gib:,.1f} GiB"))
    if report.get("flow_pairs") is not None:
        print(f"  optical flow: {report['flow_pairs']:,} DIS pairs {report['flow_when']}, "
              f"about {report['flow_cpu_hours']:,.1f} CPU hours")


def _print_workers(plan: dict[str, Any], indent: str) -> None:
    nodes = plan["nodes"]
    for rank, worker in enumerate(plan["workers"]):
        node = nodes[worker["node"]]
        shape = f"{node['cpus']:g} CPU" + (f", {node['gpus']:g} GPU" if node["gpus"] else "")
        print(f"{indent}worker {rank}: node {worker['node']} ({node['name']}: {shape}) takes "
              f"{worker['CPU']:g} CPU + {worker['GPU']:g} GPU")


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from data_shards.cluster import init_ray
    from orchestration.config import load_config
    from orchestration.resources import live_nodes, parse_nodes

    cfg = load_config(args.config, args.overrides)
    if args.nodes:
        nodes = parse_nodes(args.nodes)
    else:
        init_ray()
        nodes = live_nodes()
    report = plan_report(cfg, nodes)
    if args.json:
        print(json.dumps(report))
    else:
        print_plan(report)
    return 0 if report["fits"] else 2


def _cmd_demo(args: argparse.Namespace) -> int:
    from orchestration.demo import run_demo

    return run_demo(workdir=args.workdir, overrides=args.overrides)


def add_run_commands(commands: Any, data_commands: Any) -> None:
    """Register train, eval, predict, demo and plan on `commands`, and features on the
    `data` group's `data_commands`; each sets func(args) -> exit code."""
    features = data_commands.add_parser(
        "features", help="compute the frozen VGG16 taps once and cache them (.npy per video)"
    )
    _add_config_args(features)
    features.add_argument("--rebuild", action="store_true", help="rebuild even a fresh cache")
    features.set_defaults(func=_cmd_features)

    train = commands.add_parser("train", help="train with Ray Train DDP, evaluate, log to MLflow")
    _add_config_args(train)
    which = train.add_mutually_exclusive_group()
    which.add_argument("--split", type=int, choices=(1, 2, 3), help="one official split")
    which.add_argument("--splits", type=_splits, help="several splits, e.g. 1,2,3 (averaged)")
    train.add_argument(
        "--new-run", action="store_true",
        help="start a new run (the name gets a UTC timestamp) instead of resuming this one",
    )
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a logged model on every test clip")
    evaluate.add_argument("--model", required=True, help="models:/jlstm-ucf101@champion, runs:/...")
    _add_config_args(evaluate)
    evaluate.add_argument("--out", default="runs/eval", help="folder for the report files")
    evaluate.set_defaults(func=_cmd_eval)

    predict = commands.add_parser(
        "predict", help="top-k classes of one video; many videos to a Parquet dataset (Ray Data)"
    )
    predict.add_argument(
        "input", metavar="INPUT",
        help="a video, a folder (searched recursively) or a list of paths (.txt, .csv)",
    )
    predict.add_argument("--model", required=True, help="models:/jlstm-<dataset>@champion")
    predict.add_argument(
        "--out", metavar="DIR",
        help="Parquet dataset (a folder of part files) of one row per video; a re-run skips "
        "the videos already there (default for a folder or list: predictions.parquet)",
    )
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument(
        "--frame-interval", type=int, help="default: the one the model was trained with"
    )
    predict.add_argument(
        "--decode-timeout-s", type=_positive_float, metavar="S",
        help="deadline of one decode call (default: the config's data.decode_timeout_s, 30)",
    )
    predict.add_argument("--attention", metavar="OUT.png", help="also draw the attention maps")
    predict.add_argument(
        "--config", help="run config: cluster.use_gpu (a GPU per scoring actor), "
        "data.decode_timeout_s",
    )
    add_overrides_arg(predict, "override a key of --config (repeatable)")
    predict.set_defaults(func=_cmd_predict)

    demo = commands.add_parser(
        "demo", help="synthetic videos -> index -> features -> 2-worker training -> MLflow"
    )
    demo.add_argument("--workdir", default="runs/demo", help="where the demo's data goes")
    add_overrides_arg(demo)
    demo.set_defaults(func=_cmd_demo)
    plan = commands.add_parser(
        "plan", help="dry run: where the workers go, what Ray Data keeps, how big an epoch is"
    )
    _add_config_args(plan)
    plan.add_argument(
        "--nodes", nargs="+", metavar="SHAPE",
        help="node shapes COUNTxCPU[:GPU], e.g. --nodes 1x8 4x8:1 (default: the live cluster)",
    )
    plan.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    plan.set_defaults(func=_cmd_plan)
