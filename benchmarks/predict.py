"""`jlstm predict` over many videos (Ray Data) against a plain in-process loop, and the served
model's cost per video.

Data: demo-sized videos (configs/demo.yaml's generator: 128 px, 48 frames, 4 classes),
`--videos` of them; model: the demo's config with random weights (the cost of a prediction
does not depend on the weights), logged to a throwaway SQLite MLflow store. Figures:

- loop: one process, the model loaded once, then video after video decoded (the same
  bounded decoder `jlstm predict` uses) and scored (`model.video.predict_video`); its
  seconds split into decoding and scoring.
- predict: `jlstm predict FOLDER --model URI --out DIR` as a subprocess on a new local Ray
  (`RAY_ADDRESS=local`: Ray start, model download and actor start included); the peak RSS
  of each scoring actor (sampled every 0.2 s with psutil), and its steady rate (between its
  first and last Parquet part).
- served: the pyfunc loaded in process (`mlflow.pyfunc.load_model`, what `mlflow models
  serve` runs per request) answering one `video_b64` row at a time; the request's JSON
  bytes against those of the same video sent as its uint8 clips (`{"inputs": [...]}`, the
  format-1 model's input).

    python benchmarks/predict.py --out benchmarks/results/predict.json
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import psutil
import torch
from machine import load_average, machine_info, write_json

from data_shards.synth import synthesize_dataset
from model import JointAttentionNet
from model import video as model_video
from model.decode_process import BoundedDecoder
from orchestration import registry, tracking
from orchestration.config import load_config
from orchestration.demo import DEMO_CLASSES, DEMO_CONFIG

REPO = Path(__file__).resolve().parent.parent
NAME = "jlstm-bench-predict"
GOAL = 1.6  # predict's videos/s over the loop's, Ray start included (issue 28)


def prepare(workdir: Path, videos: int) -> tuple[Path, str, str]:
    """Demo-sized videos and a random-weight demo model; (video folder, store URI, model
    URI)."""
    cfg = load_config(DEMO_CONFIG, [])
    root = synthesize_dataset(
        workdir / "data", layout="ucf101", classes=DEMO_CLASSES,
        videos_per_class=-(-videos // DEMO_CLASSES), seed=0,
        frame_size=cfg.model["frame_size"] * 4 // 3,
    )
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = store
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    tracking.connect()
    torch.manual_seed(0)
    model_cfg = cfg.resolve_model(DEMO_CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = JointAttentionNet(model_cfg).eval()
    mlflow.set_experiment(experiment_id=tracking.get_or_create_experiment("bench-predict"))
    with mlflow.start_run():
        registry.log_model(
            net, model_cfg, [f"class{i}" for i in range(DEMO_CLASSES)],
            registered_model_name=NAME, frame_interval=cfg.data.frame_interval,
        )
    return root / "UCF-101", store, f"models:/{NAME}/1"


def run_loop(paths: list[Path], uri: str) -> dict[str, Any]:
    started = time.perf_counter()
    loaded = registry.load_model(uri)
    load_s = time.perf_counter() - started
    decoder = BoundedDecoder()
    decode_s = score_s = 0.0
    for path in paths:
        t0 = time.perf_counter()
        parts = list(model_video.video_clips(path, loaded.grid, loaded.model_cfg.frame_size,
                                             decoder))
        t1 = time.perf_counter()
        scores = np.concatenate([model_video.score_clips(loaded.net, c) for _, c in parts])
        model_video.video_score(scores)
        decode_s += t1 - t0
        score_s += time.perf_counter() - t1
    decoder.close()
    wall = time.perf_counter() - started
    return {
        "seconds": round(wall, 2), "model_load_s": round(load_s, 2),
        "decode_s": round(decode_s, 2), "score_s": round(score_s, 2),
        "videos_per_s": round(len(paths) / wall, 3),
        "torch_threads": torch.get_num_threads(),
    }


def sample_actors(peaks: dict[int, int], stop: threading.Event) -> None:
    """Peak RSS of every Ray Data actor process (`ray::MapWorker(...)`) until `stop`."""
    while not stop.is_set():
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(proc.info["cmdline"] or [])
                if "MapWorker" in cmd:
                    rss = proc.memory_info().rss
                    peaks[proc.pid] = max(peaks.get(proc.pid, 0), rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        stop.wait(0.2)


def run_predict(folder: Path, uri: str, store: str, out: Path, videos: int) -> dict[str, Any]:
    peaks: dict[int, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_actors, args=(peaks, stop), daemon=True)
    sampler.start()
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "jlstm", "predict", str(folder), "--model", uri,
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "RAY_ADDRESS": "local", "MLFLOW_TRACKING_URI": store},
    )
    wall = time.time() - started
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"jlstm predict failed: {proc.stderr[-3000:]}")
    parts = sorted(out.glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    rows = [len(pd.read_parquet(p)) for p in parts]
    first, last = parts[0].stat().st_mtime, parts[-1].stat().st_mtime
    steady = sum(rows[1:]) / (last - first) if len(parts) > 1 and last > first else None
    table = pd.read_parquet(out)
    return {
        "seconds": round(wall, 2), "videos_per_s": round(videos / wall, 3),
        "rows": len(table), "error_rows": int((table.error != "").sum()),
        "first_part_after_s": round(first - started, 2),
        "steady_videos_per_s": round(steady, 3) if steady else None,
        "actor_peak_rss_mib": sorted(round(v / 2**20) for v in peaks.values()),
        "last_line": proc.stdout.strip().splitlines()[-1],
    }


def run_served(paths: list[Path], uri: str) -> dict[str, Any]:
    pyfunc = mlflow.pyfunc.load_model(uri)
    loaded = registry.load_model(uri)
    times, b64_bytes, frames_json, frames_raw = [], [], [], []
    for path in paths:
        b64 = base64.b64encode(path.read_bytes()).decode("ascii")
        b64_bytes.append(len(json.dumps({"dataframe_records": [{"video_b64": b64}]})))
        t0 = time.perf_counter()
        answer = pyfunc.predict(pd.DataFrame({"video_b64": [b64]}))
        times.append(time.perf_counter() - t0)
        assert answer.error[0] == "", answer.error[0]
        clips = np.concatenate([c for _, c in model_video.video_clips(
            path, loaded.grid, loaded.model_cfg.frame_size)])
        frames_raw.append(clips.nbytes)
        frames_json.append(len(json.dumps({"inputs": clips.tolist()})))
    return {
        "how": "mlflow.pyfunc.load_model(...).predict in process, one video_b64 row a call",
        "videos": len(paths),
        "seconds_per_video_median": round(statistics.median(times), 3),
        "request_bytes_video_b64_median": int(statistics.median(b64_bytes)),
        "request_bytes_frames_json_median": int(statistics.median(frames_json)),
        "frames_uint8_bytes_median": int(statistics.median(frames_raw)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--served-videos", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/predict.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        workdir = Path(tmp)
        folder, store, uri = prepare(workdir, args.videos)
        paths = sorted(folder.rglob("*.avi"))[: args.videos]
        result: dict[str, Any] = {
            "benchmark": "predict", "machine": machine_info(), "videos": len(paths),
            "model": "configs/demo.yaml, random weights", "load_average_before": load_average(),
        }
        # predict needs the folder to hold exactly these videos
        for extra in sorted(folder.rglob("*.avi"))[args.videos:]:
            extra.unlink()
        result["loop"] = run_loop(paths, uri)
        result["load_average_after_loop"] = load_average()
        result["predict"] = run_predict(folder, uri, store, workdir / "out", len(paths))
        result["load_average_after_predict"] = load_average()
        result["speedup"] = round(
            result["predict"]["videos_per_s"] / result["loop"]["videos_per_s"], 3
        )
        result["goal"] = GOAL
        result["goal_met"] = result["speedup"] >= GOAL
        result["served"] = run_served(paths[: args.served_videos], uri)
        result["command"] = "python benchmarks/predict.py " + " ".join(sys.argv[1:])
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
