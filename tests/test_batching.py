"""The same training at any world size (`orchestration.batching`): each rank's share of
the global batch, its loss weight, the steps per epoch, and the loop that keeps every rank
stepping the same number of times. No Ray: the loop runs as one worker would."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch
from test_model import NUM_CLASSES, random_taps, small_net

from orchestration.batching import rank_batch_sizes, rank_loss_weight, steps_per_epoch
from orchestration.config import validate_config
from orchestration.metrics import TRAIN_DATA_WAIT_SHARE, TRAIN_STEPS, loss_metric
from orchestration.step import EagerTrainStep, build_optimizer
from orchestration.worker import seed_epoch, train_epoch


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("global_batch", [8, 16, 21, 64, 70])
def test_rank_batches_sum_to_the_global_batch(global_batch: int, world: int) -> None:
    sizes = rank_batch_sizes(global_batch, world)
    assert len(sizes) == world and sum(sizes) == global_batch
    assert max(sizes) - min(sizes) <= 1
    weights = [rank_loss_weight(global_batch, world, r) for r in range(world)]
    # DDP divides the ranks' summed gradients by the world size: the weights average to 1.
    assert sum(weights) / world == pytest.approx(1.0)


def test_sixty_four_over_three_is_22_21_21() -> None:
    assert rank_batch_sizes(64, 3) == [22, 21, 21]
    assert rank_loss_weight(64, 3, 0) == pytest.approx(3 * 22 / 64)


def test_steps_per_epoch_do_not_depend_on_the_world_size() -> None:
    # 9,537 UCF101 split-1 training videos at one clip each, the paper's batch of 64.
    assert steps_per_epoch(9537, 64) == 150
    assert steps_per_epoch(64, 64) == 1 and steps_per_epoch(65, 64) == 2


def test_weighted_uneven_ranks_give_the_global_batch_gradient() -> None:
    """8 clips over 3 ranks (3 + 3 + 2): DDP's average of each rank's weighted gradient is
    the gradient of the 8 clips' mean loss (an even 8/3 weighting would not be)."""
    # float64: the check is of the weighting, not of float32's rounding; eval mode:
    # BatchNorm's running statistics, so a clip's forward does not depend on its batch.
    net = small_net().double().eval()
    taps = {k: v.double() for k, v in random_taps(net, batch=8).items()}
    labels = torch.arange(8) % NUM_CLASSES

    def grads(rows: slice, weight: float) -> list[torch.Tensor]:
        net.zero_grad()
        out = net({k: v[rows] for k, v in taps.items()})
        (net.losses(out, labels[rows])["total"] * weight).backward()
        return [p.grad.clone() for p in net.parameters() if p.grad is not None]

    whole = grads(slice(0, 8), 1.0)
    world, starts = 3, np.cumsum([0, *rank_batch_sizes(8, 3)])
    ranks = [grads(slice(starts[r], starts[r + 1]), rank_loss_weight(8, world, r))
             for r in range(world)]
    averaged = [sum(parts) / world for parts in zip(*ranks, strict=True)]
    for a, b in zip(averaged, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    unweighted = [grads(slice(starts[r], starts[r + 1]), 1.0) for r in range(world)]
    naive = [sum(parts) / world for parts in zip(*unweighted, strict=True)]
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6)
               for a, b in zip(naive, whole, strict=True))


def _rows(net: Any, count: int, start: int) -> dict[str, np.ndarray]:
    taps = random_taps(net, batch=count)
    return {
        **{f"taps_{k}": v.half().numpy() for k, v in taps.items()},
        "label": (np.arange(start, start + count) % NUM_CLASSES).astype(np.int64),
        "video_id": np.arange(start, start + count), "clip_start": np.zeros(count, np.int64),
    }


@pytest.mark.parametrize(("world", "rank"), [(1, 0), (3, 0), (3, 2)])
def test_a_rank_steps_exactly_the_epochs_steps_whatever_its_share(world: int, rank: int) -> None:
    """20 clips, global batch 8: 3 steps at every world size. Ray Train's equal split gives
    each of 3 ranks 6 clips; rank 0 takes 3 a step (3 + 3, then a zero-weight step on its
    last batch), rank 2 takes 2 a step (2 + 2 + 2)."""
    clips, global_batch = 20, 8
    cfg = validate_config({"data": {"dataset": "folder", "root": "."},
                           "train": {"batch_size": global_batch}})
    net = small_net()
    optimizer, _ = build_optimizer(net, cfg.train)
    shard = clips // world
    size = rank_batch_sizes(global_batch, world)[rank]
    batches = [_rows(net, min(size, shard - lo), lo) for lo in range(0, shard, size)]
    steps = steps_per_epoch(clips, global_batch)
    read: list[int] = []

    def counted(parts: list[dict[str, np.ndarray]]) -> Any:
        for rows in parts:
            read.append(len(rows["label"]))
            yield rows

    step = EagerTrainStep(net, net, optimizer, cfg.train.grad_clip, torch.device("cpu"))
    metrics, failures = train_epoch(
        step, counted(batches), torch.device("cpu"),
        steps=steps, loss_weight=rank_loss_weight(global_batch, world, rank),
    )
    assert metrics[TRAIN_STEPS] == steps == 3
    assert failures == [] and np.isfinite(metrics[loss_metric("total")])
    assert sum(read) == shard  # every clip of the shard, once; filler steps read none
    # A share larger than the steps need: the batches past the last step stay unread.
    read.clear()
    metrics, _ = train_epoch(step, counted(batches * 3), torch.device("cpu"),
                             steps=steps, loss_weight=1.0)
    assert metrics[TRAIN_STEPS] == steps and len(read) == steps


def test_the_data_wait_share_is_the_time_spent_waiting_for_batches() -> None:
    cfg = validate_config({"data": {"dataset": "folder", "root": "."}})
    net = small_net()
    optimizer, _ = build_optimizer(net, cfg.train)
    step = EagerTrainStep(net, net, optimizer, cfg.train.grad_clip, torch.device("cpu"))
    batches = [_rows(net, 2, lo) for lo in range(0, 6, 2)]

    def slow(parts: list[dict[str, np.ndarray]]) -> Any:
        for rows in parts:
            time.sleep(0.3)
            yield rows

    fast, _ = train_epoch(step, iter(batches), torch.device("cpu"))
    waited, _ = train_epoch(step, slow(batches), torch.device("cpu"))
    assert 0 <= fast[TRAIN_DATA_WAIT_SHARE] < waited[TRAIN_DATA_WAIT_SHARE] <= 1


def test_epoch_seeds_depend_on_seed_epoch_and_rank_only() -> None:
    draws: dict[tuple[int, int, int], list[torch.Tensor]] = {}
    for key in [(7, 1, 0), (7, 1, 1), (7, 2, 0), (8, 1, 0), (7, 1, 0)]:
        torch.manual_seed(12345 + len(draws))  # whatever state came before
        seed_epoch(*key)
        draws.setdefault(key, []).append(torch.rand(3))
    assert torch.equal(*draws[(7, 1, 0)])  # the same (seed, epoch, rank): the same draws
    others = [draws[k][0] for k in [(7, 1, 1), (7, 2, 0), (8, 1, 0)]]
    assert all(not torch.equal(draws[(7, 1, 0)][0], o) for o in others)
