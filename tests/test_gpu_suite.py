"""The GPU suite's CPU rehearsal: `benchmarks/gpu_suite.py --size reduced` end to end, so the
one GPU call it is written for runs as it is (issue 20)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "benchmarks" / "gpu_suite.py"
CPU_STAGES = ("step_b16_eager", "step_b64_eager", "cache_build", "feed", "ray_train")
GRAPHED_STAGES = ("step_b16_graphed", "step_b64_graphed")
# Generous: on 2 shared cores the stages take minutes; their own caps still apply.
BUDGET_S = 1500


@pytest.mark.slow
@pytest.mark.timeout(BUDGET_S + 300)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rehearsal (graphed stages skip)")
def test_reduced_suite_runs_every_cpu_stage(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    # The suite gives its stages RAY_ADDRESS=local itself; conftest's is inherited as well.
    env = dict(os.environ, RAY_ADDRESS="local")
    done = subprocess.run(
        [sys.executable, str(SUITE), "--out-dir", str(out), "--work-dir", str(work),
         "--size", "reduced", "--budget-s", str(BUDGET_S)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=BUDGET_S + 120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "gpu_suite.json").read_text())
    stages = summary["stages"]
    assert list(stages) == [*CPU_STAGES[:1], GRAPHED_STAGES[0], CPU_STAGES[1], GRAPHED_STAGES[1],
                            "equivalence", *CPU_STAGES[2:]]
    for name in CPU_STAGES:
        assert stages[name]["status"] == "ok", (name, stages[name].get("stderr_tail"))
        assert (out / stages[name]["json"]).is_file()
        assert summary["results"][name] is not None
    for name in GRAPHED_STAGES:
        assert stages[name]["status"] == "skipped"
        assert "CUDA" in stages[name]["reason"]
    # tests/test_cuda_graphs.py runs and skips its GPU tests here (or is not there yet).
    assert stages["equivalence"]["status"] in ("ok", "skipped")
    # Only the small JSON files land in --out-dir: a GPU call brings back a few files.
    assert {p.suffix for p in out.iterdir()} == {".json"}

    train = summary["results"]["ray_train"]
    assert train["run_status"] == "FINISHED"
    assert train["registered_model"]["status"] == "READY"
    assert [row["epoch"] for row in train["epochs"]] == [1, 2]
    assert train["steady_train_clips_per_s"] > 0
    assert train["eval"]["video_top1_vote"] is not None
    assert all(cmd["returncode"] == 0 for cmd in train["commands"].values())

    headline = summary["headline"]
    assert headline["step_clips_per_s"]["step_b16_eager"] > 0
    assert headline["cache_build_frames_per_s"] > 0
    assert headline["cache_build_bound_by"] in ("decode", "vgg16")
    assert headline["feed_stream_clips_per_s"] > 0
    # Without CUDA, Ray Train is compared with the eager step of its batch (noted).
    assert headline["ray_train_bare_step"] == "step_b16_eager"
    assert headline["ray_train_over_bare_step"] > 0
    assert summary["goals"]["graphed_step_b16_clips_per_s"]["met"] is None
