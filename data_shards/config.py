"""The data section of a run's config: which videos, how clips are cut, where the cache lives."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Column of a batch that holds one cached tap: taps_<tap name>, [B, T, 512, K, K] in the
# cache's dtype; a uint8 cache adds tap_scale_<tap name>, float32 [B, 512] (value = q * scale).
TAP_PREFIX = "taps_"
TAP_SCALE_PREFIX = "tap_scale_"


class DataConfig(BaseModel):
    """Validated data settings; a bad value is refused naming the key, the value and the range.

    Strides are in clip-start frames. `eval_stride=None` means `clip_len`: evaluation clips
    then tile each test video without overlap.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: Literal["ucf101", "hmdb51", "folder"]
    root: str = Field(description="folder of class folders, or one holding them (see index)")
    splits_dir: str | None = Field(None, description="default: found inside/beside root")
    split: int = Field(1, ge=1, le=3)
    # A folder of class folders without a split file is split per class by a hash of each
    # video's path (data_shards/splits.py: split_by_hash), so these two decide the split.
    test_fraction: float = Field(
        0.2, gt=0, lt=1,
        description="folder datasets without split<N>.csv or list files: each class's share "
        "of test videos (round(test_fraction x videos))",
    )
    split_seed: int = Field(
        0, ge=0, description="folder datasets without a split file: a different seed, a "
        "different (equally stratified) split",
    )
    train_list: str | None = Field(
        None, description="folder datasets: MMAction2-style list of training videos "
        "('path label' per line); relative to splits_dir (default root)",
    )
    test_list: str | None = Field(None, description="the test videos' list (as train_list)")
    class_names_file: str | None = Field(
        None, description="class names for list labels given as indices: classInd-style "
        "'N name' lines (N as the lists number them) or one name per line (from 0)",
    )
    manifest: str | None = Field(None, description="default: <root>/manifest_split<N>.parquet")
    frame_interval: int = Field(1, ge=1, description="take every n-th frame inside a clip")
    train_stride: int = Field(8, ge=1, description="s: frames between training clip starts")
    eval_stride: int | None = Field(None, ge=1, description="default: clip_len (no overlap)")
    decode_cpus: float = Field(1.0, gt=0, description="Ray CPUs per decode task")
    decode_batch_size: int = Field(8, ge=1, description="clips per decode task call")
    probe_timeout_s: float = Field(20.0, gt=0, description="hard limit per video probe")
    decode_timeout_s: float | None = Field(
        30.0, gt=0,
        description="hard limit per decode at run time (a clip; a video's frames in the cache "
        "build): past it the decoder's process is killed and the clip is a bad clip with "
        "reason 'timeout'; null decodes in-process without a limit (data_shards/decode.py)",
    )
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    seed: int = 0
    feature_cache: str | None = Field(None, description="directory of the VGG16 tap cache")
    use_feature_cache: bool = False
    cache_dtype: Literal["float16", "uint8"] = Field(
        "float16",
        description="uint8 halves the cache: each video's taps quantized per channel to "
        "[0, 255] x a float32 scale (taps follow a ReLU, so none is negative)",
    )
    cache_read: Literal["worker", "stage"] = Field(
        "worker",
        description="who reads the cached taps: each training worker, in a background "
        "thread (worker), or a Ray Data map_batches stage with decode_cpus CPUs a task, on "
        "any node's CPUs (stage); data_shards/datasets.py says what each measured",
    )

    @model_validator(mode="after")
    def _cache_needs_dir(self) -> DataConfig:
        if self.use_feature_cache and not self.feature_cache:
            raise ValueError(
                "use_feature_cache = true needs feature_cache = <directory>; got feature_cache"
                f" = {self.feature_cache!r}"
            )
        return self

    @model_validator(mode="after")
    def _lists_go_together(self) -> DataConfig:
        if (self.train_list is None) != (self.test_list is None):
            raise ValueError(
                f"train_list = {self.train_list!r} and test_list = {self.test_list!r}: give "
                "both list files or neither"
            )
        if self.dataset != "folder" and (self.train_list or self.class_names_file):
            raise ValueError(
                f"train_list, test_list and class_names_file are for dataset = 'folder', not "
                f"{self.dataset!r}: remove them"
            )
        if self.class_names_file and not self.train_list:
            raise ValueError(
                f"class_names_file = {self.class_names_file!r} names the classes of list "
                "files: set train_list and test_list too, or remove it"
            )
        return self

    def manifest_path(self) -> Path:
        """Where `index_videos` writes the manifest and `build_datasets` reads it."""
        if self.manifest:
            return Path(self.manifest)
        return Path(self.root) / f"manifest_split{self.split}.parquet"

    def quarantine_path(self) -> Path:
        """The quarantine table, beside the manifest."""
        manifest = self.manifest_path()
        return manifest.with_name(f"{manifest.stem}.quarantine.parquet")

    def eval_stride_for(self, clip_len: int) -> int:
        """The evaluation stride in effect for clips of `clip_len` frames."""
        return self.eval_stride or clip_len
