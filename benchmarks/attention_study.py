"""The lambda question (issue 12): what the attention regularization does on the demo data.

Trains the demo's late_fusion net in this process (no Ray: the same `train_step`,
`predict_clips` and cached taps as a Ray Train worker, one worker's view) once per
setting, same seed, same clip order, and records every epoch: the loss terms (the LSTM's
loss is the paper's Figure 5), R, the test clips' and videos' top-1 and
`attention_on_target` (1.0 = uniform attention), and the same ratio for the temporal
convnet's activity map m (`activity_on_target`: what R pulls the attention toward when it
trains the attention too). Settings: lambda x what R trains
(`model.attention_reg_grad`: the convnet only, the paper; the attention only; both), on
the maps `--set model.attention_reg_maps=output|input` names (Y or X).

Needs the demo's data and feature cache (`jlstm demo --workdir DIR` writes both):

    python benchmarks/attention_study.py --workdir runs/demo \
        --out benchmarks/results/attention_study.json
    python benchmarks/attention_study.py --workdir runs/demo --at-init 3 \
        --out benchmarks/results/attention_at_init.json   # the maps before training
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from machine import load_average, machine_info

from data_shards.clip_spec import ClipSpec
from data_shards.datasets import clip_readers, subset_clips
from data_shards.manifest import load_manifest
from data_shards.splits import class_names
from data_shards.targets import target_reader
from model import JointAttentionNet
from model.branch import activity_map
from orchestration.config import JlstmConfig, load_config
from orchestration.evaluate import attention_on_target, evaluate
from orchestration.metrics import LOSS_TERMS, loss_metric
from orchestration.step import build_optimizer, to_batch, train_step
from orchestration.worker import predict_clips

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
LAMBDAS = (0.0, 1.0, 10.0, 100.0, 1000.0)
GRADS = ("conv", "attention", "conv_and_attention")


def batches(clips, read, batch_size: int, order: np.ndarray | None = None):
    """Numpy batches of a clip table (in `order`), each through the cache reader."""
    table = clips.take(order) if order is not None else clips
    for start in range(0, table.num_rows, batch_size):
        rows = table.slice(start, batch_size)
        yield read({name: rows[name].to_numpy() for name in rows.column_names})


class ActivityOnTarget:
    """`targets` for `predict_clips` that also measures the activity map m that R compares
    with the attention (of Y or of X, `model.attention_reg_maps`).

    Hooks on the branches keep the batch's maps; `predict_clips` asks for the batch's target
    locations right after the forward pass, so the call pairs them and scores m like the
    attention (`attention_on_target` of m in place of the attention).
    """

    def __init__(self, net: JointAttentionNet, targets) -> None:
        self.targets, self.maps, self.scores = targets, {}, []
        self.which = 0 if net.cfg.attention_reg_maps == "output" else 2  # Y or X
        for tap, branch in net.branches.items():
            branch.register_forward_hook(partial(self._keep, tap))

    def _keep(self, tap: str, module, inputs, output) -> None:
        self.maps[tap] = output[self.which]

    def __call__(self, video_ids: np.ndarray, clip_starts: np.ndarray) -> np.ndarray | None:
        inside = self.targets(video_ids, clip_starts)
        activity = torch.stack([activity_map(m.float()) for m in self.maps.values()], dim=1)
        self.scores.append(attention_on_target(activity.numpy(), inside))
        return inside


def train_setting(cfg: JlstmConfig, overrides: dict[str, Any], epochs: int) -> dict[str, Any]:
    """One training run of `cfg` with model `overrides`; per-epoch figures."""
    torch.manual_seed(cfg.train.seed)
    manifest = load_manifest(cfg.data)
    names = class_names(cfg.data.manifest_path())
    model_cfg = cfg.resolve_model(len(names)).model_copy(update=overrides)
    readers = clip_readers(cfg.data, ClipSpec.of(model_cfg))
    train = subset_clips(manifest, "train", model_cfg.clip_len, cfg.data.train_stride,
                         cfg.data.frame_interval)
    test = subset_clips(manifest, "test", model_cfg.clip_len,
                        cfg.data.eval_stride_for(model_cfg.clip_len), cfg.data.frame_interval)
    test_rows = manifest.filter(pc.equal(manifest["subset"], "test"))
    targets = target_reader(cfg.data.root, test_rows, model_cfg.map_size, model_cfg.clip_len,
                            cfg.data.frame_interval)
    if targets is None:
        raise SystemExit(f"{cfg.data.root}: no target boxes; re-run `jlstm demo` into a new "
                         "--workdir to write them")
    net = JointAttentionNet(model_cfg)
    measured = ActivityOnTarget(net, targets)
    train_cfg = cfg.train.model_copy(update={"epochs": epochs})
    optimizer, scheduler = build_optimizer(net, train_cfg)
    device = torch.device("cpu")
    rng = np.random.default_rng(cfg.data.seed)
    history = []
    for epoch in range(epochs):
        started = time.perf_counter()
        net.train()
        sums, steps = dict.fromkeys(LOSS_TERMS, 0.0), 0
        for rows in batches(train, readers["train"], train_cfg.batch_size,
                            rng.permutation(train.num_rows)):
            _, losses = train_step(net, net, to_batch(rows, device), optimizer,
                                   train_cfg.grad_clip)
            for term in LOSS_TERMS:
                sums[term] += float(losses[term].detach())
            steps += 1
        scheduler.step()
        measured.scores.clear()
        preds, failures, on_target = predict_clips(
            net, batches(test, readers["val"], 64), device, measured
        )
        if failures:
            raise SystemExit(f"{len(failures)} test clips failed: {failures[0]}")
        metrics = evaluate(preds.sorted(), names).metrics
        per_branch = np.concatenate(on_target).mean(axis=0)
        history.append({
            "epoch": epoch + 1,
            **{loss_metric(t): sums[t] / steps for t in LOSS_TERMS},
            "val_clip_top1_vote": metrics["clip_top1_vote"],
            "val_video_top1_vote": metrics["video_top1_vote"],
            "attention_on_target": float(per_branch.mean()),
            "activity_on_target": float(np.concatenate(measured.scores).mean()),
            **{f"attention_on_target_{tap}": float(v)
               for tap, v in zip(model_cfg.taps, per_branch, strict=True)},
            "seconds": time.perf_counter() - started,
        })
        print(overrides, history[-1], flush=True)
    return {"overrides": overrides, "history": history, "final": history[-1]}


def localization_at_init(cfg: JlstmConfig, seeds: int, clips: int) -> dict[str, Any]:
    """Before any training: how much each map's activity sits on the moving square (the
    `attention_on_target` of its activity map) for the first `clips` test clips.

    Per tap: the cached taps themselves (raw, and centered over the clip as the demo
    feeds them, activity = sum over channels of |x|), and per seed of a fresh net the
    adapted maps X, the first temporal conv's output and Y.
    """
    manifest = load_manifest(cfg.data)
    model_cfg = cfg.resolve_model(len(class_names(cfg.data.manifest_path())))
    test = subset_clips(manifest, "test", model_cfg.clip_len,
                        cfg.data.eval_stride_for(model_cfg.clip_len), cfg.data.frame_interval)
    read = clip_readers(cfg.data, ClipSpec.of(model_cfg))["val"]
    rows = next(batches(test.slice(0, clips), read, clips))
    batch = to_batch(rows, torch.device("cpu"))
    targets = target_reader(cfg.data.root, manifest.filter(pc.equal(manifest["subset"], "test")),
                            model_cfg.map_size, model_cfg.clip_len, cfg.data.frame_interval)
    inside = targets(batch.video_ids, batch.clip_starts)

    def on_target(maps: torch.Tensor) -> float:  # [B, T, C, K, K], non-negative
        return float(attention_on_target(activity_map(maps.float())[:, None].numpy(),
                                         inside).mean())

    result: dict[str, Any] = {"clips": len(batch.labels), "taps": {}, "seeds": []}
    for tap, taps in batch.inputs.items():
        taps = taps.float()
        centered = taps - taps.mean(dim=1, keepdim=True)
        result["taps"][tap] = {"raw": on_target(taps.abs()),
                               "centered": on_target(centered.abs())}
    for seed in range(seeds):
        torch.manual_seed(seed)
        net = JointAttentionNet(model_cfg).eval()
        outputs: dict[tuple[str, str], Any] = {}
        for tap, branch in net.branches.items():
            # convs[1] is the first conv's ReLU; the branch returns (Y, logits, X).
            branch.temporal.convs[1].register_forward_hook(partial(_keep, outputs, (tap, "conv")))
            branch.register_forward_hook(partial(_keep, outputs, (tap, "branch")))
        with torch.no_grad():
            net(batch.inputs)
        result["seeds"].append({
            tap: {"X": on_target(outputs[tap, "branch"][2]),
                  "first_conv": on_target(outputs[tap, "conv"].transpose(1, 2)),
                  "Y": on_target(outputs[tap, "branch"][0])}
            for tap in net.branches
        })
    return result


def _keep(store: dict, key: tuple[str, str], module, inputs, output) -> None:
    """A forward hook: keep the module's output under `key`."""
    store[key] = output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo", help="the demo's --workdir")
    parser.add_argument("--out", default="benchmarks/results/attention_study.json")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS))
    parser.add_argument("--grads", nargs="+", default=list(GRADS), choices=GRADS)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a key of configs/demo.yaml")
    parser.add_argument("--at-init", type=int, metavar="SEEDS", default=0,
                        help="only measure the maps' localization before training, over "
                             "this many fresh nets (no training)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    cfg = load_config(DEMO_CONFIG, [f"data.root={workdir / 'data'}",
                                    f"data.feature_cache={workdir / 'features'}",
                                    *args.overrides])
    torch.set_num_threads(1)  # one worker's share of this machine, as in the demo
    if args.at_init:
        result = localization_at_init(cfg, args.at_init, clips=200)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return
    runs = []
    for grad in args.grads:
        for lam in args.lambdas:
            if lam == 0 and grad != args.grads[0]:
                continue  # without R, what it trains does not matter
            runs.append(train_setting(
                cfg, {"attention_reg_weight": lam, "attention_reg_grad": grad}, args.epochs
            ))
    result = {
        "setup": {"config": str(DEMO_CONFIG), "overrides": args.overrides,
                  "epochs": args.epochs, "machine": machine_info()},
        "runs": runs,
        "load_average_end": load_average(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
