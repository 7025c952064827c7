"""Ray Data datasets: shards for 2 workers, per-epoch order, bad videos mid-iteration."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_shards.clip_spec import ClipSpec
from data_shards.clips import clip_table
from data_shards.config import DataConfig
from data_shards.datasets import build_datasets
from data_shards.index import index_videos
from data_shards.synth import synthesize_dataset, write_broken_videos
from model import ModelConfig

CLIP = ClipSpec.of(
    ModelConfig(num_classes=4, frame_size=32, clip_len=8, last_steps=4, map_size=1)
)


@pytest.fixture(scope="module")
def data_cfg(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    """4 motion classes x 6 videos of 40 frames, UCF101 layout, indexed (split 1)."""
    root = synthesize_dataset(
        tmp_path_factory.mktemp("ucf"), classes=4, videos_per_class=6, frame_size=40, num_frames=40
    )
    cfg = DataConfig(
        dataset="ucf101", root=str(root), train_stride=8, decode_cpus=0.5, decode_batch_size=4
    )
    index_videos(cfg, show_progress=False)
    return cfg


def _keys(rows: list[dict]) -> list[tuple[int, int]]:
    return [(int(r["video_id"]), int(r["clip_start"])) for r in rows]


def _expected_clips(cfg: DataConfig, subset: str, stride: int) -> list[tuple[int, int]]:
    manifest = pq.read_table(cfg.manifest_path())
    videos = manifest.filter(pa.compute.equal(manifest["subset"], subset))
    table = clip_table(videos, CLIP.clip_len, stride)
    return list(zip(table["video_id"].to_pylist(), table["clip_start"].to_pylist(), strict=True))


def _consume_split(ds, equal: bool) -> list[list[tuple[int, int]]]:
    """Iterate the 2 shards of `ds` concurrently, as 2 Ray Train workers would."""
    return _consume_shards(ds.streaming_split(2, equal=equal))


def _consume_shards(shards: list) -> list[list[tuple[int, int]]]:
    """(video, clip start) of every row of each shard, iterated concurrently."""
    seen: list[list[tuple[int, int]]] = [[] for _ in shards]

    def consume(rank: int) -> None:
        for batch in shards[rank].iter_batches(batch_size=3):
            assert batch["frames"].shape[1:] == (8, 32, 32, 3) and batch["ok"].all()
            seen[rank] += list(
                zip(batch["video_id"].tolist(), batch["clip_start"].tolist(), strict=True)
            )

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return seen


def _with_manifest(cfg: DataConfig, manifest: pa.Table, tmp_path: Path) -> DataConfig:
    """`cfg` reading `manifest`, written under tmp_path."""
    pq.write_table(manifest, tmp_path / "manifest.parquet")
    return cfg.model_copy(update={"manifest": str(tmp_path / "manifest.parquet")})


@pytest.mark.parametrize("decode_batch_size", [4, 64])
def test_eval_shards_for_2_workers_cover_every_clip_exactly_once(
    data_cfg: DataConfig, tmp_path: Path, decode_batch_size: int
) -> None:
    """Also with an odd number of clips (equal=True would drop one): 7 test videos x 5.

    Each worker scores about half, whatever the decode batch: a batch larger than the
    test set once decoded it in one task, one block, which one worker scored alone.
    """
    manifest = pq.read_table(data_cfg.manifest_path())
    first_test = manifest.filter(pa.compute.equal(manifest["subset"], "test"))["video_id"][0]
    cfg = _with_manifest(
        data_cfg.model_copy(update={"decode_batch_size": decode_batch_size}),
        manifest.filter(pa.compute.not_equal(manifest["video_id"], first_test)),
        tmp_path,
    )
    expected = _expected_clips(cfg, "test", CLIP.clip_len)
    assert len(expected) == 35
    val = build_datasets(cfg, CLIP, eval_workers=2)["val"]
    first, second = _consume_split(val, equal=False)
    # 2 x EVAL_BLOCKS_PER_WORKER blocks of 4 or 5 clips, handed out by rows so far.
    assert abs(len(first) - len(second)) <= 5, (len(first), len(second))
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(expected)


@pytest.mark.parametrize("world_size", [1, 3])
def test_the_data_config_shards_each_dataset_as_ray_train_v2_asks(
    data_cfg: DataConfig, world_size: int
) -> None:
    """Ray Train V2 configures one dataset per call, without worker handles, at each start
    of a worker group, whose size an elastic run changes: at any size the test clips are
    scored exactly once and the training clips split evenly (clips // world each)."""
    from orchestration.driver import SplitEvalDataConfig

    datasets = build_datasets(data_cfg, CLIP, eval_workers=2)
    config = SplitEvalDataConfig()
    shards = {
        name: [ranks[name] for ranks in config.configure(
            {name: ds}, world_size=world_size, worker_handles=None, worker_node_ids=None
        )]
        for name, ds in datasets.items()
    }
    val = _consume_shards(shards["val"])
    expected = _expected_clips(data_cfg, "test", CLIP.clip_len)
    assert sorted(clip for part in val for clip in part) == sorted(expected)
    train = _consume_shards(shards["train"])
    clips = len(_expected_clips(data_cfg, "train", data_cfg.train_stride))
    assert [len(part) for part in train] == [clips // world_size] * world_size


def test_train_shards_are_disjoint_like_ray_train_splits_them(data_cfg: DataConfig) -> None:
    """Ray Train splits "train" with equal=True: disjoint, same length, at most 1 clip dropped."""
    expected = _expected_clips(data_cfg, "train", data_cfg.train_stride)
    first, second = _consume_split(build_datasets(data_cfg, CLIP)["train"], equal=True)
    assert len(first) == len(second) == len(expected) // 2
    assert not set(first) & set(second) and set(first + second) <= set(expected)


def test_training_order_is_new_each_epoch_and_reproducible(data_cfg: DataConfig) -> None:
    train = build_datasets(data_cfg, CLIP)["train"]
    epoch1, epoch2 = _keys(train.take_all()), _keys(train.take_all())
    expected = _expected_clips(data_cfg, "train", data_cfg.train_stride)
    assert sorted(epoch1) == sorted(epoch2) == sorted(expected)
    assert epoch1 != epoch2 and epoch1 != expected
    fixed = build_datasets(data_cfg, CLIP, epoch_seed=3)["train"]
    assert _keys(fixed.take_all()) == _keys(fixed.take_all())
    val = build_datasets(data_cfg, CLIP)["val"]
    assert _keys(val.take_all()) == _expected_clips(data_cfg, "test", CLIP.clip_len)


def test_a_bad_video_mid_training_set_does_not_stop_iteration(
    data_cfg: DataConfig, tmp_path: Path
) -> None:
    """A video broken after indexing gives flagged rows; every other clip still arrives."""
    manifest = pq.read_table(data_cfg.manifest_path())
    train_ids = manifest.filter(pa.compute.equal(manifest["subset"], "train"))["video_id"]
    bad_id = train_ids[len(train_ids) // 2].as_py()
    broken = write_broken_videos(tmp_path / "broken")["random_bytes"]
    paths = [
        str(broken) if vid == bad_id else p
        for vid, p in zip(
            manifest["video_id"].to_pylist(), manifest["video_path"].to_pylist(), strict=True
        )
    ]
    patched = manifest.set_column(
        manifest.schema.get_field_index("video_path"), "video_path", pa.array(paths)
    )
    cfg = _with_manifest(data_cfg, patched, tmp_path)
    rows = build_datasets(cfg, CLIP)["train"].take_all()
    bad = [r for r in rows if not r["ok"]]
    assert sorted(_keys(rows)) == sorted(_expected_clips(data_cfg, "train", cfg.train_stride))
    assert bad and {int(r["video_id"]) for r in bad} == {bad_id}
    assert all(str(broken) in r["error"] and not r["frames"].any() for r in bad)
    assert all(r["frames"].any() for r in rows if r["ok"])
