"""One training step of the paper's config on one device: time, clips/s, TFLOP/s, MFU, data wait.

Two input modes, each stepped as a training worker steps it (bf16 autocast on CUDA):
eagerly (`orchestration.step.train_step`), or with `train.cuda_graphs` (auto: where CUDA
is; `--set train.cuda_graphs=off` for eager there) as a replay of the step captured as one
CUDA graph (`orchestration.graphed_step.GraphedTrainStep`, its fused capturable AdamW):

  cached_taps      frozen VGG16; the input is the feature cache's fp16 taps (taps_<name>)
  finetune_frames  model.backbone = finetune; uint8 frames through `to_batch` (normalize_frames),
                   VGG16 trained too

Per mode, first on synthetic tensors already on the device (no data pipeline): median and
p90 step seconds after --warmup steps, clips/s (and `with_host_copy`: the same step with
the batch copied from host memory first, as a worker pays it), FLOPs per step
(FlopCounterMode over one forward+backward on the meta device: shapes only, counted once,
outside the timed steps),
achieved TFLOP/s and MFU against the device's dense bf16 peak. Then the same step fed by
the real Ray Data pipeline (`build_datasets(...)["train"]`, iterated in this process on a
local Ray) over a small synthetic video dataset (feature cache built for cached_taps, videos
decoded for finetune_frames): clips/s and `data_wait_share`, the share of the step loop spent
blocked in the batch iterator's next(), over at most PIPELINE_STEPS steps after the warm-up.

--size full (the default with CUDA): configs/ucf101_late_fusion.yaml as it is (S=384, T=30,
K=11, pool4 + conv5_3, C=256, H=1024, 3 layers), per-device batch = the config's global
batch / its workers (64 / 4 = 16). --size reduced (the default on CPU): same config and code
path at demo-like sizes (REDUCED), a minute or two on 2 cores. VGG16 is randomly initialized
(the config's weights path is not needed for timing). On CUDA, a batch that runs out of
memory is halved and retried; the JSON records each batch size that did not fit.

    python benchmarks/gpu_step.py --out benchmarks/results/gpu_step.json
    python benchmarks/gpu_step.py --out benchmarks/results/gpu_step_cpu.json   # CPU: reduced
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from machine import load_average, result_head, work_folder, write_json
from torch.utils.flop_counter import FlopCounterMode

from model import JointAttentionNet, ModelConfig
from orchestration.config import JlstmConfig, load_config
from orchestration.graphed_step import WARMUP_STEPS, GraphedTrainStep, use_cuda_graphs
from orchestration.step import (
    Batch,
    EagerTrainStep,
    bad_clips,
    build_optimizer,
    ok_rows,
    to_batch,
    train_step,
)

if TYPE_CHECKING:
    import ray.data

    from data_shards.datasets import ClipReader

    Source = tuple[ray.data.Dataset, ClipReader | None]  # a dataset and its consumer's read

REPO = Path(__file__).resolve().parent.parent
PAPER_CONFIG = REPO / "configs" / "ucf101_late_fusion.yaml"
REDUCED = {"frame_size": 96, "clip_len": 8, "last_steps": 4, "map_size": 6, "channels": 64,
           "hidden_size": 128, "supervision_hidden": 64}  # num_layers, taps: as the paper
NUM_CLASSES = {"ucf101": 101, "hmdb51": 51}
MODES = ("cached_taps", "finetune_frames")
# Dense bf16 tensor-core peak in TFLOP/s, no sparsity, from NVIDIA's datasheets (H100 and H200
# SXM / NVL, H100 PCIe, A100, L4, A10G). First row whose tokens all occur in the device name.
PEAK_BF16_TFLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H100", "PCIe"), 756.0), (("H100", "NVL"), 835.0), (("H100",), 989.0),
    (("H200", "NVL"), 835.0), (("H200",), 989.0), (("A100",), 312.0),
    (("L4",), 121.0), (("A10G",), 70.0),
]  # fmt: skip
# Synthetic videos of the pipeline: VIDEO_CLIP_LENGTHS clips long, CLASSES classes, square at
# S * 3 / 4 (about UCF101's 320 x 240 pixels, upscaled at decode as UCF101's are); train clips
# start every clip_len // 2 frames (the paper's 15). The pipeline runs at most these steps.
VIDEO_CLIP_LENGTHS, CLASSES = 4, 2
PIPELINE_STEPS, PIPELINE_WARMUP = 10, 2
PROFILE_STEPS, PROFILE_TOP = 3, 15  # --profile: steps traced, ops listed


def peak_bf16_tflops(device_name: str) -> float | None:
    tokens = set(re.split(r"[\s\-_]+", device_name))
    return next((peak for need, peak in PEAK_BF16_TFLOPS if set(need) <= tokens), None)


def mfu_note(device: torch.device) -> str | None:
    if device.type != "cuda":
        return (
            "no MFU on CPU: MFU is against a GPU's dense bf16 tensor-core peak, and on CPU "
            "train_step runs in fp32 (it autocasts to bf16 on CUDA only)"
        )
    name = torch.cuda.get_device_name(device)
    return None if peak_bf16_tflops(name) else f"no bf16 peak known for {name!r}: add it"


def pipeline_steps(args: argparse.Namespace) -> tuple[int, int]:
    """Warm-up (at least 1) and timed steps of the pipeline run."""
    return max(1, min(args.warmup, PIPELINE_WARMUP)), min(args.steps, PIPELINE_STEPS)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synthetic_rows(model_cfg: ModelConfig, mode: str, size: int) -> dict[str, np.ndarray]:
    """Rows as the pipeline yields them: non-negative fp16 taps, or uint8 frames."""
    rng = np.random.default_rng(0)
    t, k, s = model_cfg.clip_len, model_cfg.map_size, model_cfg.frame_size
    rows: dict[str, np.ndarray] = {
        "label": rng.integers(0, model_cfg.num_classes, size), "video_id": np.arange(size),
        "clip_start": np.zeros(size, np.int64),
    }
    if mode == "cached_taps":
        for tap in model_cfg.taps:
            rows[f"taps_{tap}"] = np.abs(rng.standard_normal((size, t, 512, k, k), np.float32))
            rows[f"taps_{tap}"] = rows[f"taps_{tap}"].astype(np.float16)
    else:
        rows["frames"] = rng.integers(0, 256, (size, t, s, s, 3), dtype=np.uint8)
    return rows


def count_flops(model_cfg: ModelConfig, batch: Batch) -> int:
    """FLOPs of one forward + backward in train mode, on meta tensors shaped like `batch`."""
    with torch.device("meta"):
        net = JointAttentionNet(model_cfg).train()
    inputs = batch.inputs
    meta = (
        {k: torch.empty_like(v, device="meta") for k, v in inputs.items()}
        if isinstance(inputs, dict)
        else torch.empty_like(inputs, device="meta")
    )
    with FlopCounterMode(display=False) as counter:
        out = net(meta)
        net.losses(out, torch.empty_like(batch.labels, device="meta"))["total"].backward()
    return counter.get_total_flops()


def build_net(
    model_cfg: ModelConfig, cfg: JlstmConfig, device: torch.device, *, graphed: bool = False
) -> tuple[JointAttentionNet, torch.optim.Optimizer]:
    torch.manual_seed(cfg.train.seed)
    net = JointAttentionNet(model_cfg).to(device).train()
    optimizer, _ = build_optimizer(net, cfg.train, graph_device=device if graphed else None)
    return net, optimizer


def step_figures(times: list[float], batch_size: int) -> dict[str, float]:
    median = float(np.median(times))
    return {
        "step_s_median": round(median, 4),
        "step_s_p90": round(float(np.percentile(times, 90)), 4),
        "clips_per_s": round(batch_size / median, 4),
    }


def profile_steps(
    run_step: Callable[[], Any], device: torch.device, steps: int = PROFILE_STEPS
) -> dict[str, Any]:
    """Where one step's time goes (torch.profiler over `steps` calls of `run_step`): the
    device's busy share of the wall time, kernels run and launch calls made per step (a
    graph replay runs its kernels with one cudaGraphLaunch), and the top ops by self device
    time (self CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run_step()
        sync(device)
    wall = time.perf_counter() - started
    events = prof.key_averages()
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    kernels = [e for e in prof.events() if cuda and e.device_type.name == "CUDA"]
    launches = [e.name for e in prof.events() if cuda and "Launch" in e.name
                and e.device_type.name == "CPU"]
    busy_us = sum(self_time(e) for e in events)
    top = sorted(events, key=self_time, reverse=True)[:PROFILE_TOP]
    return {
        "steps": steps,
        "wall_s_per_step": round(wall / steps, 4),
        "device_busy_share": round(busy_us / 1e6 / wall, 4) if cuda else None,
        "kernels_per_step": round(len(kernels) / steps) if cuda else None,
        "launch_calls_per_step": round(len(launches) / steps, 1) if cuda else None,
        "graph_launches_per_step": (
            round(sum("GraphLaunch" in n for n in launches) / steps, 1) if cuda else None
        ),
        "top_ops": [
            {"op": e.key, "calls_per_step": round(e.count / steps, 1),
             "self_ms_per_step": round(self_time(e) / 1e3 / steps, 3)}
            for e in top
        ],
    }


def timed(
    run_step: Callable[[], Any], device: torch.device, warmup: int, steps: int
) -> list[float]:
    """Seconds of each of `steps` calls of `run_step` after `warmup` untimed ones."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        run_step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def synthetic_run(
    model_cfg: ModelConfig, cfg: JlstmConfig, mode: str, batch_size: int,
    device: torch.device, args: argparse.Namespace,
) -> dict[str, Any]:
    """Step timing on one batch already on the device (eager `train_step`, or a replay of
    the graphed step with `train.cuda_graphs`); then the same step with the batch's copy
    from host memory (`EagerTrainStep.step`, `GraphedTrainStep.step`: what a training
    worker pays); FLOPs, TFLOP/s and MFU."""
    graphed = use_cuda_graphs(cfg.train, device)
    net, optimizer = build_net(model_cfg, cfg, device, graphed=graphed)
    rows = synthetic_rows(model_cfg, mode, batch_size)
    batch = to_batch(rows, device)
    flops = count_flops(model_cfg, batch)
    warmup = max(args.warmup, WARMUP_STEPS + 1) if graphed else args.warmup
    step: EagerTrainStep | GraphedTrainStep
    if graphed:
        step = GraphedTrainStep(net, optimizer, cfg.train, device, batch_size, ddp=False)
        step.step(rows, 1.0)  # fills the input buffers

        def run_step() -> None:
            step.step_again(1.0)
    else:
        step = EagerTrainStep(net, net, optimizer, cfg.train.grad_clip, device,
                              cfg.train.precision)

        def run_step() -> None:
            train_step(net, net, batch, optimizer, cfg.train.grad_clip, 1.0, cfg.train.precision)
    times = timed(run_step, device, warmup, args.steps)
    out: dict[str, Any] = {"backbone": model_cfg.backbone, "batch_size": batch_size,
                           "cuda_graphs": graphed}
    out |= step_figures(times, batch_size)
    with_copy = timed(lambda: step.step(rows, 1.0), device, 1, max(3, args.steps // 2))
    out["with_host_copy"] = step_figures(with_copy, batch_size)
    if graphed:
        out["graph_replays"] = step.graph_replays
    if args.profile:
        out["profile"] = profile_steps(run_step, device)
    step.close()  # the graph released before the next mode builds its own
    achieved = flops / out["step_s_median"] / 1e12
    peak = peak_bf16_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    out |= {
        "flops_per_step": flops,
        "flops_per_clip": flops // batch_size,
        "achieved_tflops": round(achieved, 4),
        "peak_bf16_tflops": peak,
        "mfu": round(achieved / peak, 4) if peak else None,
    }
    return out


def pipeline_run(
    model_cfg: ModelConfig, cfg: JlstmConfig, source: Source, batch_size: int,
    device: torch.device, args: argparse.Namespace,
) -> dict[str, Any]:
    """The same step on batches from Ray Data (cached taps read by this consumer, as a
    training worker reads them); the wait is the time blocked in next()."""
    from data_shards.datasets import iter_clip_batches

    graphed = use_cuda_graphs(cfg.train, device)
    net, optimizer = build_net(model_cfg, cfg, device, graphed=graphed)
    step = (
        GraphedTrainStep(net, optimizer, cfg.train, device, batch_size, ddp=False) if graphed
        else EagerTrainStep(net, net, optimizer, cfg.train.grad_clip, device,
                            cfg.train.precision)
    )
    warmup, steps = pipeline_steps(args)  # the first batch pays the pipeline's start-up
    if graphed:
        warmup = max(warmup, WARMUP_STEPS + 1)
    dataset, read = source
    batches = iter_clip_batches(dataset, batch_size, read, drop_last=True)
    waits, totals, errors = [], [], []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        rows = next(batches, None)
        if rows is None:
            break
        got = time.perf_counter()
        errors += [f.error for f in bad_clips(rows)]
        step.step(rows, 1.0 if ok_rows(rows).any() else 0.0)  # as train_epoch steps it
        sync(device)
        waits.append(got - start)
        totals.append(time.perf_counter() - start)
    step.close()
    steady_wait, steady = waits[warmup:], totals[warmup:]
    out: dict[str, Any] = {"steps": len(steady), "warmup_steps": min(warmup, len(totals))}
    if steady:
        out |= step_figures(steady, batch_size)
        out["data_wait_share"] = round(sum(steady_wait) / sum(steady), 4)
        out["wait_s_median"] = round(float(np.median(steady_wait)), 4)
    out["first_batch_wait_s"] = round(waits[0], 3) if waits else None
    out |= {"bad_clips": len(errors), "first_error": errors[0] if errors else None}
    return out


def measure(
    mode: str, model_cfg: ModelConfig, cfg: JlstmConfig, source: Source | None,
    device: torch.device, args: argparse.Namespace,
) -> dict[str, Any]:
    """One mode: synthetic timing, then the pipeline; on CUDA OOM the batch is halved."""
    batch_size, oom = args.batch_size, []
    while True:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            out = synthetic_run(model_cfg, cfg, mode, batch_size, device, args)
            break
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            oom.append(batch_size)
        free_memory(device)  # outside the except block, where the failed frames are gone
        batch_size //= 2
    out["oom_batch_sizes"] = oom
    out["load_average_after"] = load_average()  # a shared CPU box: load well above the cores
    if device.type == "cuda":
        out["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    free_memory(device)
    if source is not None:
        out["pipeline"] = pipeline_run(model_cfg, cfg, source, batch_size, device, args)
        out["pipeline"]["load_average_after"] = load_average()
        free_memory(device)
    print(json.dumps({mode: out}), flush=True)
    return out


def prepare_pipeline(
    cfg: JlstmConfig, model_cfgs: dict[str, ModelConfig], modes: list[str],
    args: argparse.Namespace,
) -> tuple[dict[str, Source], dict[str, Any]]:
    """Synthesize and index a dataset big enough for the steps, build the feature cache."""
    from data_shards.clip_spec import ClipSpec
    from data_shards.clips import clip_starts
    from data_shards.datasets import build_datasets, clip_readers, subset_clips
    from data_shards.features import build_feature_cache
    from data_shards.index import ensure_index
    from data_shards.manifest import load_manifest
    from data_shards.synth import synthesize_dataset

    model_cfg = model_cfgs["cached_taps"]
    clip_len = model_cfg.clip_len
    data_cfg = cfg.data.model_copy(update={"train_stride": max(1, clip_len // 2)})
    num_frames = VIDEO_CLIP_LENGTHS * clip_len
    per_video = len(clip_starts(num_frames, clip_len, data_cfg.train_stride,
                                data_cfg.frame_interval))
    needed = sum(pipeline_steps(args)) * args.batch_size
    # Half or more of a class's videos are train videos in split 1 once it has 2 or more.
    per_class = 2 * math.ceil(needed / (per_video * CLASSES))
    started = time.time()
    synthesize_dataset(
        data_cfg.root, layout="ucf101", classes=CLASSES, videos_per_class=per_class,
        seed=data_cfg.seed, frame_size=model_cfg.frame_size * 3 // 4, num_frames=num_frames,
    )
    ensure_index(data_cfg)
    synth_s = time.time() - started
    started = time.time()
    if "cached_taps" in modes:
        build_feature_cache(data_cfg, ClipSpec.of(model_cfg))
    cache_s = time.time() - started
    manifest = load_manifest(data_cfg)
    train_clips = subset_clips(
        manifest, "train", clip_len, data_cfg.train_stride, data_cfg.frame_interval
    ).num_rows
    data_cfgs = {
        "cached_taps": data_cfg,
        "finetune_frames": data_cfg.model_copy(update={"use_feature_cache": False}),
    }
    datasets = {
        m: (build_datasets(data_cfgs[m], ClipSpec.of(model_cfgs[m]))["train"],
            clip_readers(data_cfgs[m], ClipSpec.of(model_cfgs[m]))["train"])
        for m in modes
    }
    setup = {
        "videos": manifest.num_rows, "train_clips": train_clips, "frames_per_video": num_frames,
        "video_frame_size": model_cfg.frame_size * 3 // 4, "train_stride": data_cfg.train_stride,
        "decode_cpus": data_cfg.decode_cpus, "ray_cpus": args.ray_cpus,
        "synth_index_s": round(synth_s, 1), "cache_build_s": round(cache_s, 1),
    }
    return datasets, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_step.json")
    parser.add_argument("--size", choices=["full", "reduced"],
                        help="default: full with CUDA, else reduced")
    parser.add_argument("--steps", type=int, help="timed steps (default: full 20, reduced 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (full 5, reduced 1)")
    parser.add_argument("--batch-size", type=int,
                        help="per-device batch (full: the config's batch / workers, reduced 2)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    parser.add_argument("--no-pipeline", dest="pipeline", action="store_false",
                        help="synthetic tensors only: no dataset, no Ray")
    parser.add_argument("--profile", action="store_true",
                        help="also trace a few synthetic steps: device busy share, top ops")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", type=Path, help="default: a temp dir, removed at the end")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of configs/ucf101_late_fusion.yaml (repeatable)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.size = args.size or ("full" if device.type == "cuda" else "reduced")
    full = args.size == "full"
    args.steps = args.steps if args.steps is not None else (20 if full else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if full else 1)
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; allowed: {list(MODES)}")

    load_start, started = load_average(), time.time()
    workdir, tmp = work_folder(args, "jlstm-gpu-step-")
    overrides = [
        "model.backbone_weights=null",  # random init: timing does not depend on the weights
        *(["cluster.use_gpu=true"] if device.type == "cuda" else []),
        f"data.root={workdir / 'data'}", f"data.feature_cache={workdir / 'features'}",
        "data.use_feature_cache=true",
        *([] if full else [f"model.{k}={v}" for k, v in REDUCED.items()]),
        *args.set,
    ]
    cfg = load_config(PAPER_CONFIG, overrides)
    if args.batch_size is None:
        args.batch_size = cfg.train.batch_size // cfg.cluster.num_workers if full else 2
    model_cfg = cfg.resolve_model(NUM_CLASSES.get(cfg.data.dataset, 101))
    model_cfgs = {
        "cached_taps": model_cfg,
        "finetune_frames": model_cfg.model_copy(update={"backbone": "finetune"}),
    }
    warnings.filterwarnings("ignore", message="VGG16Taps: no backbone_weights")
    datasets: dict[str, Source] = {}
    setup = None
    results = {}
    if args.pipeline:  # Ray, decord and PyAV only here: --no-pipeline needs torch alone
        import ray

        from data_shards.cluster import RAY_NODE_ENV
    try:
        if args.pipeline:
            # Before any CUDA work here: the cache's VGG16 actor gets the GPU to itself.
            for key, value in RAY_NODE_ENV.items():
                os.environ.setdefault(key, value)
            ray.init(num_cpus=args.ray_cpus, log_to_driver=False, include_dashboard=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            datasets, setup = prepare_pipeline(cfg, model_cfgs, modes, args)
        for mode in modes:
            results[mode] = measure(mode, model_cfgs[mode], cfg, datasets.get(mode), device, args)
    finally:
        if args.pipeline and ray.is_initialized():
            ray.shutdown()
        if tmp is not None:
            tmp.cleanup()

    device_facts = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
    }
    result = {
        **result_head("gpu_step", args, load_start, time.time() - started,
                      machine=device_facts),
        "size": args.size,
        "autocast": "bf16" if device.type == "cuda" and cfg.train.precision == "bf16" else None,
        "model": model_cfg.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json"),
        "flops_note": "FlopCounterMode (matmuls and convs) over one forward + backward in "
        "train mode, counted on meta tensors of the batch's shapes; the optimizer step is "
        "not counted",
        "mfu_note": mfu_note(device),
        "pipeline_setup": setup,
        "modes": results,
    }
    write_json(args.out, result)
    print(json.dumps({"size": args.size, "total_s": result["total_s"]}))


if __name__ == "__main__":
    main()
