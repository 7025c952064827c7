"""`jlstm reproduce` / `jlstm report`: the paper's tables as data, the report's rows, config
inheritance (`base_config`), and the whole flow on synthetic HMDB51 (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jlstm.cli import main
from model.config import VARIANTS
from orchestration.config import load_config
from orchestration.errors import ConfigError
from tune_spaces.paper import METRIC, TABLES, RunKey, table_runs
from tune_spaces.paper_report import NOT_RUN, REFERENCE, RunFigure, report_rows, to_markdown
from tune_spaces.reproduce import PAPER_CONFIGS, check_overrides, run_config, select_runs

CONFIGS = PAPER_CONFIGS.parent


# --- the paper's tables -------------------------------------------------------------------

def _figure(table: int, label: str, dataset: str) -> float | None:
    (row,) = [r for r in TABLES[table].rows if r.label == label]
    return row.figures.get(dataset)


def test_paper_tables_agree_with_each_other() -> None:
    # Table 4's averages are Table 1's "our model" rows; its HMDB51 late fusion average is
    # Table 2's and its split 1 is Table 3's "3d-convnet with regularization".
    for fusion, label in (("early", "Early fusion joint LSTM (our model)"),
                          ("late", "Late fusion joint LSTM (our model)")):
        for dataset in ("ucf101", "hmdb51"):
            assert _figure(4, f"average, {fusion} fusion", dataset) == _figure(1, label, dataset)
            per_split = [_figure(4, f"split{s}, {fusion} fusion", dataset) for s in (1, 2, 3)]
            # The paper's averages are the splits' mean, rounded to 0.1.
            assert abs(sum(per_split) / 3 - _figure(4, f"average, {fusion} fusion",
                                                    dataset)) <= 0.051
    assert _figure(2, "Late fusion", "hmdb51") == 61.7
    assert _figure(3, "3d-convnet with regularization", "hmdb51") == 61.9 == _figure(
        4, "split1, late fusion", "hmdb51")
    assert _figure(1, "TDD+iDT [25]", "ucf101") == 91.5
    assert _figure(1, "Soft attention [14]", "ucf101") is None
    assert _figure(2, "pool4", "hmdb51") == 42.8 and _figure(2, "conv5_3", "hmdb51") == 45.5
    assert [_figure(3, label, "hmdb51") for label in (
        "straightly connect VGG16 to LSTM", "2d-convnet with regularization",
        "simple 3d-convnet")] == [57.3, 57.5, 59.4]


def test_every_table_row_is_a_variant_and_its_runs() -> None:
    used = {r.variant for t in TABLES.values() for r in t.rows if r.variant}
    assert used <= set(VARIANTS)
    assert set(VARIANTS) - used == {"soft_attention"}  # Table 1 cites Sharma et al.'s figure
    assert len(table_runs(TABLES[1])) == 2 * 2 * 3
    assert len(table_runs(TABLES[2])) == 3 * 3
    assert table_runs(TABLES[3]) == sorted(
        RunKey("hmdb51", 1, v) for v in ("vgg_lstm", "conv2d_reg", "conv3d_plain", "late_fusion")
    )
    # Table 4 on one dataset and two splits: its early and late fusion runs, each once.
    assert table_runs(TABLES[4], ("hmdb51",), (1, 2)) == [
        RunKey("hmdb51", s, v) for s in (1, 2) for v in ("early_fusion", "late_fusion")
    ]


# --- the report's rows --------------------------------------------------------------------

def test_report_rows_from_hand_made_figures() -> None:
    figures = [
        RunFigure("hmdb51", 1, "late_fusion", 0.60),
        RunFigure("hmdb51", 2, "late_fusion", 0.64),
        RunFigure("hmdb51", 2, "vgg_lstm", 0.99),  # Table 3 is split 1 only: not used there
    ]
    rows = {(r.table, r.label, r.dataset): r for r in report_rows(TABLES.values(), figures)}
    late = rows[(2, "Late fusion", "hmdb51")]
    assert late.ours == pytest.approx(62.0) and late.spread == pytest.approx(2.8284, abs=1e-3)
    assert late.difference == pytest.approx(62.0 - 61.7)
    assert (late.splits_run, late.splits_wanted) == ((1, 2), (1, 2, 3))
    assert late.cells()[3:] == ("62.0", "±2.8", "+0.3", "2/3")
    # The split-1 run is also Table 3's last row, alone (no spread).
    reg = rows[(3, "3d-convnet with regularization", "hmdb51")]
    assert (reg.ours, reg.spread, reg.splits_run) == (pytest.approx(60.0), None, (1,))
    assert rows[(3, "straightly connect VGG16 to LSTM", "hmdb51")].cells()[3] == NOT_RUN
    assert rows[(4, "split2, late fusion", "hmdb51")].ours == pytest.approx(64.0)
    assert rows[(4, "split3, late fusion", "hmdb51")].ours is None
    assert rows[(1, "Late fusion joint LSTM (our model)", "ucf101")].cells()[3:] == (
        NOT_RUN, "", "", "0/3")
    tdd = rows[(1, "TDD [25]", "ucf101")]
    assert tdd.reference and tdd.cells()[2:4] == ("90.3", REFERENCE)
    # A row without a paper figure for a dataset is not a report row.
    assert (1, "LRCN [2]", "hmdb51") not in rows
    markdown = to_markdown(list(rows.values()), TABLES.values())
    assert "### Table 3: Comparison of whether adopting 3d-convnet. (HMDB51 split 1)" in markdown
    assert "| Late fusion | hmdb51 | 61.7 | 62.0 | ±2.8 | +0.3 | 2/3 |" in markdown


# --- configs ------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["ucf101", "hmdb51"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_has_a_paper_config(dataset: str, variant: str) -> None:
    cfg = load_config(PAPER_CONFIGS / f"{dataset}_{variant}.yaml")
    model = cfg.resolve_model(51)
    assert (cfg.variant, cfg.data.dataset) == (variant, dataset)
    assert (model.frame_size, model.clip_len, model.hidden_size, model.num_layers) == (
        384, 30, 1024, 3)
    assert cfg.train.weight_decay == 1e-5 and cfg.train.batch_size == 64
    # lambda is the variant's: the dataset base must not override it.
    assert model.attention_reg_weight == (0.0 if variant == "conv3d_plain" else 1000.0)


@pytest.mark.parametrize("name", ["ucf101_late_fusion", "ucf101_early_fusion",
                                  "hmdb51_late_fusion", "hmdb51_early_fusion"])
def test_top_level_paper_configs_equal_the_paper_folders(name: str) -> None:
    assert load_config(CONFIGS / f"{name}.yaml") == load_config(PAPER_CONFIGS / f"{name}.yaml")


def test_base_config_chain_merges_and_the_child_wins(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text(yaml.safe_dump({
        "data": {"dataset": "ucf101", "root": "/videos", "train_stride": 4},
        "model": {"hidden_size": 64, "taps": ["pool4", "conv5_3"]},
    }))
    (tmp_path / "sub" / "mid.yaml").write_text(yaml.safe_dump({
        "base_config": "../root.yaml", "model": {"hidden_size": 32}, "train": {"epochs": 2},
    }))
    (tmp_path / "sub" / "leaf.yaml").write_text(yaml.safe_dump({
        "base_config": "mid.yaml", "variant": "conv3d_plain", "model": {"taps": ["pool4"]},
    }))
    cfg = load_config(tmp_path / "sub" / "leaf.yaml", ["train.epochs=3"])
    assert cfg.variant == "conv3d_plain"
    assert cfg.model == {"hidden_size": 32, "taps": ["pool4"]}  # a list is replaced whole
    assert (cfg.data.root, cfg.data.train_stride, cfg.train.epochs) == ("/videos", 4, 3)


def test_base_config_cycle_or_missing_base_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.yaml").write_text("base_config: b.yaml\nvariant: late_fusion\n")
    (tmp_path / "b.yaml").write_text("base_config: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base_config: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*nowhere\.yaml.*does not exist"):
        load_config(tmp_path / "c.yaml")
    assert main(["train", "--config", str(tmp_path / "a.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "base_config makes a cycle" in err and "a.yaml" in err


def test_run_config_fixes_split_cache_experiment_and_storage(tmp_path: Path) -> None:
    cfg = run_config(RunKey("hmdb51", 2, "conv3d_plain"), experiment="exp one",
                     overrides=["train.epochs=2", "data.root=videos"])
    assert cfg.resolved_run_name() == "hmdb51-split2-conv3d_plain"
    assert (cfg.data.split, cfg.train.epochs, cfg.tracking.experiment) == (2, 2, "exp one")
    assert cfg.data.root == str(Path("videos").resolve())
    assert cfg.data.feature_cache == "/data/cache/hmdb51_s384_k11/split2"
    assert cfg.cluster.storage_path == str(Path("runs/ray").resolve() / "reproduce" / "exp_one")
    assert cfg.resolve_model(51).attention_reg_weight == 0.0
    synthetic = run_config(RunKey("ucf101", 3, "vgg_lstm"), experiment="e", synthetic=True,
                           workdir=tmp_path)
    assert synthetic.data.root == str(tmp_path / "ucf101" / "data")
    assert synthetic.data.feature_cache == str(tmp_path / "ucf101" / "features" / "split3")
    with pytest.raises(ConfigError, match=r"data\.split"):
        check_overrides(["data.split=2"])


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--table", "2", "--datasets", "ucf101"], "no ucf101"),
        (["--table", "3", "--variants", "early_fusion"], "no early_fusion row"),
        (["--table", "3", "--splits", "2,3"], "--splits 2,3"),
        (["--table", "1", "--set", "variant=vgg_lstm"], "reproduce sets variant"),
        (["--table", "1", "--set", "data=x"], "not a whole section"),
        (["--table", "1", "--set", "model.fusion=sideways"], "model.fusion"),
    ],
)
def test_bad_reproduce_input_is_one_line_before_any_work(
    args: list[str], named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", *args]) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # neither MLflow nor Ray was started
    with pytest.raises(ConfigError):
        select_runs(3, splits=(2,))


# --- the whole flow -----------------------------------------------------------------------

TINY = [
    "model.clip_len=4", "model.last_steps=2", "model.map_size=2", "model.channels=8",
    "model.hidden_size=16", "model.supervision_hidden=8", "data.train_stride=4",
    "data.frame_interval=1", "train.epochs=1", "train.batch_size=4",
    "cluster.cpus_per_worker=0.49", "tracking.attention_examples=1",
]


@pytest.mark.slow
def test_reproduce_runs_each_missing_run_once_and_reports_it(
    ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow.tracking import MlflowClient

    from data_shards.synth import synthesize_dataset
    from tune_spaces.paper_report import build_report

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # runs/ray (Train and Tune storage) lands in tmp_path
    # Smaller than --synthetic's own videos: 2 classes x 6 (4 train, 1 test per split).
    synthesize_dataset(tmp_path / "work" / "hmdb51" / "data", layout="hmdb51", classes=2,
                       videos_per_class=6, frame_size=64, num_frames=16)
    command = ["reproduce", "--table", "4", "--datasets", "hmdb51", "--splits", "1,2",
               "--synthetic", "--workdir", str(tmp_path / "work"), "--experiment", "paper",
               *[arg for s in TINY for arg in ("--set", s)]]
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "4 runs scheduled (2 at once), 0 already finished" in out

    client = MlflowClient()
    experiment = client.get_experiment_by_name("paper").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`jlstm.kind` = 'reproduce'")
    children = client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.info.run_name for c in children) == [
        f"hmdb51-split{s}-{v}" for s in (1, 2) for v in ("early_fusion", "late_fusion")
    ]
    assert {c.info.status for c in children} == {"FINISHED"}
    for child in children:  # like a `jlstm train` run: epochs, evaluation, the model
        assert [m.step for m in client.get_metric_history(child.info.run_id, METRIC)] == [1]
        assert "jlstm.model_version" in child.data.tags
        assert {"evaluation", "plots", "config.yaml"} <= {
            a.path for a in client.list_artifacts(child.info.run_id)}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert artifacts == {"report/paper_tables.md", "report/paper_tables.png"}

    # The report's rows are those runs' figures, read back from MLflow.
    ours = {(c.data.tags["split"], c.data.tags["variant"]): 100 * c.data.metrics[METRIC]
            for c in children}
    rows = {(r.table, r.label, r.dataset): r for r in build_report("paper").rows}
    for split in ("1", "2"):
        for fusion in ("early", "late"):
            row = rows[(4, f"split{split}, {fusion} fusion", "hmdb51")]
            assert row.ours == pytest.approx(ours[(split, f"{fusion}_fusion")])
    average = rows[(4, "average, late fusion", "hmdb51")]
    assert average.ours == pytest.approx((ours[("1", "late_fusion")]
                                          + ours[("2", "late_fusion")]) / 2)
    assert average.splits_run == (1, 2)
    assert rows[(4, "split3, late fusion", "hmdb51")].ours is None
    assert rows[(4, "split1, late fusion", "ucf101")].ours is None
    # The split-1 late fusion run is also Table 3's row; its other variants were not run.
    assert rows[(3, "3d-convnet with regularization", "hmdb51")].ours == pytest.approx(
        ours[("1", "late_fusion")])
    assert rows[(3, "simple 3d-convnet", "hmdb51")].cells()[3] == NOT_RUN

    # A second call schedules nothing and changes no run.
    assert main(command) == 0
    assert "0 runs scheduled (0 at once), 4 already finished" in capsys.readouterr().out
    again = client.search_runs([experiment], "")
    assert len(again) == 5  # the 4 runs and the parent
    before = {c.info.run_id: (c.info.start_time, c.info.end_time) for c in children}
    after = {r.info.run_id: (r.info.start_time, r.info.end_time) for r in again
             if r.info.run_id != parent.info.run_id}
    assert after == before

    assert main(["report", "--experiment", "paper", "--table", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"| simple 3d-convnet | hmdb51 | 59.4 | {NOT_RUN} |  |  | 0/1 |" in printed
