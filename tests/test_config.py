"""Config refusals: a bad key or value is refused before any work, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jlstm.cli import main
from orchestration.config import load_config, validate_config
from orchestration.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("tune_"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_run_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.resolve_model(num_classes=101).num_classes == 101


def test_paper_settings() -> None:
    cfg = load_config(CONFIGS / "ucf101_late_fusion.yaml")
    m = cfg.resolve_model(num_classes=101)
    assert (m.frame_size, m.clip_len, m.last_steps, m.hidden_size, m.num_layers) == (
        384, 30, 16, 1024, 3)
    assert m.attention_reg_weight == 1000 and cfg.train.weight_decay == 1e-5
    assert cfg.train.batch_size == 64 and m.fusion == "late"
    assert load_config(CONFIGS / "hmdb51_early_fusion.yaml").resolve_model(51).fusion == "early"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.learning_rate=0.1", "train.learning_rate"),
        ("model.fusion=middle", "fusion"),
        ("model.attention_reg_weight=-1", "attention_reg_weight"),
        ("data.split=4", "data.split"),
        ("train.lr=-0.5", "train.lr"),
        ("variant=resnet", "variant"),
        ("cluster.num_workers=0", "cluster.num_workers"),
    ],
)
def test_bad_key_or_value_is_refused_naming_it(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", [override])
    message = str(err.value)
    assert named in message
    assert "demo.yaml" in message


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load_config(
        CONFIGS / "demo.yaml",
        ["train.epochs=3", "model.taps=[conv5_3]", "cluster.cpus_per_worker=0.5"],
    )
    assert cfg.train.epochs == 3
    assert cfg.resolve_model(4).taps == ["conv5_3"]
    assert cfg.cluster.cpus_per_worker == 0.5


def test_cli_refuses_bad_config_before_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    raw["model"]["fusion"] = "sideways"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "model.fusion" in err and "sideways" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "path", sorted(CONFIGS.glob("tune_*.yaml")), ids=lambda p: p.name
)
def test_shipped_sweep_configs_validate(path: Path) -> None:
    from tune_spaces.spaces import load_sweep

    sweep, base = load_sweep(path)
    assert "model.attention_reg_weight" in sweep.space  # every shipped sweep varies lambda
    assert validate_config(base, source=str(path)).variant


def test_inputs_and_their_old_name_taps_replace_each_other(tmp_path: Path) -> None:
    """`model.taps` is the old name of `model.inputs`: a config over its base, or a --set,
    that names either replaces the other; one mapping naming both is refused."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"taps": ["conv5_3"], "channels": 8},
                                    "data": {"dataset": "ucf101", "root": str(tmp_path)}}))
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"base_config": "base.yaml",
                                     "model": {"inputs": ["pool4", "flow"]}}))
    cfg = load_config(child)
    assert cfg.model == {"channels": 8, "inputs": ["pool4", "flow"]}
    assert cfg.resolve_model(2).inputs == ["pool4", "flow"]
    back = load_config(child, ["model.taps=[pool5]"])
    assert back.resolve_model(2).inputs == ["pool5"] and "inputs" not in back.model
    assert load_config(base, ["model.inputs=[flow]"]).resolve_model(2).reads_flow
    both = {"model": {"taps": ["pool4"], "inputs": ["pool4"]},
            "data": {"dataset": "ucf101", "root": str(tmp_path)}}
    with pytest.raises(ValueError, match="taps is the old name of inputs"):
        validate_config(both)
