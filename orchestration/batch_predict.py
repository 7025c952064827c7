"""`jlstm predict` over many videos: a folder, a list file, or one video with `--out`, on Ray
Data, rows appended to a Parquet dataset as videos finish; a re-run resumes.

The pipeline (Ray's batch-inference pattern: `map_batches` tasks, then a callable class in
an actor pool):

1. decode tasks (`decode_videos`): one video per call, its clips on the model's grid read
   through `model.video.video_clips` and this worker's `BoundedDecoder` (the deadline is
   `data.decode_timeout_s`, so a FIFO or a decoder hang is an error row, not a stalled
   run). The task yields one row per clip, `SCORE_BATCH` clips at a time, so a long video
   never sits in memory whole: Ray Data cuts the generator's output into blocks and its
   backpressure bounds how many wait in the object store. A video that fails yields one
   error row and stops.
2. scoring actors (`ClipScorer`): each builds the network once from the state dict the
   driver put in the object store (with the config and class names: an actor on another
   node never contacts MLflow, and the model is downloaded once), then scores clip rows by
   the model's clip rule (`model.video.score_clips`), a GPU each with `cluster.use_gpu`.
3. the driver (`VideoScores`): a video's clip scores arrive in any order, from any actor;
   when all its clips are in, `model.video.video_score` averages them and
   `mlflow_model.prediction_row` makes its row (the served model's row builder), and
   `PartWriter` appends rows to the dataset as part files, each written whole to a hidden
   name and renamed, so a part is readable as soon as it appears.

Decision: clip rows and aggregation on the driver, rather than one row per video with all
its clips, because a video's clips can be hundreds of MB (a long UCF101 video at 224 px)
and one video's rows can then be scored by several actors at once; the driver holds only
C floats per clip of the videos in flight.

Resume: the dataset's rows carry each video's size and mtime and the model's URI and
resolved version (`name/version` for a registered model). A re-run skips a video whose
(video, size, mtime) is already there, drops and redoes one whose file changed, and refuses
an `--out` written by another model version.
"""

from __future__ import annotations

import csv
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from data_shards.cluster import init_ray
from data_shards.splits import VIDEO_EXTENSIONS
from model import video as model_video
from model.config import FlowConfig
from model.decode_process import DEFAULT_TIMEOUT_S, BoundedDecoder, one_line
from orchestration.errors import ConfigError
from orchestration.evaluate import PREDICTION_FIELDS

# MLflow, torch and the model loader are imported where they are used: every decode task's
# worker process imports this module, and with them it took 5.8 s instead of 1.
if TYPE_CHECKING:
    from orchestration.mlflow_model import LoadedModel

DEFAULT_OUT = "predictions.parquet"
LIST_SUFFIXES = frozenset({".txt", ".csv", ".lst"})
# Columns stored beside OUTPUT_COLUMNS: what a re-run compares to skip a video.
KEY_COLUMNS = ("size", "mtime", "model_uri", "model_version")
SCHEMA = pa.schema([
    *PREDICTION_FIELDS,
    ("size", pa.int64()),  # bytes, as stat gave them when the video was read
    ("mtime", pa.int64()),  # ns since the epoch (the manifest's unit)
    ("model_uri", pa.string()),
    ("model_version", pa.string()),
])
assert SCHEMA.names[-len(KEY_COLUMNS):] == list(KEY_COLUMNS)
# A part file every this many finished videos, or this many seconds after the last one.
ROWS_PER_PART = 64
SECONDS_PER_PART = 10.0
# CPU-only clusters: scoring (a VGG16 pass per frame) costs far more than decoding, so each
# CPU gets a scoring actor of 0.75 logical CPU (one torch thread) and decode tasks share the
# rest at 0.25 each. With GPUs, decoding is the slow side: a decode task a CPU.
CPU_ACTOR_CPUS = 0.75
CPU_DECODE_CPUS = 0.25


@dataclass(frozen=True)
class VideoFile:
    """A video to predict: its name in the output (`video`), where it is, its size and mtime
    (0 and 0 when it cannot be stat'ed; its row then says why)."""

    video: str
    path: str
    size: int
    mtime: int


def find_videos(source: str | Path) -> list[VideoFile]:
    """The videos `source` names: one video, a folder (searched recursively, names relative
    to it) or a list file (.txt: a path a line; .csv: its `video` or `path` column, else the
    first; relative paths under the list's folder). Raises FileNotFoundError for a missing
    source, ConfigError for a folder or list without videos."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"INPUT {str(source)!r} does not exist")
    if source.is_dir():
        named = [
            (p.relative_to(source).as_posix(), p) for p in sorted(source.rglob("*"))
            if p.suffix.lower() in VIDEO_EXTENSIONS and not p.is_dir()
            and not any(part.startswith(".") for part in p.relative_to(source).parts)
        ]
        what = f"folder {source} holds no video files ({', '.join(sorted(VIDEO_EXTENSIONS))})"
    elif source.suffix.lower() in LIST_SUFFIXES:
        named = [(name, source.parent / name) for name in _listed(source)]
        what = f"list {source} names no videos"
    else:  # one video; the decoder says whether it is one
        named = [(str(source), source)]
        what = ""
    if not named:
        raise ConfigError(f"INPUT {what}")
    unique = dict(named)  # a list may name a video twice: one row each
    return [_stat(name, path) for name, path in unique.items()]


def _listed(list_file: Path) -> list[str]:
    """The paths a list file names, as written in it."""
    text = list_file.read_text()
    if list_file.suffix.lower() == ".csv":
        rows = [row for row in csv.reader(text.splitlines()) if row and row[0].strip()]
        header = [cell.strip().lower() for cell in rows[0]] if rows else []
        column = next((header.index(c) for c in ("video", "path") if c in header), None)
        if column is not None:
            return [row[column].strip() for row in rows[1:] if len(row) > column]
        return [row[0].strip() for row in rows]
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _stat(name: str, path: Path) -> VideoFile:
    try:
        st = path.stat()
    except OSError:  # predicted anyway: its row says the decoder cannot open it
        return VideoFile(name, str(path.absolute()), 0, 0)
    return VideoFile(name, str(path.absolute()), st.st_size, st.st_mtime_ns)


def model_version(model_uri: str) -> str:
    """`registry.resolve_version`, a model the store lacks as one ConfigError line."""
    from mlflow.exceptions import MlflowException

    from orchestration.registry import resolve_version

    try:
        return resolve_version(model_uri)
    except MlflowException as err:
        raise ConfigError(f"--model {model_uri}: {one_line(err)}") from None


# --- the Parquet dataset: rows already there, parts appended -------------------------------


def read_done(out: Path) -> pa.Table:
    """The rows of the dataset at `out` (no rows when it does not exist yet)."""
    if not out.exists():
        return SCHEMA.empty_table()
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; --out names a folder of Parquet part files")
    parts = _parts(out)
    if not parts:
        return SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(p, schema=SCHEMA) for p in parts)


def _parts(out: Path) -> list[Path]:
    """The dataset's part files (hidden names are parts being written)."""
    return sorted(p for p in out.glob("*.parquet") if not p.name.startswith((".", "_")))


def check_same_model(done: pa.Table, out: Path, uri: str, version: str) -> None:
    """ConfigError when `out` holds rows of another model version than `version`."""
    others = sorted(set(done.column("model_version").to_pylist()) - {version})
    if others:
        first = done.filter(pc.equal(done["model_version"], others[0]))
        raise ConfigError(
            f"--out {out} holds predictions of model {others[0]} "
            f"({first['model_uri'][0].as_py()}), not of {version} ({uri}): give another --out"
        )


def drop_videos(out: Path, videos: set[str]) -> None:
    """Remove the rows of `videos` from the dataset (their files changed since): each part
    that holds one is rewritten under a hidden name and renamed over itself."""
    for part in _parts(out):
        table = pq.read_table(part, schema=SCHEMA)
        keep = pc.invert(pc.is_in(table["video"], pa.array(sorted(videos))))
        if pc.all(keep).as_py():
            continue
        kept = table.filter(keep)
        if kept.num_rows == 0:
            part.unlink()
            continue
        tmp = part.with_name(f".{part.name}.tmp")
        pq.write_table(kept, tmp)
        os.replace(tmp, part)


class PartWriter:
    """Appends rows to the dataset at `out`: a part file every `ROWS_PER_PART` rows or
    `SECONDS_PER_PART` seconds, written whole under a hidden name, then renamed."""

    def __init__(self, out: Path, extra: dict[str, Any]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.extra = out, extra
        self.stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.rows: list[dict[str, Any]] = []
        self.parts = 0
        self.last = time.monotonic()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append({**row, **self.extra})
        if len(self.rows) >= ROWS_PER_PART or time.monotonic() - self.last >= SECONDS_PER_PART:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if not self.rows:
            return
        name = f"part-{self.stamp}-{self.parts:05d}.parquet"
        tmp = self.out / f".{name}.tmp"
        pq.write_table(pa.Table.from_pylist(self.rows, schema=SCHEMA), tmp)
        os.replace(tmp, self.out / name)
        self.rows, self.parts = [], self.parts + 1


# --- Ray Data: decode tasks, scoring actors -------------------------------------------------


def decode_videos(
    batch: dict[str, np.ndarray], *, grid: model_video.ClipGrid, frame_size: int,
    timeout_s: float, run_id: str, flow: FlowConfig | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: videos in (`index`, `path`), clip rows out, `SCORE_BATCH` at a time:
    index, clip uint8 [T, S, S, 3], num_clips (the video's), error ("" when fine); with
    `flow` (a model that reads it), clip_flow uint8 [T, S, S, 2L] too. A video that fails
    yields one row with its error (and no clip worth scoring) and stops."""
    decoder = _run_decoder(run_id, timeout_s)
    for index, path in zip(batch["index"], batch["path"], strict=True):
        try:
            # The total first: the driver knows a video is done when this many clips are in.
            total = len(grid.starts(decoder.num_frames(str(path), frame_size)))
            for starts, clips in model_video.video_clips(
                str(path), grid, frame_size, decoder, flow
            ):
                n = len(starts)
                arrays = {"clip": clips} if isinstance(clips, np.ndarray) else {
                    "clip": clips["frames"], "clip_flow": clips["optical_flow"]}
                yield {
                    "index": np.full(n, index, np.int64), **arrays,
                    "num_clips": np.full(n, total, np.int64), "error": np.full(n, "", object),
                }
        except model_video.VideoError as err:
            from orchestration.mlflow_model import decode_error

            shape = (1, grid.clip_len, frame_size, frame_size)
            empty = {} if flow is None else {"clip_flow": np.zeros((*shape, 2 * flow.stack),
                                                                   np.uint8)}
            yield {
                "index": np.array([index], np.int64), **empty,
                "clip": np.zeros((*shape, 3), np.uint8),
                "num_clips": np.zeros(1, np.int64), "error": np.array([decode_error(err)], object),
            }


# This worker process's decoder and the run it serves. A Ray worker outlives a run, and a
# decoder remembers the files that hung for as long as it lives: a stalled mount may have
# recovered by the next run, which deserves a fresh try. So each run starts its own child
# (one start, about 0.2 s, per worker and run).
_decoder: tuple[str, BoundedDecoder] | None = None


def _run_decoder(run_id: str, timeout_s: float) -> BoundedDecoder:
    global _decoder
    if _decoder is None or _decoder[0] != run_id:
        if _decoder is not None:
            _decoder[1].close()
        _decoder = (run_id, BoundedDecoder(timeout_s))
    return _decoder[1]


class ClipScorer:
    """Ray Data actor: the network built once from the state dict in the object store; clip
    rows in, their class scores out (index, scores [C], num_clips, error)."""

    def __init__(
        self, state: list[Any], model_config: dict[str, Any], device: str, threads: int
    ) -> None:
        import torch

        from model import ModelConfig
        from orchestration.mlflow_model import net_from_state

        torch.set_num_threads(threads)
        # The reference travels in a list, so Ray does not resolve it before this line.
        weights = ray.get(state[0])
        self.net = net_from_state(ModelConfig.model_validate(model_config), weights, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        scores = np.zeros((len(ok), self.net.cfg.num_classes), np.float32)
        if ok.any():
            arrays = {"frames": batch["clip"][ok]}
            if "clip_flow" in batch:
                arrays["optical_flow"] = batch["clip_flow"][ok]
            scores[ok] = model_video.score_clips(self.net, arrays)
        return {k: batch[k] for k in ("index", "num_clips", "error")} | {"scores": scores}


@dataclass(frozen=True)
class ScoringPool:
    """How the scoring actors and decode tasks share the cluster."""

    actors: int
    actor_cpus: float
    actor_gpus: float
    decode_cpus: float
    threads: int  # torch threads per actor


def scoring_pool(use_gpu: bool, resources: dict[str, float]) -> ScoringPool:
    """A GPU actor per GPU (`cluster.use_gpu`), else a 1-thread actor per CPU (the numbers
    by `CPU_ACTOR_CPUS`); ConfigError for `use_gpu` on a cluster without GPUs."""
    if use_gpu:
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise ConfigError("cluster.use_gpu is true but the Ray cluster has no GPU")
        return ScoringPool(gpus, 1.0, 1.0, 1.0, 1)
    cpus = max(1, int(resources.get("CPU", 1)))
    return ScoringPool(cpus, CPU_ACTOR_CPUS, 0.0, CPU_DECODE_CPUS, 1)


@dataclass
class VideoScores:
    """The driver's side: clip scores gathered per video until the video is complete."""

    class_names: list[str]
    k: int
    pending: dict[int, list[np.ndarray]] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)

    def add(self, batch: dict[str, np.ndarray]) -> Iterator[tuple[int, dict[str, Any]]]:
        """The (index, row) of every video this batch of scored clips completes."""
        from orchestration.mlflow_model import error_row, prediction_row

        for i, index in enumerate(batch["index"].tolist()):
            if index in self.finished:  # clips of a video that failed after them
                continue
            error = str(batch["error"][i])
            if error:
                self.finished.add(index)
                self.pending.pop(index, None)
                yield index, error_row(error)
                continue
            clips = self.pending.setdefault(index, [])
            clips.append(batch["scores"][i])
            if len(clips) == int(batch["num_clips"][i]):
                self.finished.add(index)
                del self.pending[index]
                scores = model_video.video_score(np.stack(clips))
                yield index, prediction_row(scores, len(clips), self.class_names, self.k)


# --- the command ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictSummary:
    """What one `jlstm predict` over many videos did."""

    out: Path
    videos: int  # named by INPUT
    skipped: int  # already in --out, unchanged
    predicted: int
    errors: int  # of those predicted
    seconds: float


def predict_many(
    source: str | Path,
    model_uri: str,
    out: str | Path = DEFAULT_OUT,
    *,
    top_k: int = 5,  # mlflow_model.DEFAULT_TOP_K (not imported here: see the imports)
    frame_interval: int | None = None,
    decode_timeout_s: float = DEFAULT_TIMEOUT_S,
    use_gpu: bool = False,
    progress: bool = True,
) -> PredictSummary:
    """Predict every video `source` names (`find_videos`) with the model at `model_uri`
    into the Parquet dataset `out`, skipping those already there (see the module's
    docstring); the model is downloaded only when a video is left to predict. A video that
    cannot be decoded gets a row with its error."""
    from orchestration import tracking
    from orchestration.inference import load_for_prediction

    started = time.perf_counter()
    out = Path(out)
    videos = find_videos(source)
    tracking.connect()
    version = model_version(model_uri)
    done = read_done(out)
    check_same_model(done, out, model_uri, version)
    have = {
        row["video"]: (row["size"], row["mtime"])
        for row in done.select(["video", "size", "mtime"]).to_pylist()
    }
    todo = [v for v in videos if have.get(v.video) != (v.size, v.mtime)]
    changed = {v.video for v in todo if v.video in have}
    if changed:
        drop_videos(out, changed)
    writer = PartWriter(out, {"model_uri": model_uri, "model_version": version})
    errors = 0
    if todo:
        loaded = load_for_prediction(model_uri, frame_interval)
        init_ray()
        errors = _run(todo, loaded, writer, top_k, decode_timeout_s, use_gpu, progress)
    writer.flush()
    return PredictSummary(
        out, len(videos), len(videos) - len(todo), len(todo), errors,
        time.perf_counter() - started,
    )


def _run(
    todo: list[VideoFile], loaded: LoadedModel, writer: PartWriter, k: int,
    timeout_s: float, use_gpu: bool, progress: bool,
) -> int:
    """The Ray Data pipeline over `todo`; each finished video's row goes to `writer`.
    Returns how many rows are errors."""
    from tqdm import tqdm

    pool = scoring_pool(use_gpu, ray.cluster_resources())
    state = ray.put({key: t.detach().cpu() for key, t in loaded.net.state_dict().items()})
    cfg = loaded.model_cfg
    items = [{"index": i, "path": v.path} for i, v in enumerate(todo)]
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    context.enable_progress_bars = False  # one bar of videos instead of one per operator
    try:
        clips = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            decode_videos, batch_size=1, num_cpus=pool.decode_cpus,
            fn_kwargs={"grid": loaded.grid, "frame_size": cfg.frame_size,
                       "flow": cfg.flow if cfg.reads_flow else None,
                       "timeout_s": timeout_s, "run_id": writer.stamp},
        )
        scored = clips.map_batches(
            ClipScorer, batch_size=model_video.SCORE_BATCH,
            concurrency=min(pool.actors, len(todo)),  # more would idle
            num_cpus=pool.actor_cpus, num_gpus=pool.actor_gpus,
            fn_constructor_kwargs={
                "state": [state], "model_config": cfg.model_dump(mode="json"),
                "device": "cuda" if use_gpu else "cpu", "threads": pool.threads,
            },
        )
        videos = VideoScores(loaded.class_names, k)
        errors = 0
        with tqdm(total=len(todo), unit="video", disable=not progress or None) as bar:
            for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
                for index, row in videos.add(batch):
                    video = todo[index]
                    writer.add({"video": video.video, **row, "size": video.size,
                                "mtime": video.mtime})
                    errors += bool(row["error"])
                    bar.update(1)
                    bar.set_postfix(errors=errors)
        missing = len(todo) - len(videos.finished)
        if missing:  # a bug, not a bad video: every video ends in a row
            raise RuntimeError(f"{missing} videos got no row from the pipeline")
        return errors
    finally:
        context.enable_progress_bars = bars

