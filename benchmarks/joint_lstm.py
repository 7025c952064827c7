"""Speed of the joint LSTM layer: fast cell vs reference cell vs torch.nn.LSTM.

Writes JSON: steps/s of the fast and the reference cell (a forward over T steps, the fast
cell's precompute included), and achieved GFLOP/s of the joint layer against nn.LSTM with
the same hidden size and input size sum_k D_k, on this machine. Inference mode (no autograd).

    python benchmarks/joint_lstm.py --out benchmarks/results/joint_lstm.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from model.joint_lstm import JointLSTMCell, JointLSTMCellReference

JOINT_FLOPS_FORMULA = "2*B*T*(3*sum_k(D_k^2) + 7*D*H + H^2), D = sum_k D_k"
LSTM_FLOPS_FORMULA = "2*B*T*4*H*(D + H)"


def joint_layer_flops(batch: int, steps: int, input_sizes: list[int], hidden: int) -> int:
    """Matmul FLOPs of one joint layer over T steps (either fusion; elementwise ops ignored).

    Per sample and step, multiply-adds: sub-gate x terms 3*sum D_k^2, sub-gate h terms
    3*D*H, final-gate mix (U) 3*D*H, candidate x term D*H, candidate h term H^2.
    """
    total = sum(input_sizes)
    macs = 3 * sum(d * d for d in input_sizes) + 7 * total * hidden + hidden * hidden
    return 2 * batch * steps * macs


def lstm_flops(batch: int, steps: int, input_size: int, hidden: int) -> int:
    return 2 * batch * steps * 4 * hidden * (input_size + hidden)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call, the contenders taking turns so machine noise hits all alike."""
    for fn in fns.values():
        fn()  # warm-up: allocator, MKL/oneDNN kernel selection
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/joint_lstm.json"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=2)
    parser.add_argument("--input-dim", type=int, default=1280)
    parser.add_argument("--fusion", choices=["early", "late"], default="late")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    hidden, steps, batch = args.hidden, args.steps, args.batch
    input_sizes = [args.input_dim] * args.inputs
    reference = JointLSTMCellReference(input_sizes, hidden, args.fusion).eval()
    fast = JointLSTMCell.from_reference(reference).eval()
    lstm = torch.nn.LSTM(sum(input_sizes), hidden).eval()
    xs = [torch.randn(steps, batch, d) for d in input_sizes]
    x_all = torch.cat(xs, dim=-1)
    zeros = torch.zeros(batch, hidden)

    def run_reference() -> Tensor:
        state = (zeros, zeros)
        for t in range(steps):
            state = reference([x[t] for x in xs], state)
        return state[0]

    def run_fast() -> Tensor:
        x_gates = fast.precompute(xs)
        state = (zeros, zeros)
        for t in range(steps):
            state = fast.step(x_all[t], x_gates[t], state)
        return state[0]

    def run_lstm() -> Tensor:
        return lstm(x_all)[0]

    with torch.inference_mode():
        max_diff = (run_fast() - run_reference()).abs().max().item()
        times = time_interleaved(
            {"reference": run_reference, "fast": run_fast, "nn_lstm": run_lstm}, args.repeats
        )
    # Best of N: this shared VM's memory bandwidth swings between runs; the minimum is the
    # least disturbed run. Medians are kept beside it.
    seconds = {name: min(t) for name, t in times.items()}

    joint_flops = joint_layer_flops(batch, steps, input_sizes, hidden)
    torch_lstm_flops = lstm_flops(batch, steps, sum(input_sizes), hidden)
    joint_gflops = joint_flops / seconds["fast"] / 1e9
    torch_lstm_gflops = torch_lstm_flops / seconds["nn_lstm"] / 1e9
    result = {
        "config": {
            "hidden": hidden,
            "steps": steps,
            "batch": batch,
            "input_sizes": input_sizes,
            "fusion": args.fusion,
            "repeats": args.repeats,
            "mode": "forward only, torch.inference_mode, float32, best of repeats, interleaved",
        },
        "seconds_per_forward": seconds,
        "median_seconds_per_forward": {name: statistics.median(t) for name, t in times.items()},
        "steps_per_s": {name: steps / s for name, s in seconds.items()},
        "fast_over_reference": seconds["reference"] / seconds["fast"],
        "fast_vs_reference_max_abs_diff": max_diff,
        "flops": {
            "joint_layer_formula": JOINT_FLOPS_FORMULA,
            "joint_layer_per_forward": joint_flops,
            "nn_lstm_formula": LSTM_FLOPS_FORMULA,
            "nn_lstm_per_forward": torch_lstm_flops,
        },
        "gflops_per_s": {"joint_layer_fast": joint_gflops, "nn_lstm": torch_lstm_gflops},
        "joint_over_nn_lstm_gflops": joint_gflops / torch_lstm_gflops,
        "goals": {"fast_over_reference": 3.0, "joint_over_nn_lstm_gflops": 0.5},
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.is_available(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
