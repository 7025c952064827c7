"""The feature-cache build measured: frames/s, VGG16's FLOPs and MFU, and what bounds it.

A synthetic video set (`synthesize_dataset`, UCF101 layout, frames at S * 3 / 4 upscaled at
decode, as UCF101's 320 x 240 are) is indexed and cached with `build_feature_cache`, the
frozen VGG16 taps of configs/ucf101_late_fusion.yaml, on a local Ray of --ray-cpus CPUs and
the actor pool `jlstm data features` uses (`feature_pool`: one VGG16 actor of 1 CPU + 1 GPU
per GPU; on CPU one per CPU). Each actor decodes its videos itself (decord, one thread,
on its one CPU) and runs VGG16 on them in turn, so the build's rate is about
actors / (1 / decode + 1 / VGG16). Then, to say which of the two bounds it:

- decode alone: the same bounded-decoder call the actor makes (`BoundedDecoder.read` of
  the video's needed frames, `data.decode_timeout_s`' default deadline), on the same
  videos, in one process (what an actor gets) and as one Ray task per video over the Ray
  CPUs (what the machine's CPUs could decode);
- VGG16 alone on synthetic uint8 frames on the device: `as_built` is the actor's own
  `_taps` (fp32, FORWARD_CHUNK frames a pass, host copies both ways); `fp32`, `bf16`
  (autocast) and `bf16_channels_last` are the forward alone on frames already there.

FLOPs per frame: `FlopCounterMode` over one forward on the meta device (convolutions only),
MFU against `gpu_step.peak_bf16_tflops` (null on CPU). `bound_by` compares the actor's two
halves: decode on one CPU against `as_built`. VGG16 is randomly initialized (timing does
not depend on the weights).

--size full (the default with CUDA): the paper's S=384, T=30, K=11; --size reduced (the
default on CPU): gpu_step's REDUCED sizes and a handful of short videos, about a minute on
2 cores. The cache is float16 and keyed exactly as `benchmarks/cache_read.py` keys its own
(train stride T / 2), so `cache_read.py --workdir <this --workdir>` reads it instead of
building it again (`cache_read_args` in the JSON).

    python benchmarks/cache_build.py --out benchmarks/results/gpu_cache_build.json
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from cache_read import cpu_seconds
from gpu_step import PAPER_CONFIG, REDUCED, mfu_note, peak_bf16_tflops, sync
from machine import load_average, result_head, work_folder, write_json
from torch.utils.flop_counter import FlopCounterMode

from data_shards.clip_spec import ClipSpec
from data_shards.cluster import RAY_NODE_ENV
from data_shards.features import (
    FORWARD_CHUNK,
    INDEX_FILE,
    _TapWriter,
    _work_table,
    build_feature_cache,
    cache_backbone,
)
from data_shards.index import ensure_index
from data_shards.manifest import load_manifest
from data_shards.synth import synthesize_dataset
from model import ModelConfig, VGG16Taps, normalize_frames
from model.decode_process import shared_decoder
from orchestration.config import JlstmConfig, load_config
from orchestration.resources import feature_pool, live_nodes

# Videos of the build: CLASSES classes x per class, each this many frames (the paper's
# train stride 15 and T = 30 make 9 clips of a 150-frame video, every frame needed).
SIZES = {
    "full": {"classes": 4, "videos_per_class": 16, "num_frames": 150, "decode_videos": 12,
             "vgg_frames": 8 * FORWARD_CHUNK, "vgg_repeats": 3},
    "reduced": {"classes": 2, "videos_per_class": 2, "num_frames": 24, "decode_videos": 4,
                "vgg_frames": 8, "vgg_repeats": 1},
}
VARIANTS = ("as_built", "fp32", "bf16", "bf16_channels_last")
GPU_SAMPLE_S = 0.2


class GpuBusy:
    """NVML's GPU utilization sampled in a thread while a block runs (None without NVML)."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuBusy:
        if not torch.cuda.is_available():
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no nvidia-ml-py, or no driver: the figure is left out
            return self

        def sample() -> None:
            while not self._stop.wait(GPU_SAMPLE_S):
                self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def mean_percent(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def vgg_flops_per_frame(model_cfg: ModelConfig) -> int:
    """FLOPs of one frame's forward through the cache's VGG16, counted on meta tensors."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # random init: the weights' warning is expected
        net = VGG16Taps(model_cfg.taps, model_cfg.map_size, None)
        frame = torch.empty(1, 3, model_cfg.frame_size, model_cfg.frame_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(frame)
    return counter.get_total_flops()


def rate(frames: int, seconds: float) -> dict[str, float]:
    return {"frames": frames, "seconds": round(seconds, 3),
            "frames_per_s": round(frames / max(seconds, 1e-9), 1)}


def compute_figures(frames_per_s: float, flops: int, peak: float | None) -> dict[str, Any]:
    achieved = frames_per_s * flops / 1e12
    return {"achieved_tflops": round(achieved, 3),
            "mfu": round(achieved / peak, 4) if peak else None}


def decode_video(path: str, frames: list[int], frame_size: int) -> int:
    """What a `_TapWriter` does before VGG16: decode one video's needed frames."""
    return shared_decoder().read(path, frame_size, [frames]).shape[1]


def hold(seconds: float) -> None:
    time.sleep(seconds)


def time_decode(work: list[dict[str, Any]], frame_size: int, serial_videos: int,
                cpus: int) -> dict[str, Any]:
    """Decode alone: `serial_videos` videos in this process (an actor's one CPU), then all
    of them as one Ray task each on the Ray CPUs."""
    started = time.perf_counter()
    frames = sum(decode_video(w["video_path"], w["frames"], frame_size)
                 for w in work[:serial_videos])
    serial = rate(frames, time.perf_counter() - started) | {"videos": serial_videos}
    task = ray.remote(num_cpus=1)(decode_video)
    # One task per CPU at once first, untimed: Ray starts its worker processes for them.
    ray.get([ray.remote(num_cpus=1)(hold).remote(0.5) for _ in range(cpus)])
    started = time.perf_counter()
    frames = sum(ray.get([task.remote(w["video_path"], w["frames"], frame_size)
                          for w in work]))
    parallel = rate(frames, time.perf_counter() - started) | {"videos": len(work), "cpus": cpus}
    return {"serial": serial, "parallel": parallel}


def timed(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Seconds of `repeats` calls after one untimed call (cuDNN's algorithm choice, the
    allocator's first blocks), the device synchronized around them."""
    run()
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    sync(device)
    return time.perf_counter() - started


def time_vgg(model_cfg: ModelConfig, device: torch.device, frames: int,
             repeats: int) -> dict[str, dict[str, Any]]:
    """VGG16 alone on synthetic frames, per variant (see the module's docstring)."""
    rng = np.random.default_rng(0)
    s = model_cfg.frame_size
    host = rng.integers(0, 256, (frames, s, s, 3), dtype=np.uint8)
    # _taps decodes and writes nothing
    clip_spec = ClipSpec.of(model_cfg)
    writer = _TapWriter(clip_spec, "unused", device.type, "float16", decode_timeout_s=None)
    backbone = cache_backbone(clip_spec).to(device)
    normalized = normalize_frames(torch.from_numpy(host).to(device)[None])[0]

    def forward(x: torch.Tensor, bf16: bool) -> None:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            for lo in range(0, frames, FORWARD_CHUNK):
                backbone(x[lo : lo + FORWARD_CHUNK])

    seconds = {"as_built": timed(lambda: writer._taps({"frames": host}), repeats, device)}
    for variant in VARIANTS[1:]:
        memory_format = (torch.channels_last if variant.endswith("channels_last")
                         else torch.contiguous_format)
        backbone.to(memory_format=memory_format)
        x = normalized.contiguous(memory_format=memory_format)
        bf16 = variant.startswith("bf16")
        seconds[variant] = timed(lambda x=x, bf16=bf16: forward(x, bf16), repeats, device)
    return {v: rate(frames * repeats, t) for v, t in seconds.items()}


def prepare_data(cfg: JlstmConfig, sizes: dict[str, int],
                 video_frame_size: int) -> tuple[bool, float]:
    """Synthesize and index the videos unless a manifest is there; (reused, seconds)."""
    started = time.perf_counter()
    reused = cfg.data.manifest_path().is_file()
    if not reused:
        synthesize_dataset(
            cfg.data.root, layout="ucf101", classes=sizes["classes"],
            videos_per_class=sizes["videos_per_class"], seed=cfg.data.seed,
            frame_size=video_frame_size, num_frames=sizes["num_frames"],
        )
    ensure_index(cfg.data)
    return reused, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_cache_build.json")
    parser.add_argument("--size", choices=list(SIZES), help="default: full with CUDA, else reduced")
    parser.add_argument("--workdir", type=Path,
                        help="keep the videos and the cache here (reused by cache_read.py and "
                        "by a second run); default: a temp dir, removed at the end")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count())
    for key in SIZES["full"]:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int,
                            help=f"default: full {SIZES['full'][key]}, "
                            f"reduced {SIZES['reduced'][key]}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of configs/ucf101_late_fusion.yaml (repeatable)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.size = args.size or ("full" if device.type == "cuda" else "reduced")
    sizes = {k: v if getattr(args, k) is None else getattr(args, k)
             for k, v in SIZES[args.size].items()}
    load_start, started = load_average(), time.perf_counter()
    workdir, tmp = work_folder(args, "jlstm-cache-build-")
    reduced = [] if args.size == "full" else [
        *(f"model.{k}={v}" for k, v in REDUCED.items()),
        f"data.train_stride={REDUCED['clip_len'] // 2}",  # the paper's T / 2, as cache_read
    ]
    cfg = load_config(PAPER_CONFIG, [
        "model.backbone_weights=null",  # random init: timing does not depend on the weights
        f"data.root={workdir / 'data'}", f"data.feature_cache={workdir / 'features'}",
        *reduced, *args.set,
    ])
    warnings.filterwarnings("ignore", message="VGG16Taps: no backbone_weights")
    for key, value in RAY_NODE_ENV.items():
        os.environ.setdefault(key, value)
    # address="local": never the cluster of RAY_ADDRESS or a `ray start` on this machine.
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        model_cfg = cfg.resolve_model(sizes["classes"])
        video_frame_size = model_cfg.frame_size * 3 // 4
        reused, synth_s = prepare_data(cfg, sizes, video_frame_size)
        manifest = load_manifest(cfg.data)
        work = _work_table(cfg.data, ClipSpec.of(model_cfg), manifest).to_pylist()
        # The build's work first, on a GPU of its own: nothing here touches CUDA before it.
        pool = feature_pool(live_nodes())
        cpu_start, built = cpu_seconds(), time.perf_counter()
        with GpuBusy() as busy:
            info = build_feature_cache(cfg.data, ClipSpec.of(model_cfg), rebuild=True, **pool)
        build_s = time.perf_counter() - built
        build_cpus = (cpu_seconds() - cpu_start) / build_s
        index = pq.read_table(info.cache_dir / INDEX_FILE).to_pydict()
        ok = {v for v, good in zip(index["video_id"], index["ok"], strict=True) if good}
        frames = sum(len(w["frames"]) for w in work if w["video_id"] in ok)  # through VGG16
        decode = time_decode(work, model_cfg.frame_size, sizes["decode_videos"], args.ray_cpus)
    finally:
        ray.shutdown()

    vgg = time_vgg(model_cfg, device, sizes["vgg_frames"], sizes["vgg_repeats"])
    flops = vgg_flops_per_frame(model_cfg)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bf16_tflops(name) if device.type == "cuda" else None
    for figures in vgg.values():
        figures |= compute_figures(figures["frames_per_s"], flops, peak)
    best = max(VARIANTS[1:], key=lambda v: vgg[v]["frames_per_s"])
    build = rate(frames, build_s) | compute_figures(frames / build_s, flops, peak)
    # Each actor decodes, then runs VGG16, frame after frame: the slower half bounds it.
    decode_fps = decode["serial"]["frames_per_s"]
    vgg_fps = vgg["as_built"]["frames_per_s"]
    estimate = pool["actors"] / (1 / decode_fps + 1 / vgg_fps)
    result = {
        **result_head("cache_build", args, load_start, time.perf_counter() - started,
                      machine={"device": name, "cuda": torch.version.cuda}),
        "size": args.size,
        "sizes": sizes,
        "model": {k: getattr(model_cfg, k) for k in ("frame_size", "clip_len", "map_size", "taps")},
        "data": {
            "videos": manifest.num_rows, "video_frame_size": video_frame_size,
            "train_stride": cfg.data.train_stride, "cache_dtype": cfg.data.cache_dtype,
            "reused": reused, "synth_index_s": round(synth_s, 1),
        },
        "build": build | {
            "videos": info.num_videos, "failed_videos": info.num_failed,
            "cache_bytes": info.total_bytes, "pool": pool,
            # build_feature_cache gives each actor 1 CPU; decord decodes on 1 thread there.
            "decode_cpus_used": pool["actors"],
            "cpus_busy": round(build_cpus, 2),
            "gpu_util_mean_percent": busy.mean_percent(),
            "note": "frames through VGG16 over the build's wall time, the actors' start "
                    "(VGG16 loaded, CUDA initialized) and the cache writes included",
        },
        "flops_per_frame": flops,
        "peak_bf16_tflops": peak,
        "mfu_note": mfu_note(device),
        "decode": decode,
        "vgg16": {"device": name, "chunk": FORWARD_CHUNK, "variants": vgg, "best": best,
                  "channels_last_helps": vgg["bf16_channels_last"]["frames_per_s"]
                  > vgg["bf16"]["frames_per_s"]},
        "bound_by": "decode" if decode_fps < vgg_fps else "vgg16",
        "serial_estimate_frames_per_s": round(estimate, 1),
        "bound_note": f"each of the {pool['actors']} actor(s) decodes on its one CPU "
                      f"({decode_fps:.0f} frames/s alone) and then runs VGG16 as built "
                      f"({vgg_fps:.0f} frames/s alone); decode spread over {args.ray_cpus} "
                      f"CPUs reaches {decode['parallel']['frames_per_s']:.0f} frames/s, VGG16's "
                      f"best variant ({best}) {vgg[best]['frames_per_s']:.0f}",
        "cache_read_args": [
            "--workdir", str(workdir), "--frame-size", str(model_cfg.frame_size),
            "--clip-len", str(model_cfg.clip_len), "--map-size", str(model_cfg.map_size),
            "--taps", ",".join(model_cfg.taps), "--num-frames", str(sizes["num_frames"]),
            "--videos", str(manifest.num_rows),
        ] if tmp is None and cfg.data.train_stride == model_cfg.clip_len // 2 else None,
    }
    if tmp is not None:  # a given --workdir keeps the data and cache, for cache_read.py
        tmp.cleanup()
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("size", "total_s", "bound_by")}
                     | {"frames_per_s": build["frames_per_s"], "mfu": build["mfu"]}))


if __name__ == "__main__":
    main()
