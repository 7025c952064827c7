"""Split files: the real UCF101 lists, HMDB51 tags, the folder CSV, and config validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from data_shards.config import DataConfig
from data_shards.splits import (
    parse_folder_csv,
    parse_hmdb51_splits,
    parse_ucf101_splits,
    ucf101_class_names,
)

UCF_LISTS = Path(__file__).parent / "fixtures" / "ucfTrainTestlist"


@pytest.mark.parametrize(
    ("split", "train", "test"), [(1, 9537, 3783), (2, 9586, 3734), (3, 9624, 3696)]
)
def test_ucf101_split_counts(split: int, train: int, test: int) -> None:
    entries = parse_ucf101_splits(UCF_LISTS, split)
    subsets = [e.subset for e in entries]
    assert (subsets.count("train"), subsets.count("test")) == (train, test)
    assert len({e.path for e in entries}) == train + test  # no video listed twice
    assert {e.label for e in entries} == set(range(101))


def test_ucf101_all_splits_cover_13320_videos_in_101_classes() -> None:
    paths = {e.path for split in (1, 2, 3) for e in parse_ucf101_splits(UCF_LISTS, split)}
    assert len(paths) == 13320
    assert len(ucf101_class_names(UCF_LISTS)) == 101


def test_ucf101_labels_come_from_the_folder() -> None:
    """HandstandPushups/ holds v_HandStandPushups_*: the file name is not a class name."""
    entries = parse_ucf101_splits(UCF_LISTS, 1)
    names = ucf101_class_names(UCF_LISTS)
    handstand = [e for e in entries if "HandStandPushups" in e.path]
    assert handstand and {e.label_name for e in handstand} == {"HandstandPushups"}
    assert all(names[e.label] == e.label_name == e.path.split("/")[0] for e in entries)
    assert names[0] == "ApplyEyeMakeup" and names[100] == "YoYo"


def test_ucf101_refuses_a_label_that_disagrees_with_its_folder(tmp_path: Path) -> None:
    (tmp_path / "classInd.txt").write_bytes(b"1 A\r\n2 B\r\n")
    (tmp_path / "trainlist01.txt").write_bytes(b"A/v_A_g01_c01.avi 2\r\n")
    (tmp_path / "testlist01.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="label 2"):
        parse_ucf101_splits(tmp_path, 1)


def test_hmdb51_tags(tmp_path: Path) -> None:
    (tmp_path / "wave_test_split1.txt").write_bytes(b"w1.avi 1 \r\nw2.avi 2 \r\nw3.avi 0 \r\n")
    (tmp_path / "brush_hair_test_split1.txt").write_bytes(b"b1.avi 2 \r\nb2.avi 1 \r\n")
    entries = parse_hmdb51_splits(tmp_path, 1)
    got = {(e.path, e.label, e.label_name, e.subset) for e in entries}
    assert got == {
        ("brush_hair/b1.avi", 0, "brush_hair", "test"),
        ("brush_hair/b2.avi", 0, "brush_hair", "train"),
        ("wave/w1.avi", 1, "wave", "train"),
        ("wave/w2.avi", 1, "wave", "test"),
    }  # tag 0 (w3) is unused: left out
    (tmp_path / "wave_test_split2.txt").write_bytes(b"w1.avi 7\r\n")
    with pytest.raises(ValueError, match="tag '7'"):
        parse_hmdb51_splits(tmp_path, 2)


def test_folder_csv(tmp_path: Path) -> None:
    csv = tmp_path / "split1.csv"
    csv.write_text("path,label,subset\nrun/a.mp4,run,train\njump/b.avi,jump,test\n")
    entries = parse_folder_csv(csv)
    assert [(e.path, e.label, e.subset) for e in entries] == [
        ("run/a.mp4", 1, "train"),
        ("jump/b.avi", 0, "test"),
    ]
    csv.write_text("path,label,subset\nrun/a.mp4,run,validation\n")
    with pytest.raises(ValueError, match="validation"):
        parse_folder_csv(csv)


def test_config_errors_name_key_value_and_allowed() -> None:
    with pytest.raises(ValidationError) as err:
        DataConfig(dataset="ucf101", root="r", split=4)
    assert "split" in str(err.value) and "4" in str(err.value) and "3" in str(err.value)
    with pytest.raises(ValidationError, match="'ucf101', 'hmdb51' or 'folder'"):
        DataConfig(dataset="kinetics", root="r")
    with pytest.raises(ValidationError, match="decode_threads"):
        DataConfig(dataset="ucf101", root="r", decode_threads=2)
    with pytest.raises(ValidationError, match="use_feature_cache = true needs feature_cache"):
        DataConfig(dataset="ucf101", root="r", use_feature_cache=True)
    cfg = DataConfig(dataset="ucf101", root="/d", split=2)
    assert str(cfg.manifest_path()) == "/d/manifest_split2.parquet"
    assert cfg.eval_stride_for(16) == 16
