"""Your own videos: a folder of class folders split by a hash, MMAction2-style list files,
the CSV, and a dataset that moves (paths relative to `data.root`): read, decoded and
read from its cache at the new root without re-indexing or rebuilding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from pydantic import ValidationError
from tiny_run import tiny_config

from data_shards.clip_spec import ClipSpec
from data_shards.config import DataConfig
from data_shards.datasets import build_datasets, clip_readers, iter_clip_batches
from data_shards.errors import MissingVideosError, SplitFileError
from data_shards.features import KEY_FILE, build_feature_cache, cache_key, check_cache
from data_shards.index import index_videos, list_entries
from data_shards.manifest import load_manifest
from data_shards.run_data import load_run_data
from data_shards.synth import synthesize_dataset, write_index_video
from data_shards.targets import load_target_cells
from jlstm import cli
from model import ModelConfig, VGG16Taps

# A class-folder tree uses the extensions a user's videos come with (any case).
EXTENSIONS = [".avi", ".mp4", ".mkv", ".MOV", ".webm", ".mpg"]


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real tiny video, copied under every name a tree needs."""
    return write_index_video(tmp_path_factory.mktemp("one") / "v.avi", 4, size=32)


def _add(root: Path, video: Path, name: str, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        target = root / name / f"clip_{i:03d}{EXTENSIONS[i % len(EXTENSIONS)]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(video, target)


def _split(root: Path, **data: object) -> dict[str, tuple[str, str]]:
    entries, _ = list_entries(DataConfig(dataset="folder", root=str(root), **data))
    return {e.path: (e.label_name, e.subset) for e in entries}


def _tests(split: dict[str, tuple[str, str]], name: str) -> int:
    return sum(subset == "test" for label, subset in split.values() if label == name)


def test_class_folders_give_a_stratified_split_identical_twice(
    tmp_path: Path, video: Path
) -> None:
    counts = {"jump": 10, "run": 5, "wave": 7}
    for name, count in counts.items():
        _add(tmp_path, video, name, count)
    (tmp_path / "wave" / "outdoor").mkdir()
    shutil.copyfile(video, tmp_path / "wave" / "outdoor" / "far.mp4")  # found at any depth
    (tmp_path / "run" / "notes.txt").write_text("not a video")
    shutil.copyfile(video, tmp_path / "run" / ".hidden.avi")
    shutil.copyfile(video, tmp_path / "stray.avi")  # in no class folder: no class
    (tmp_path / "empty_folder").mkdir()  # no videos: no class
    counts["wave"] += 1

    split = _split(tmp_path)
    assert split == _split(tmp_path)  # the same files, the same split
    entries, names = list_entries(DataConfig(dataset="folder", root=str(tmp_path)))
    assert names == ["jump", "run", "wave"]
    assert {(e.label, e.label_name) for e in entries} == {(0, "jump"), (1, "run"), (2, "wave")}
    assert len(split) == sum(counts.values())
    assert "wave/outdoor/far.mp4" in split and "run/notes.txt" not in split
    for name, count in counts.items():
        assert _tests(split, name) == round(0.2 * count)
    half = _split(tmp_path, test_fraction=0.5, split_seed=3)
    assert {name: _tests(half, name) for name in counts} == {"jump": 5, "run": 2, "wave": 4}
    assert _split(tmp_path, split_seed=1) != split  # another seed, another split


def test_adding_a_file_moves_at_most_one_other(tmp_path: Path, video: Path) -> None:
    _add(tmp_path, video, "jump", 4)
    _add(tmp_path, video, "run", 6)
    before = _split(tmp_path)
    moved_any = False
    for i in range(4, 16):
        _add(tmp_path, video, "jump", 1, start=i)
        after = _split(tmp_path)
        moved = [path for path in before if after[path] != before[path]]
        assert len(moved) <= 1, moved
        assert _tests(after, "jump") == round(0.2 * (i + 1))
        assert all(after[p] == before[p] for p in before if before[p][0] == "run")
        moved_any |= bool(moved)
        before = after
    assert moved_any  # the rule was exercised, not only an empty test set


def test_list_files_with_class_names_and_with_indices(tmp_path: Path, video: Path) -> None:
    _add(tmp_path, video, "jump", 3)
    _add(tmp_path, video, "run", 3)
    (tmp_path / "train.txt").write_text(
        "jump/clip_000.avi jump\njump/clip_001.mp4 jump\nrun/clip_000.avi run\n"
    )
    (tmp_path / "test.txt").write_text("jump/clip_002.mkv jump\r\nrun/clip_001.mp4 run\r\n")
    named = _split(tmp_path, train_list="train.txt", test_list="test.txt")
    assert named == {
        "jump/clip_000.avi": ("jump", "train"), "jump/clip_001.mp4": ("jump", "train"),
        "run/clip_000.avi": ("run", "train"), "jump/clip_002.mkv": ("jump", "test"),
        "run/clip_001.mp4": ("run", "test"),
    }

    # Indices: classInd-style (numbers as written) or one name per line (from 0); the
    # names file's order gives the labels, so "walk" keeps its place without videos.
    (tmp_path / "classInd.txt").write_text("1 jump\n2 walk\n3 run\n")
    (tmp_path / "labels.txt").write_text("jump\nwalk\nrun\n")
    for names_file, first in (("classInd.txt", 1), ("labels.txt", 0)):
        for listing in ("train", "test"):
            text = (tmp_path / f"{listing}.txt").read_text()
            numbered = text.replace(" jump", f" {first}").replace(" run", f" {first + 2}")
            (tmp_path / f"{listing}_{names_file}").write_text(numbered)
        cfg = DataConfig(
            dataset="folder", root=str(tmp_path), train_list=f"train_{names_file}",
            test_list=f"test_{names_file}", class_names_file=names_file,
        )
        entries, names = list_entries(cfg)
        assert names == ["jump", "walk", "run"]
        assert {e.path: (e.label_name, e.subset) for e in entries} == named
        assert {e.label for e in entries if e.label_name == "run"} == {2}

    # Lists numbered from 0 against a classInd numbered from 1: refused, never shifted.
    with pytest.raises(SplitFileError, match="label '0' is not a class of"):
        list_entries(DataConfig(
            dataset="folder", root=str(tmp_path), train_list="train_labels.txt",
            test_list="test_labels.txt", class_names_file="classInd.txt",
        ))


def test_an_index_list_without_class_names_is_refused_in_one_line(
    tmp_path: Path, video: Path, capsys: pytest.CaptureFixture
) -> None:
    _add(tmp_path, video, "jump", 2)
    (tmp_path / "train.txt").write_text("jump/clip_000.avi 0\n")
    (tmp_path / "test.txt").write_text("jump/clip_001.mp4 0\n")
    code = cli.main([
        "data", "index", "--dataset", "folder", "--root", str(tmp_path),
        "--train-list", str(tmp_path / "train.txt"), "--test-list", str(tmp_path / "test.txt"),
    ])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("jlstm: split file error: ") and "train.txt, line 1" in line
    assert "--class-names" in line


def test_the_csv_still_decides_when_there_is_one(tmp_path: Path, video: Path) -> None:
    _add(tmp_path, video, "jump", 3)
    _add(tmp_path, video, "run", 3)
    (tmp_path / "split1.csv").write_text(
        "path,label,subset\njump/clip_000.avi,jump,test\nrun/clip_001.mp4,run,train\n"
    )
    assert _split(tmp_path) == {
        "jump/clip_000.avi": ("jump", "test"), "run/clip_001.mp4": ("run", "train"),
    }


def test_the_split_keys_are_validated() -> None:
    with pytest.raises(ValidationError, match="test_fraction"):
        DataConfig(dataset="folder", root="r", test_fraction=1.0)
    with pytest.raises(ValidationError, match="split_seed"):
        DataConfig(dataset="folder", root="r", split_seed=-1)
    with pytest.raises(ValidationError, match="give both list files or neither"):
        DataConfig(dataset="folder", root="r", train_list="train.txt")
    with pytest.raises(ValidationError, match="set train_list and test_list too"):
        DataConfig(dataset="folder", root="r", class_names_file="classInd.txt")
    with pytest.raises(ValidationError, match="are for dataset = 'folder', not 'ucf101'"):
        DataConfig(dataset="ucf101", root="r", train_list="a.txt", test_list="b.txt")


def test_jlstm_data_index_splits_class_folders_on_ray(
    ray_cluster: None, tmp_path: Path, video: Path, capsys: pytest.CaptureFixture
) -> None:
    """`jlstm data index --dataset folder --root DIR`: every video probed, paths relative to
    the root, the split of `--test-fraction` and `--split-seed`."""
    counts = {"jump": 6, "run": 4}
    for name, count in counts.items():
        _add(tmp_path / "mine", video, name, count)
    code = cli.main([
        "data", "index", "--dataset", "folder", "--root", str(tmp_path / "mine"),
        "--test-fraction", "0.5", "--split-seed", "7",
    ])
    assert code == 0, capsys.readouterr().err
    assert "train 5, test 5 videos" in capsys.readouterr().out
    manifest = pq.read_table(tmp_path / "mine" / "manifest_split1.parquet").to_pylist()
    assert len(manifest) == 10
    assert {row["video_path"] for row in manifest} == set(
        _split(tmp_path / "mine", test_fraction=0.5, split_seed=7)
    )
    expected = _split(tmp_path / "mine", test_fraction=0.5, split_seed=7)
    assert {r["video_path"]: (r["label_name"], r["subset"]) for r in manifest} == expected


# The moved dataset: indexed and cached at one root, then moved and used at another.

TAPS = ["conv4_3"]


@pytest.fixture(scope="module")
def moved(
    ray_cluster: None, tmp_path_factory: pytest.TempPathFactory
) -> tuple[DataConfig, ClipSpec, dict, Path]:
    """A synthetic dataset (the demo's layout) indexed and cached at `before/data`, then
    moved to `after/data`: the config of the new root, the model, the cache's key as
    written, and the folder both roots are in."""
    tmp = tmp_path_factory.mktemp("moved")
    synthesize_dataset(
        tmp / "before" / "data", classes=2, videos_per_class=3, frame_size=40, num_frames=20
    )
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALIZED"):
        torch.save(VGG16Taps(TAPS, 2, weights=None).state_dict(), tmp / "vgg.pt")
    clip_spec = ClipSpec.of(ModelConfig(
        num_classes=2, frame_size=32, clip_len=6, last_steps=3, taps=TAPS, map_size=2,
        backbone_weights=str(tmp / "vgg.pt"),
    ))
    before = DataConfig(
        dataset="ucf101", root=str(tmp / "before" / "data"), train_stride=5, decode_cpus=0.5,
        feature_cache=str(tmp / "before" / "data" / "features"), use_feature_cache=True,
    )
    index_videos(before, show_progress=False)
    assert build_feature_cache(before, clip_spec).num_failed == 0
    key = json.loads((Path(str(before.feature_cache)) / KEY_FILE).read_text())
    (tmp / "after").mkdir()
    shutil.move(tmp / "before" / "data", tmp / "after" / "data")
    after = before.model_copy(update={
        "root": str(tmp / "after" / "data"),
        "feature_cache": str(tmp / "after" / "data" / "features"),
    })
    return after, clip_spec, key, tmp


def test_a_moved_dataset_is_read_decoded_and_cached_at_its_new_root(
    moved: tuple[DataConfig, ClipSpec, dict, Path],
) -> None:
    data_cfg, clip_spec, key, tmp = moved
    assert not (tmp / "before" / "data").exists()
    manifest = load_manifest(data_cfg)
    assert not any(Path(p).is_absolute() for p in manifest["video_path"].to_pylist())

    # The cache: the same key, found fresh, reused as it is (no file rewritten).
    assert cache_key(data_cfg, clip_spec, manifest) == key
    assert check_cache(data_cfg, clip_spec, manifest) == key
    cache_dir = Path(str(data_cfg.feature_cache))
    stamps = {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()}
    assert build_feature_cache(data_cfg, clip_spec).key == key
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()} == stamps
    run = load_run_data(data_cfg, lambda num_classes: clip_spec)
    for name, read in clip_readers(data_cfg, clip_spec, run.cache_key).items():
        rows = list(iter_clip_batches(
            build_datasets(data_cfg, clip_spec, run_data=run)[name], 8, read
        ))
        assert rows and all(batch["ok"].all() for batch in rows), name

    # Decoding: Ray Data's tasks open every clip's video at the new root.
    decoding = data_cfg.model_copy(update={"use_feature_cache": False})
    for name, dataset in build_datasets(decoding, clip_spec).items():
        rows = dataset.take_all()
        assert rows and all(r["ok"] for r in rows), (name, [r["error"] for r in rows][:2])
        assert all(r["frames"].any() for r in rows)

    # The target boxes (evaluation's attention_on_target) are found for every test video.
    test = manifest.filter(pc.equal(manifest["subset"], "test"))
    cells = load_target_cells(data_cfg.root, test, clip_spec.map_size)
    assert cells is not None and set(cells) == set(test["video_id"].to_pylist())


def _copy(moved: tuple[DataConfig, ClipSpec, dict, Path], name: str) -> Path:
    """A copy of the moved dataset's root (videos, manifest, cache) under `name`."""
    data_cfg, _, _, tmp = moved
    return Path(shutil.copytree(data_cfg.root, tmp / name / "data"))


def _config_file(root: Path, **data: object) -> Path:
    """A `jlstm` config of the tiny run over the dataset at `root`."""
    raw = tiny_config(
        root, root.parent / "ray", root.parent.name,
        data={"train_stride": 5, **data},
        model={"frame_size": 32, "clip_len": 6, "last_steps": 3, "map_size": 2},
    )
    path = root.parent / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_videos_missing_at_the_new_root_end_in_one_line(
    moved: tuple[DataConfig, ClipSpec, dict, Path], capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = _copy(moved, "missing")
    gone = sorted(root.rglob("*.avi"))[:2]
    for path in gone:
        path.unlink()
    data_cfg = moved[0].model_copy(update={"root": str(root), "use_feature_cache": False,
                                           "feature_cache": None})
    with pytest.raises(MissingVideosError, match=r"^2 of 6 videos .* missing under data.root"):
        load_run_data(data_cfg)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root.parent / 'mlflow.db'}")
    assert cli.main(["train", "--config", str(_config_file(root))]) == 4
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    first = gone[0].relative_to(root).as_posix()
    assert line.startswith("jlstm: data error: 2 of 6 videos") and f"first: {first}" in line


def test_a_cache_build_where_every_video_fails_ends_in_one_line(
    moved: tuple[DataConfig, ClipSpec, dict, Path], capsys: pytest.CaptureFixture,
) -> None:
    """Every video broken after indexing: exit 4 and one line with the first reason, and no
    key (no run takes the cache for a built one). One broken: its count and reason."""
    root = _copy(moved, "broken")
    videos = sorted(root.rglob("*.avi"))
    config = _config_file(root, feature_cache=str(root.parent / "features"))
    videos[0].write_bytes(b"this is no longer a video" * 64)
    assert cli.main(["data", "features", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"1 failed; first: video 0: {videos[0]}: " in out

    for path in videos:
        path.write_bytes(b"this is no longer a video" * 64)
    assert cli.main(["data", "features", "--config", str(config), "--rebuild"]) == 4
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # above it, Ray Data's progress may have written
    assert "Traceback" not in err
    assert line.startswith("jlstm: data error: feature cache ") and "all 6 videos failed" in line
    assert f"first: video 0: {videos[0]}: " in line
    assert not (root.parent / "features" / KEY_FILE).exists()
