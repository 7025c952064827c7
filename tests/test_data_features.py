"""Feature cache: rows equal a direct backbone forward (fp16), and a stale cache is refused."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_shards.clip_spec import ClipSpec
from data_shards.config import DataConfig
from data_shards.datasets import build_datasets, clip_readers, iter_clip_batches
from data_shards.decode import decode_clip
from data_shards.errors import StaleCacheError
from data_shards.features import (
    CACHE_FORMAT,
    RANDOM_INIT_SEED,
    build_feature_cache,
    cache_key,
    manifest_digest,
)
from data_shards.index import index_videos
from data_shards.manifest import load_manifest, video_file
from data_shards.synth import synthesize_dataset
from model import ModelConfig, VGG16Taps, normalize_frames
from orchestration.step import to_batch

TAPS = ["pool4", "conv5_3"]


def test_the_cache_key_is_the_one_written_before_the_clip_spec(tmp_path: Path) -> None:
    """`cache_key` takes a `ClipSpec` since issue 29; it hashes the very values it hashed
    from the model config before, in the same JSON types (taps a list), so every cache
    built before stays valid."""
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALIZED"):
        torch.save(VGG16Taps(["conv4_3", "pool5"], 1, weights=None).state_dict(),
                   tmp_path / "vgg.pt")
    manifest = pa.table({
        "video_id": [0, 1], "video_path": ["a/x.avi", "b/y.avi"], "size": [10, 20],
        "num_frames": [40, 57], "subset": ["train", "test"],
    })
    data_cfg = DataConfig(dataset="folder", root=str(tmp_path), cache_dtype="uint8",
                          train_stride=5, eval_stride=3, frame_interval=2)
    for weights in (None, str(tmp_path / "vgg.pt")):
        model_cfg = ModelConfig(num_classes=3, frame_size=64, clip_len=6, last_steps=2,
                                taps=["pool5", "conv4_3"], map_size=1, backbone_weights=weights)
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random init: warned above
            torch.manual_seed(RANDOM_INIT_SEED)
            digest = VGG16Taps(model_cfg.taps, model_cfg.map_size, weights).weights_digest()
        before = {  # what `cache_key(data_cfg, model_cfg, manifest)` returned before
            "format": CACHE_FORMAT, "dtype": "uint8", "backbone_weights_digest": digest,
            "frame_size": 64, "taps": ["pool5", "conv4_3"], "map_size": 1, "clip_len": 6,
            "train_stride": 5, "eval_stride": 3, "frame_interval": 2,
            "manifest_digest": manifest_digest(manifest),
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            key = cache_key(data_cfg, ClipSpec.of(model_cfg), manifest)
        assert json.dumps(key, sort_keys=True) == json.dumps(before, sort_keys=True)


@pytest.fixture(scope="module")
def cached(
    ray_cluster: None, tmp_path_factory: pytest.TempPathFactory
) -> tuple[DataConfig, ClipSpec]:
    """2 classes x 3 videos, indexed, with a cache built from saved VGG16 weights."""
    tmp = tmp_path_factory.mktemp("cache")
    root = synthesize_dataset(
        tmp / "data", classes=2, videos_per_class=3, frame_size=40, num_frames=20
    )
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALIZED"):
        torch.save(VGG16Taps(TAPS, 2, weights=None).state_dict(), tmp / "vgg.pt")
    clip_spec = ClipSpec.of(ModelConfig(
        num_classes=2,
        frame_size=32,
        clip_len=6,
        last_steps=3,
        taps=TAPS,
        map_size=2,
        backbone_weights=str(tmp / "vgg.pt"),
    ))
    data_cfg = DataConfig(
        dataset="ucf101",
        root=str(root),
        train_stride=5,
        decode_cpus=0.5,
        feature_cache=str(tmp / "features"),
        use_feature_cache=True,
    )
    index_videos(data_cfg, show_progress=False)
    info = build_feature_cache(data_cfg, clip_spec)
    assert (info.num_videos, info.num_failed) == (6, 0)
    assert info.bytes_per_video > 0 and info.total_bytes == pytest.approx(6 * info.bytes_per_video)
    return data_cfg, clip_spec


def _rows(data_cfg: DataConfig, clip_spec: ClipSpec, name: str) -> list[dict]:
    """Every row of dataset `name`, its taps read the way a training worker reads them."""
    dataset = build_datasets(data_cfg, clip_spec)[name]
    read = clip_readers(data_cfg, clip_spec)[name]
    return [
        {key: values[i] for key, values in batch.items()}
        for batch in iter_clip_batches(dataset, 4, read)
        for i in range(len(batch["video_id"]))
    ]


def test_cache_rows_match_a_direct_backbone_forward(cached: tuple[DataConfig, ClipSpec]) -> None:
    data_cfg, clip_spec = cached
    manifest = load_manifest(data_cfg).to_pydict()
    paths = {
        video_id: video_file(data_cfg.root, path)
        for video_id, path in zip(manifest["video_id"], manifest["video_path"], strict=True)
    }
    num_frames = dict(zip(manifest["video_id"], manifest["num_frames"], strict=True))
    backbone = VGG16Taps(TAPS, 2, weights=clip_spec.backbone_weights).eval()
    for name in ("train", "val"):
        rows = _rows(data_cfg, clip_spec, name)
        assert rows and all(r["ok"] for r in rows)
        for row in rows[:3]:
            frames = decode_clip(
                paths[row["video_id"]],
                int(row["clip_start"]),
                num_frames[row["video_id"]],
                6,
                1,
                32,
            )
            with torch.no_grad():
                direct = backbone(normalize_frames(torch.from_numpy(frames)[None])[0])
            for tap in TAPS:
                cached_taps = row[f"taps_{tap}"]
                assert cached_taps.dtype == np.float16 and cached_taps.shape == (6, 512, 2, 2)
                expected = direct[tap].numpy()
                scale = float(np.abs(expected).max())
                np.testing.assert_allclose(
                    cached_taps.astype(np.float32), expected, rtol=1e-2, atol=1e-3 * scale
                )


def _cache_with_a_cut_file(data_cfg: DataConfig, copy: Path) -> tuple[DataConfig, Path]:
    """A copy of the cache at `copy` whose first file lost its last 1,000 bytes (a copy that
    stopped, a full disk), the config reading it, and that file."""
    shutil.copytree(data_cfg.feature_cache, copy)
    victim = sorted(copy.glob("video_*.npy"))[0]
    victim.write_bytes(victim.read_bytes()[:-1000])
    return data_cfg.model_copy(update={"feature_cache": str(copy)}), victim


def _by_clip(rows: list[dict]) -> dict[tuple[int, int], dict]:
    return {(int(r["video_id"]), int(r["clip_start"])): r for r in rows}


@pytest.mark.parametrize("cache_dtype", ["float16", "uint8"])
def test_the_read_stage_gives_the_rows_the_worker_reads(
    cached: tuple[DataConfig, ClipSpec], tmp_path: Path, cache_dtype: str
) -> None:
    """`data.cache_read: stage` (a Ray Data map_batches stage) and `worker` (the consumer's
    thread): the same clips with the same taps, scales and flags; a cut-short file's clips
    are reported by both."""
    data_cfg, clip_spec = cached
    if cache_dtype == "uint8":
        data_cfg = data_cfg.model_copy(update={
            "cache_dtype": "uint8", "feature_cache": str(tmp_path / "features8"),
        })
        build_feature_cache(data_cfg, clip_spec)
    stage_cfg = data_cfg.model_copy(update={"cache_read": "stage"})
    assert clip_readers(stage_cfg, clip_spec) == {"train": None, "val": None}
    for name in ("train", "val"):
        worker, stage = _by_clip(_rows(data_cfg, clip_spec, name)), _by_clip(
            _rows(stage_cfg, clip_spec, name)
        )
        assert worker.keys() == stage.keys() and len(worker) > 0
        for clip, row in worker.items():
            taps = [k for k in row if k.startswith(("taps_", "tap_scale_"))]
            assert taps and row["ok"] and stage[clip]["ok"]
            for key in taps:
                np.testing.assert_array_equal(stage[clip][key], row[key])
    cut, victim = _cache_with_a_cut_file(stage_cfg, tmp_path / "cut")
    rows = _rows(cut, clip_spec, "train") + _rows(cut, clip_spec, "val")
    bad = [r for r in rows if not r["ok"]]
    assert bad and all("truncated" in r["error"] and victim.name in r["error"] for r in bad)


def test_a_stale_cache_is_refused(cached: tuple[DataConfig, ClipSpec], tmp_path: Path) -> None:
    data_cfg, clip_spec = cached
    with pytest.raises(StaleCacheError, match="train_stride: cache has 5, config wants 3"):
        build_datasets(data_cfg.model_copy(update={"train_stride": 3}), clip_spec)
    with pytest.raises(StaleCacheError, match="map_size"):
        build_datasets(data_cfg, dataclasses.replace(clip_spec, map_size=1))
    torch.manual_seed(2)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALIZED"):
        torch.save(VGG16Taps(TAPS, 2, weights=None).state_dict(), tmp_path / "other.pt")
    other = dataclasses.replace(clip_spec, backbone_weights=str(tmp_path / "other.pt"))
    with pytest.raises(StaleCacheError, match="backbone_weights_digest"):
        build_datasets(data_cfg, other)
    empty = data_cfg.model_copy(update={"feature_cache": str(tmp_path / "none")})
    with pytest.raises(StaleCacheError, match="no feature cache"):
        build_datasets(empty, clip_spec)


def test_a_truncated_cache_file_is_reported(
    cached: tuple[DataConfig, ClipSpec], tmp_path: Path
) -> None:
    """A cut-short .npy (a copy that stopped, a full disk) flags its clips; others still read."""
    data_cfg, clip_spec = cached
    cut, victim = _cache_with_a_cut_file(data_cfg, tmp_path / "features")
    rows = _rows(cut, clip_spec, "train") + _rows(cut, clip_spec, "val")
    bad = [r for r in rows if not r["ok"]]
    assert bad and len(bad) < len(rows)
    assert all("truncated" in r["error"] and victim.name in r["error"] for r in bad)
    assert all(not r["taps_pool4"].any() for r in bad)  # zeros, flagged, never stale memory


def test_a_uint8_cache_is_half_the_size_and_within_half_a_step(
    cached: tuple[DataConfig, ClipSpec], tmp_path: Path
) -> None:
    """cache_dtype = uint8: each stored byte x its channel's scale is the fp16 tap to within
    half a quantization step, and the worker's `to_batch` gives the model those values."""
    data_cfg, clip_spec = cached
    quantized_cfg = data_cfg.model_copy(
        update={"cache_dtype": "uint8", "feature_cache": str(tmp_path / "features8")}
    )
    info8 = build_feature_cache(quantized_cfg, clip_spec)
    info16 = build_feature_cache(data_cfg, clip_spec)  # the module's cache, reused
    assert info8.num_failed == 0
    assert info8.total_bytes < 0.6 * info16.total_bytes
    with pytest.raises(StaleCacheError, match="dtype: cache has 'uint8', config wants 'float16'"):
        build_datasets(
            quantized_cfg.model_copy(update={"cache_dtype": "float16"}), clip_spec
        )
    key = ["video_id", "clip_start"]
    rows16 = {tuple(r[k] for k in key): r for r in _rows(data_cfg, clip_spec, "val")}
    read8 = clip_readers(quantized_cfg, clip_spec)["val"]
    batch8 = read8(build_datasets(quantized_cfg, clip_spec)["val"].take_batch(
        len(rows16), batch_format="numpy"
    ))
    inputs = to_batch(batch8, torch.device("cpu")).inputs
    for i in range(len(batch8["video_id"])):
        row16 = rows16[(batch8["video_id"][i], batch8["clip_start"][i])]
        for tap in TAPS:
            assert batch8[f"taps_{tap}"].dtype == np.uint8
            step = batch8[f"tap_scale_{tap}"][i][None, :, None, None]
            error = np.abs(inputs[tap][i].float().numpy() - row16[f"taps_{tap}"].astype(np.float32))
            # Half a step, plus fp16 rounding of both sides (about 1e-3 relative).
            assert (error <= step / 2 + 2e-3 * np.abs(row16[f"taps_{tap}"]) + 1e-6).all()
