"""The global batch at any number of workers: each rank's share, its loss weight, the steps.

An elastic run (`cluster.min_workers`) changes its world size between epochs, and the
training must not change with it: the global batch stays `train.batch_size` and the
optimizer steps per epoch stay `steps_per_epoch(clips, batch_size)` at every world size.

- Each rank takes `rank_batch_sizes(global, world)[rank]` clips a step: global / world,
  the first `global % world` ranks one more where it does not divide (64 over 3 is
  22 + 21 + 21).
- DDP averages the ranks' gradients (divides their sum by the world size), so a rank's
  mean loss is weighted by `world * its batch / global`: the step's gradient is then the
  gradient of the mean loss over the global batch, whatever the split (1.0 when it divides).
- Every rank steps exactly `steps_per_epoch` times (DDP's all-reduce needs every rank at
  every step). Ray Train's equal split gives each rank clips // world clips; a rank whose
  share runs out first (one clip more per step) steps its last batches with a zero
  weight, and a rank with clips left over at the end leaves them for the next epoch's
  shuffle. With a dividing world size neither happens but for the last, short step.

Pure Python: `jlstm plan` reports the steps without importing torch.
"""

from __future__ import annotations

import math


def rank_batch_sizes(global_batch: int, world_size: int) -> list[int]:
    """Each rank's clips per step: they sum to `global_batch`, or are 1 each when there
    are more ranks than that."""
    if global_batch < world_size:
        return [1] * world_size  # more workers than clips a step: one each
    base, extra = divmod(global_batch, world_size)
    return [base + (rank < extra) for rank in range(world_size)]


def rank_loss_weight(global_batch: int, world_size: int, rank: int) -> float:
    """What this rank's mean loss is multiplied by so DDP's average of the ranks'
    gradients is the gradient of the global batch's mean loss."""
    sizes = rank_batch_sizes(global_batch, world_size)
    return world_size * sizes[rank] / sum(sizes)


def steps_per_epoch(train_clips: int, global_batch: int) -> int:
    """Optimizer steps in one epoch of `train_clips` clips: the same at every world size."""
    return max(1, math.ceil(train_clips / global_batch))
