"""tune_spaces: spaces validated before any trial, a real 4-trial ASHA sweep, resume.

The sweeps run on the session's local Ray cluster (2 CPUs) over cached taps of a tiny
synthetic dataset, one training worker per trial, with MLflow in a SQLite file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from data_shards.errors import StaleCacheError
from data_shards.features import build_feature_cache, check_cache
from data_shards.index import ensure_index
from data_shards.synth import synthesize_dataset
from jlstm.cli import main
from orchestration.config import load_config, validate_config
from orchestration.errors import ConfigError
from orchestration.resources import NodeShape, ResourcePlan, plan_resources
from tune_spaces.spaces import PAPER_POINT, load_sweep, trial_raw
from tune_spaces.sweep import _union_taps, run_sweep
from tune_spaces.trial import TRIAL_TAG

REPO = Path(__file__).resolve().parent.parent
ALL_TAPS = ["conv4_3", "pool4", "conv5_3"]
SPACE = {
    "model.attention_reg_weight": {"loguniform": [1.0, 10000.0]},
    "train.weight_decay": {"loguniform": [1e-6, 1e-3]},
    "model.fusion": {"choice": ["early", "late"]},
    "model.taps": {"choice": [["pool4"], ["conv5_3"], ["pool4", "conv5_3"], ALL_TAPS]},
}


def _base_config(tmp: Path) -> dict[str, Any]:
    return {
        "variant": "late_fusion",
        "model": {
            "frame_size": 64, "clip_len": 4, "last_steps": 2, "map_size": 2, "channels": 8,
            "hidden_size": 16, "num_layers": 1, "supervision_hidden": 8,
            "taps": ["pool4", "conv5_3"],
        },
        "data": {
            "dataset": "ucf101", "root": str(tmp / "data"), "split": 1, "train_stride": 4,
            "decode_cpus": 0.5, "feature_cache": str(tmp / "features"),
            "use_feature_cache": True,
        },
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.003},
        "cluster": {"num_workers": 1, "cpus_per_worker": 0.49, "storage_path": str(tmp / "ray")},
        "tracking": {"experiment": "tune-test", "attention_examples": 1},
    }


@pytest.fixture(scope="module")
def base_config(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base run config over 2 classes x 4 videos, indexed, with every tap cached."""
    tmp = tmp_path_factory.mktemp("tune")
    synthesize_dataset(
        tmp / "data", layout="ucf101", classes=2, videos_per_class=4, frame_size=64,
        num_frames=16,
    )
    path = tmp / "base.yaml"
    path.write_text(yaml.safe_dump(_base_config(tmp)))
    cfg = load_config(path)
    manifest = ensure_index(cfg.data)
    assert manifest.is_file()
    clip_spec = cfg.clip_spec(2).with_taps(ALL_TAPS)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALIZED"):
        build_feature_cache(cfg.data, clip_spec)
    return path


def _write_sweep(path: Path, base: Path, **changes: Any) -> Path:
    sweep = {
        "name": path.stem,
        "base_config": str(base),
        "space": SPACE,
        "num_samples": 4,
        # loss_total is continuous (lambda weighs the attention term), so ASHA's cut at
        # epoch 1 never meets the ties a 2-video accuracy would give.
        "metric": "loss_total",
        "mode": "min",
        "asha": {"grace_period": 1, "reduction_factor": 2, "max_t": 2},
        "seed": 3,
        "storage_path": str(path.parent / "ray_tune"),
        **changes,
    }
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.mark.parametrize(
    ("space", "named"),
    [
        ({"model.attention_reg_wieght": {"loguniform": [1, 10]}}, "attention_reg_wieght"),
        ({"trian.lr": {"uniform": [0.001, 0.01]}}, "trian"),
        ({"train.weight_decay": {"loguniform": [1e-3, 1e-6]}}, "train.weight_decay"),
        ({"model.fusion": {"choice": ["early", "sideways"]}}, "model.fusion"),
        ({"train.lr": {"gaussian": [0, 1]}}, "gaussian"),
        ({"cluster.num_workers": {"choice": [1, 2]}}, "cluster.num_workers"),
    ],
)
def test_invalid_space_is_refused_before_any_trial(
    tmp_path: Path, space: dict, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(_base_config(tmp_path)))
    sweep = _write_sweep(tmp_path / "bad.yaml", base, space=space)
    with pytest.raises(ConfigError, match=named):
        load_sweep(sweep)
    # The CLI refuses it too (exit 2, the key named) and nothing was started on disk.
    assert main(["tune", "--config", str(sweep)]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "ray_tune").exists()


def test_paper_point_outside_the_space_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(_base_config(tmp_path)))
    space = {**SPACE, "model.attention_reg_weight": {"loguniform": [1.0, 10.0]}}
    with pytest.raises(ConfigError, match="attention_reg_weight = 1000"):
        load_sweep(_write_sweep(tmp_path / "s.yaml", base, space=space))


def test_set_routes_to_the_sweep_or_the_base_config(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(_base_config(tmp_path)))
    sweep, base_raw = load_sweep(
        _write_sweep(tmp_path / "s.yaml", base), ["num_samples=6", "train.epochs=3"]
    )
    assert sweep.num_samples == 6
    assert base_raw["train"]["epochs"] == 3
    assert sweep.paper_point() == {
        **{k: v for k, v in PAPER_POINT.items() if k != "model.taps"},
        "model.taps": json.dumps(PAPER_POINT["model.taps"]),
    }


def test_a_grid_runs_every_value_in_every_repetition(tmp_path: Path) -> None:
    from ray import tune

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(_base_config(tmp_path)))
    space = {
        "model.attention_reg_weight": {"grid": [0.0, 1.0, 1000.0]},
        "model.attention_reg_grad": {"grid": ["conv", "conv_and_attention"]},
        "model.taps": {"choice": [["pool4"], ["pool4", "conv5_3"]]},
    }
    sweep, _ = load_sweep(_write_sweep(tmp_path / "g.yaml", base, space=space,
                                       include_paper_point=False, num_samples=2))
    assert sweep.num_trials == 2 * 3 * 2
    tuned = sweep.tune_space()
    assert tuned["model.attention_reg_weight"] == tune.grid_search([0.0, 1.0, 1000.0])
    assert sweep.decode({"model.attention_reg_grad": "conv"}) == {
        "model.attention_reg_grad": "conv"
    }
    # Every grid value is validated as a run config; Optuna cannot run a grid.
    bad = {**space, "model.attention_reg_grad": {"grid": ["conv", "attention_only"]}}
    with pytest.raises(ConfigError, match="attention_reg_grad"):
        load_sweep(_write_sweep(tmp_path / "b.yaml", base, space=bad, include_paper_point=False))
    # The paper's point would pin lambda for one repetition and skip the rest of its grid.
    with pytest.raises(ConfigError, match="include_paper_point = true with a grid"):
        load_sweep(_write_sweep(tmp_path / "p.yaml", base, space=space))
    with pytest.raises(ConfigError, match="grid needs searcher: random"):
        load_sweep(_write_sweep(tmp_path / "o.yaml", base, space=space,
                                include_paper_point=False, searcher="optuna"))


def test_concurrency_leaves_a_cpu_to_ray_data(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    raw = _base_config(tmp_path)
    raw["cluster"]["cpus_per_worker"] = None
    base.write_text(yaml.safe_dump(raw))
    sweep, _ = load_sweep(_write_sweep(tmp_path / "s.yaml", base))
    cfg = load_config(base)

    def plan(cpus: float) -> ResourcePlan:
        return plan_resources(
            cfg.cluster, cfg.data.decode_cpus, [NodeShape(cpus)],
            max_runs=sweep.num_samples, trial_cpus=sweep.trial_cpus,
        )

    # 2 CPUs: 1 for Ray Data, the rest for one trial's driver (0.01) and its worker.
    assert (plan(2.0).concurrent_runs, plan(2.0).cpus_per_worker) == (1, 0.99)
    wide = plan(16.0)
    assert wide.concurrent_runs == 4  # num_samples caps it
    assert wide.concurrent_runs * (wide.cpus_per_worker + wide.trial_cpus) <= 15.0
    cfg.cluster.cpus_per_worker = 0.49
    assert plan(2.0).concurrent_runs == 2


def test_inputs_are_a_searchable_choice_and_the_cache_holds_every_frozen_one(
    tmp_path: Path,
) -> None:
    """`model.inputs` (the name of `model.taps` since inputs are a registry) sweeps flow in
    or out: the sweep's one cache holds every frozen input a trial can pick, in cache order
    (VGG16's layers, then the flow VGG16's); a trained input (flow_cnn) is not cached; the
    paper's point is the RGB pair under the new name too."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(_base_config(tmp_path)))
    space = {"model.inputs": {"choice": [["conv5_3", "flow"], ["pool4", "conv5_3"], ["pool4"]]}}
    sweep, base_raw = load_sweep(_write_sweep(tmp_path / "flow.yaml", base, space=space,
                                              include_paper_point=True))
    assert _union_taps(sweep, validate_config(base_raw)) == ["pool4", "conv5_3", "flow"]
    assert sweep.decode(sweep.paper_point() or {}) == {"model.inputs": PAPER_POINT["model.taps"]}
    trial = validate_config(trial_raw(base_raw, {"model.inputs": ["conv5_3", "flow"]}))
    assert trial.resolve_model(2).inputs == ["conv5_3", "flow"]  # the base's taps replaced


def test_cache_of_all_taps_serves_every_branch_set(base_config: Path) -> None:
    cfg = load_config(base_config)
    for taps in (["pool4"], ["conv5_3"], ["pool4", "conv5_3"], ALL_TAPS):
        check_cache(cfg.data, cfg.clip_spec(2).with_taps(taps))
    with pytest.raises(StaleCacheError, match="taps"):
        check_cache(cfg.data, cfg.clip_spec(2).with_taps(["pool5"]))


@pytest.mark.slow
def test_sweep_with_asha_registers_the_best_trial(
    base_config: Path, mlflow_uri: str, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    # Async ASHA compares each trial only with those that reached the rung before it, so
    # with trials side by side the arrival order (timing) decides whether anything is cut
    # (one CI run in eight cut nothing). One at a time, the order is the trials' own: with
    # seed 1, trial 2 (lambda ~6200) follows the paper point and a lambda ~110 trial, and
    # its epoch-1 loss_total (~490) is far above their median (~140 measured).
    sweep, base_raw = load_sweep(
        _write_sweep(tmp_path / "sweep4.yaml", base_config, seed=1, max_concurrent_trials=1)
    )
    result = run_sweep(sweep, base_raw)

    assert not result.interrupted
    trials = result.trials
    assert len(trials) == 4 and (trials["status"] == "ok").all()
    # The paper's point is one of the trials.
    paper = trials[(trials["model.attention_reg_weight"] == 1000.0)
                   & (trials["model.taps"] == "pool4+conv5_3")]
    assert len(paper) == 1 and paper["model.fusion"].item() == "late"
    # ASHA cut at least one trial after its first epoch; the others ran both epochs.
    assert (trials["epoch"] == 1).sum() >= 1
    assert set(trials["epoch"]) <= {1, 2} and (trials["epoch"] == 2).any()
    assert trials["stopped_early"].sum() == (trials["epoch"] == 1).sum()
    assert result.trial_epochs_run < result.trial_epochs_full == 8
    # The best trial is the one whose last report (scope="last": an ASHA-stopped trial's
    # epoch 1) has the lowest loss.
    best = trials.loc[trials["loss_total"].idxmin()]
    assert (result.best_trial_id, result.best_metric) == (best["trial_id"], best["loss_total"])

    client = MlflowClient(mlflow_uri)
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
    )
    assert len(children) == 4
    assert {c.data.tags[TRIAL_TAG] for c in children} == set(trials["trial_id"])
    assert {c.info.status for c in children} == {"FINISHED"}  # the stopped ones included
    for child in children:
        epochs = trials.loc[trials["trial_id"] == child.data.tags[TRIAL_TAG], "epoch"].item()
        history = client.get_metric_history(child.info.run_id, "loss_total")
        assert sorted(m.step for m in history) == list(range(1, epochs + 1))
        assert "model.attention_reg_weight" in child.data.params
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"trials.csv", "metric_vs_lambda_zeta.png", "best_config.yaml"} <= artifacts
    assert result.best is not None and result.best.model_version == "1"
    version = client.get_model_version("jlstm-ucf101", "1")
    assert version.run_id == result.best.run_id
    assert str(client.get_registered_model("jlstm-ucf101").aliases["champion"]) == "1"


@pytest.mark.slow
def test_optuna_searcher_includes_the_paper_point(
    base_config: Path, mlflow_uri: str, tmp_path: Path
) -> None:
    sweep, base_raw = load_sweep(_write_sweep(
        tmp_path / "optuna.yaml", base_config, searcher="optuna", num_samples=2, asha=None,
        max_concurrent_trials=1, overrides={"train.epochs": 1},
    ))
    result = run_sweep(sweep, base_raw)

    assert not result.interrupted
    trials = result.trials
    assert len(trials) == 2 and (trials["status"] == "ok").all()
    # Optuna's trial ids are hashes, not a sequence: tell the trials apart by their values.
    is_paper = (trials["model.attention_reg_weight"] == 1000.0) & (
        trials["model.taps"] == "pool4+conv5_3"
    )
    assert is_paper.sum() == 1 and trials.loc[is_paper, "model.fusion"].item() == "late"
    second = trials[~is_paper].iloc[0]
    # The other trial is Optuna's own sample, inside the space.
    assert 1.0 <= second["model.attention_reg_weight"] <= 10000.0
    assert 1e-6 <= second["train.weight_decay"] <= 1e-3
    assert second["model.fusion"] in {"early", "late"}
    assert second["model.taps"] in {"pool4", "conv5_3", "pool4+conv5_3", "conv4_3+pool4+conv5_3"}
    assert result.best is not None and result.best.model_version == "1"


def _finished_trials(experiment: Path) -> dict[str, dict[str, Any]]:
    """Trials whose state file says TERMINATED: trial id -> its last result."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except json.JSONDecodeError:  # caught mid-write
        return {}
    finished = {}
    for trial_json, _ in data.get("trial_data", []):
        trial = json.loads(trial_json)
        if trial.get("status") == "TERMINATED":
            finished[trial["trial_id"]] = trial
    return finished


def _result_lines(experiment: Path, trial_id: str) -> list[dict[str, Any]]:
    (result_file,) = experiment.glob(f"*{trial_id}*/result.json")
    return [json.loads(line) for line in result_file.read_text().splitlines() if line]


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(
    base_config: Path, mlflow_uri: str, tmp_path: Path
) -> None:
    import ray
    from mlflow.tracking import MlflowClient

    sweep_path = _write_sweep(
        # One trial at a time, so the second is still pending when the first finishes.
        tmp_path / "resumed.yaml", base_config, num_samples=2, asha=None,
        max_concurrent_trials=1, overrides={"train.epochs": 1},
    )
    experiment = tmp_path / "ray_tune" / "resumed"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_uri,
        # The CLI joins this session's cluster instead of starting a second one.
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
    }
    command = [sys.executable, "-m", "jlstm", "tune", "--config", str(sweep_path)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 150
    while not _finished_trials(experiment) and process.poll() is None:
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves its state and stops
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "--resume" in output

    finished = _finished_trials(experiment)
    assert len(finished) == 1
    before = {t: _result_lines(experiment, t) for t in finished}
    client = MlflowClient(mlflow_uri)
    (parent,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`jlstm.kind` = 'sweep' and attributes.run_name = 'resumed'",
    )
    assert parent.info.status == "KILLED"  # stopped by the user, taken up by --resume

    sweep, base_raw = load_sweep(sweep_path)
    result = run_sweep(sweep, base_raw, resume=True)

    assert not result.interrupted
    assert result.parent_run_id == parent.info.run_id
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    assert len(result.trials) == 2 and (result.trials["epoch"] == 1).all()
    for trial_id, lines in before.items():
        # Not rerun: no new result rows, and its Train run has no newer epoch either.
        assert _result_lines(experiment, trial_id) == lines
    children = client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
    )
    assert len(children) == 2
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss_total")]
        assert steps == [1], child.data.tags[TRIAL_TAG]
