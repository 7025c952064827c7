"""`jlstm data index|synth` (registered by `jlstm.cli`) and `python -m data_shards.cli`."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter


def _absolute(path: str | None) -> str | None:
    """A file named on the command line, against the caller's folder (the config reads list
    files relative to the splits dir; a flag means what the shell means)."""
    return os.path.abspath(path) if path else None


def _index(args: argparse.Namespace) -> int:
    """Probe the split's videos; print the summary and the quarantine reasons."""
    import pyarrow.parquet as pq
    from pydantic import ValidationError

    from data_shards.cluster import init_ray
    from data_shards.config import DataConfig
    from data_shards.index import index_videos, list_entries

    try:
        data_cfg = DataConfig(
            dataset=args.dataset,
            root=os.path.abspath(args.root),
            splits_dir=_absolute(args.splits_dir),
            split=args.split,
            manifest=_absolute(args.out),
            probe_timeout_s=args.probe_timeout,
            test_fraction=args.test_fraction,
            split_seed=args.split_seed,
            train_list=_absolute(args.train_list),
            test_list=_absolute(args.test_list),
            class_names_file=_absolute(args.class_names),
        )
    except ValidationError as err:
        problems = "; ".join(  # the key, the value given, what is allowed
            f"data.{'.'.join(map(str, e['loc']))} = {e['input']!r}: {e['msg']}"
            if e["loc"] else e["msg"]
            for e in err.errors()
        )
        print(f"jlstm: {problems}", file=sys.stderr)
        return 2
    list_entries(data_cfg)  # a split file that cannot be read is refused before Ray starts
    init_ray()
    result = index_videos(data_cfg)
    print(result.summary())
    subsets = Counter(pq.read_table(result.manifest_path)["subset"].to_pylist())
    print(f"  train {subsets['train']}, test {subsets['test']} videos")
    reasons = pq.read_table(result.quarantine_path)["reason"].to_pylist()
    kinds = Counter(reason.split(":")[0] for reason in reasons)
    for kind, count in kinds.most_common():
        print(f"  quarantined, {kind}: {count}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    """Write the synthetic dataset (class grid, or one video per listed video) and say where."""
    from data_shards.splits import parse_ucf101_splits
    from data_shards.synth import synthesize_dataset, synthesize_from_splits

    if args.splits_from is None:
        if args.every is not None:
            print("--every needs --splits-from", file=sys.stderr)
            return 2
        classes, per_class = args.classes or 4, args.videos_per_class or 6
        out = synthesize_dataset(
            args.out,
            layout=args.layout,
            classes=classes,
            videos_per_class=per_class,
            seed=args.seed,
            frame_size=args.frame_size,
            num_frames=args.num_frames,
            scene=args.scene,
        )
        # The square scene's line as it always was: scripts may read it.
        scene = "" if args.scene == "square" else f", {args.scene} scene"
        print(f"wrote {classes * per_class} videos ({args.layout} layout{scene}) to {out}")
        return 0
    # The listed videos are square-scene videos (their classes are the lists' many classes,
    # more than another scene has patterns): another scene is refused, not ignored.
    if args.scene != "square":
        print(f"--splits-from writes the square scene only: drop --scene {args.scene}",
              file=sys.stderr)
        return 2
    # The lists decide classes, videos and layout: a flag that would too is refused, not
    # silently overridden.
    clashes = [
        flag
        for flag, given in (
            ("--classes", args.classes is not None),
            ("--videos-per-class", args.videos_per_class is not None),
            ("--layout", args.layout != "ucf101"),
        )
        if given
    ]
    if clashes:
        print(
            f"--splits-from sets classes, videos and layout: drop {', '.join(clashes)}",
            file=sys.stderr,
        )
        return 2
    out = synthesize_from_splits(
        args.out,
        args.splits_from,
        every=args.every or 1,
        seed=args.seed,
        frame_size=args.frame_size,
        num_frames=args.num_frames,
    )
    videos = len(parse_ucf101_splits(out / "ucfTrainTestlist", 1))  # each split lists all
    print(f"wrote {videos} videos (ucf101 layout, lists of {args.splits_from}) to {out}")
    return 0


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `index` and `synth` on `subparsers`; each sets func(args) -> exit code."""
    index = subparsers.add_parser("index", help="probe a split's videos, write the manifest")
    index.add_argument("--dataset", required=True, choices=["ucf101", "hmdb51", "folder"])
    index.add_argument(
        "--root",
        required=True,
        help="folder of class folders as published, or one holding them "
        "(UCF-101/, hmdb51/ or videos/)",
    )
    index.add_argument(
        "--splits-dir",
        default=None,
        help="default: ucfTrainTestlist/ or testTrainMulti_7030_splits/ in or "
        "beside the root; for folder, the root (holding split<N>.csv, if any: without it "
        "the class folders are split by --test-fraction)",
    )
    index.add_argument("--split", type=int, default=1, choices=[1, 2, 3])
    index.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="folder of class folders without a split file: each class's share of test "
        "videos, picked by a hash of (--split-seed, path): the same files, the same split",
    )
    index.add_argument("--split-seed", type=int, default=0, help="seed of that hash")
    index.add_argument(
        "--train-list",
        default=None,
        help="folder: MMAction2-style list of training videos, 'path label' per line (path "
        "under the root's videos, label a class name or, with --class-names, a number)",
    )
    index.add_argument("--test-list", default=None, help="the test videos, as --train-list")
    index.add_argument(
        "--class-names",
        default=None,
        help="names of the lists' numbered labels: classInd-style 'N name' lines, or one "
        "name per line (numbered from 0)",
    )
    index.add_argument(
        "--out",
        default=None,
        help="manifest Parquet (default <root>/manifest_split<N>.parquet); "
        "the quarantine table goes beside it",
    )
    index.add_argument(
        "--probe-timeout",
        type=float,
        default=20.0,
        help="seconds before a probe is killed and its video quarantined",
    )
    index.set_defaults(func=_index)

    synth = subparsers.add_parser("synth", help="write a synthetic motion-only dataset")
    synth.add_argument("--out", required=True)
    synth.add_argument("--layout", default="ucf101", choices=["ucf101", "hmdb51"])
    synth.add_argument("--classes", type=int, default=None, help="default 4")
    synth.add_argument("--videos-per-class", type=int, default=None, help="default 6")
    synth.add_argument(
        "--splits-from",
        default=None,
        help="a UCF101 split-list folder (classInd.txt, train/testlist0N.txt): one video per "
        "listed video, at its path, and these lists (tests/fixtures/ucfTrainTestlist: "
        "UCF101's 13,320 videos; --frame-size 32 --num-frames 4 writes them in minutes)",
    )
    synth.add_argument(
        "--every",
        type=int,
        default=None,
        help="with --splits-from: keep every n-th listed video (10: 1,332 of UCF101's)",
    )
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--frame-size", type=int, default=64)
    synth.add_argument("--num-frames", type=int, default=48)
    synth.add_argument(
        "--scene",
        default="square",
        choices=["square", "camera"],
        help="square: a square's direction and speed is the class (1..16 classes); camera: "
        "an object's speed and motion pattern is the class, under a panning, shaking camera "
        "with a moving distractor (1..6 classes), for RGB vs RGB + optical flow",
    )
    synth.set_defaults(func=_synth)


def main(argv: list[str] | None = None) -> int:
    """`python -m data_shards.cli index|synth ...`."""
    parser = argparse.ArgumentParser(prog="python -m data_shards.cli")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
