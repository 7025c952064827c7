"""Inputs as a registry (`model.inputs`): a kind added by a test alone, models saved before
the registry load and dump unchanged, and the flow encoders."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_shards.clip_spec import ClipSpec
from data_shards.config import DataConfig
from data_shards.features import cache_encoders, cache_key
from model import JointAttentionNet, ModelConfig, VGG16Taps, build_model
from model.inputs import RANDOM_INIT_SEED, InputKind, input_kind, register, unregister
from model.inputs.flow import FlowVGG16, normalize_flow
from orchestration.config import validate_config

REPO = Path(__file__).resolve().parent.parent
# The last commit before inputs were a registry: its code saves the "old" models below.
BEFORE_REGISTRY = "01cc916"
SMALL = {"frame_size": 64, "clip_len": 4, "last_steps": 2, "map_size": 2, "channels": 8,
         "hidden_size": 16, "num_layers": 1, "supervision_hidden": 8}


def small(inputs: list[str], **overrides: Any) -> JointAttentionNet:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random VGG16's warning
        return build_model("late_fusion", 3, **SMALL, inputs=inputs, **overrides)


class MeanColour(nn.Module):
    """A toy encoder: each frame's colour means on a K x K grid, times a trained gain."""

    def __init__(self, name: str, map_size: int) -> None:
        super().__init__()
        self.name, self.map_size = name, map_size
        self.gain = nn.Parameter(torch.ones(3, 1, 1))

    def forward(self, frames: Tensor) -> dict[str, Tensor]:
        return {self.name: F.adaptive_avg_pool2d(frames * self.gain, self.map_size).relu()}


def build_mean_colour(names: Sequence[str], cfg: ModelConfig) -> MeanColour:
    return MeanColour(names[0], cfg.map_size)


@pytest.fixture
def toy_kind() -> Iterator[InputKind]:
    kind = register(InputKind("mean_colour", "frames", "colour_encoder", build_mean_colour,
                              channels=3, pools=0, trainable=True))
    yield kind
    unregister(kind.name)


def test_a_kind_registered_by_a_test_alone_is_a_trained_branch(toy_kind: InputKind) -> None:
    net = small(["pool4", "mean_colour"])
    assert list(net.branches) == ["pool4", "mean_colour"]
    assert net.branches["mean_colour"].adapter[0].in_channels == 3
    frames = torch.randn(2, 4, 3, 64, 64)
    out = net(frames)
    assert out.step_logits.shape == (2, 4, 3) and out.attention.shape[:2] == (2, 2)
    net.losses(out, torch.tensor([0, 2]))["total"].backward()
    assert net.colour_encoder.gain.grad is not None  # trained, by its kind
    assert all(p.grad is None for p in net.backbone.parameters())  # VGG16 stays frozen
    spec = ClipSpec.of(net.cfg)
    assert spec.taps == ("pool4",) and spec.trained == ("mean_colour",)
    assert net.cfg.model_dump()["inputs"] == ["pool4", "mean_colour"]


def test_an_unknown_input_names_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown input 'pool9'.*conv4_3.*flow.*pool4"):
        ModelConfig(num_classes=2, inputs=["pool4", "pool9"])
    with pytest.raises(ValueError, match="taps is the old name of inputs"):
        ModelConfig.model_validate({"num_classes": 2, "taps": ["pool4"], "inputs": ["pool4"]})


def test_a_trained_input_is_refused_with_the_feature_cache(tmp_path: Path) -> None:
    raw = {"model": {"inputs": ["pool4", "flow_cnn"]},
           "data": {"dataset": "ucf101", "root": str(tmp_path), "feature_cache": "c",
                    "use_feature_cache": True}}
    with pytest.raises(ValueError, match=r"\['flow_cnn'\] are trained.*use_feature_cache"):
        validate_config(raw)


_SAVE_OLD = """
import json, sys, warnings
import numpy as np, pyarrow as pa, torch
warnings.simplefilter("ignore")
from data_shards.clip_spec import ClipSpec
from data_shards.config import DataConfig
from data_shards.features import cache_key
from model import build_model
small = json.loads(sys.argv[2])
torch.manual_seed(0)
net = build_model("late_fusion", 3, **small, taps=["conv4_3", "conv5_3"], fusion="early")
torch.save(net.state_dict(), sys.argv[1] + "/state.pt")
with open(sys.argv[1] + "/model_config.json", "w") as f:
    f.write(json.dumps(net.cfg.model_dump(mode="json"), indent=2))
torch.manual_seed(1)
frames = torch.randn(2, 4, 3, 64, 64)
torch.save({"frames": frames, "logits": net.eval()(frames).step_logits}, sys.argv[1] + "/io.pt")
data = DataConfig(dataset="ucf101", root=".", feature_cache="c", use_feature_cache=True)
manifest = pa.table({"video_id": [1], "video_path": ["a/b.avi"], "size": [10],
                     "num_frames": [40], "subset": ["train"]})
with open(sys.argv[1] + "/cache_key.json", "w") as f:
    json.dump(cache_key(data, ClipSpec.of(net.cfg), manifest), f, sort_keys=True)
"""


@pytest.fixture(scope="module")
def saved_before(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model saved by the code of `BEFORE_REGISTRY` (its model/ and data_shards/ from git,
    run in a process of their own): state dict, model_config.json, its output on fixed
    frames, and the cache key of its taps."""
    out = tmp_path_factory.mktemp("before_registry")
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", BEFORE_REGISTRY],
                      capture_output=True).returncode:
        pytest.skip(f"not a git clone holding {BEFORE_REGISTRY}")
    code = out / "code"
    code.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE_REGISTRY, "model",
                              "data_shards"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
    subprocess.run([sys.executable, "-c", _SAVE_OLD, str(out), json.dumps(SMALL)],
                   env={"PYTHONPATH": str(code), "PATH": "/usr/bin:/bin"}, cwd=code,
                   check=True)
    return out


def test_a_model_saved_before_the_registry_loads_and_dumps_unchanged(
    saved_before: Path,
) -> None:
    old_json = (saved_before / "model_config.json").read_text()
    cfg = ModelConfig.model_validate(json.loads(old_json))
    assert cfg.inputs == ["conv4_3", "conv5_3"] and not cfg.reads_flow
    # Byte-identical: its model_config.json, as the registry writes it.
    assert json.dumps(cfg.model_dump(mode="json"), indent=2) == old_json
    net = JointAttentionNet(cfg)
    state = torch.load(saved_before / "state.pt", weights_only=True)
    assert sorted(net.state_dict()) == sorted(state)
    net.load_state_dict(state)  # strict: every key, every shape
    saved = torch.load(saved_before / "io.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(saved["frames"]).step_logits, saved["logits"])


def test_an_rgb_cache_key_is_unchanged(saved_before: Path) -> None:
    cfg = ModelConfig.model_validate_json((saved_before / "model_config.json").read_text())
    data = DataConfig(dataset="ucf101", root=".", feature_cache="c", use_feature_cache=True)
    manifest = pa.table({"video_id": [1], "video_path": ["a/b.avi"], "size": [10],
                         "num_frames": [40], "subset": ["train"]})
    old = json.loads((saved_before / "cache_key.json").read_text())
    assert cache_key(data, ClipSpec.of(cfg), manifest) == old


def test_flow_vgg16_is_initialized_across_modalities_from_the_rgb_network() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(RANDOM_INIT_SEED)
        rgb = VGG16Taps(["pool4"], 2, None)
        flow = FlowVGG16("flow", 2, None, in_channels=4)  # L = 2
    first_rgb, first_flow = rgb.features[0], flow.vgg.features[0]
    assert first_flow.weight.shape == (64, 4, 3, 3)
    mean = first_rgb.weight.mean(dim=1, keepdim=True)
    for channel in range(4):  # the RGB filters' mean, on every flow channel
        torch.testing.assert_close(first_flow.weight[:, channel : channel + 1], mean)
    torch.testing.assert_close(first_flow.bias, first_rgb.bias)
    rgb_layers, flow_layers = rgb.features.state_dict(), flow.vgg.features.state_dict()
    for key in rgb_layers:
        if not key.startswith("0."):  # every later layer is the RGB one
            torch.testing.assert_close(flow_layers[key], rgb_layers[key])
    # So a flow stack whose channels all equal one gray image gives the RGB conv's answer
    # on that image in each of its 3 channels, scaled by 4 / 3.
    gray = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(
        F.conv2d(gray.expand(1, 4, 16, 16), first_flow.weight, None, padding=1),
        F.conv2d(gray.expand(1, 3, 16, 16), first_rgb.weight, None, padding=1) * 4 / 3,
    )


def test_the_network_and_the_cache_hold_the_same_flow_vgg16_whatever_the_seed() -> None:
    net = small(["pool4", "flow"], backbone_weights=None)
    torch.manual_seed(123)  # the run's seed does not change the frozen flow network
    other = small(["flow"])
    cached = cache_encoders(ClipSpec.of(net.cfg))["flow_backbone"]
    for a, b in ((net.flow_backbone, cached), (other.flow_backbone, cached)):
        for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            torch.testing.assert_close(x, y, msg=key)
    assert not any(p.requires_grad for p in net.flow_backbone.parameters())


def test_a_flow_model_reads_frames_and_flow_and_trains_its_flow_cnn() -> None:
    net = small(["pool4", "flow", "flow_cnn"], flow={"stack": 2})
    frames = torch.randn(2, 4, 3, 64, 64)
    flow = normalize_flow(torch.randint(0, 256, (2, 4, 64, 64, 4), dtype=torch.uint8))
    out = net({"frames": frames, "optical_flow": flow})
    net.losses(out, torch.tensor([0, 1]))["total"].backward()
    assert net.flow_encoder.convs[0].weight.grad is not None
    assert net.flow_backbone.vgg.features[0].weight.grad is None
    with pytest.raises(ValueError, match="read 'optical_flow', which the batch does not"):
        net(frames)
    dumped = net.cfg.model_dump(mode="json")
    assert dumped["inputs"] == ["pool4", "flow", "flow_cnn"] and "taps" not in dumped
    assert dumped["flow"]["stack"] == 2
    assert ModelConfig.model_validate(dumped) == net.cfg


def test_a_flow_cache_key_names_the_flow_and_an_rgb_one_does_not() -> None:
    data = DataConfig(dataset="ucf101", root=".", feature_cache="c", use_feature_cache=True)
    manifest = pa.table({"video_id": [1], "video_path": ["a.avi"], "size": [1],
                         "num_frames": [9], "subset": ["train"]})
    rgb = ClipSpec.of(small(["pool4"]).cfg)
    flow = ClipSpec.of(small(["pool4", "flow"]).cfg)
    rgb_key, flow_key = cache_key(data, rgb, manifest), cache_key(data, flow, manifest)
    assert "flow" not in rgb_key and flow_key["taps"] == ["pool4", "flow"]
    assert flow_key["flow"] == flow.flow.model_dump(mode="json")
    assert flow_key["backbone_weights_digest"] != rgb_key["backbone_weights_digest"]
    other = ClipSpec.of(small(["pool4", "flow"], flow={"compensation": "none"}).cfg)
    assert cache_key(data, other, manifest)["flow"] != flow_key["flow"]
    assert input_kind("flow").side(64) == 4 and np.isclose(2**input_kind("pool5").pools, 32)


def test_a_flow_model_ships_with_opencv_and_an_rgb_one_without() -> None:
    """The pyfunc of a flow model computes its flow (`model.flow`): OpenCV joins its pinned
    requirements; an RGB model's stay as they were."""
    from orchestration.registry import _pip_requirements

    rgb = _pip_requirements(small(["pool4"]).cfg)
    flow = _pip_requirements(small(["pool4", "flow"]).cfg)
    assert not any(pin.startswith("opencv") for pin in rgb)
    pinned = version("opencv-python-headless")
    assert [pin for pin in flow if pin not in rgb] == [f"opencv-python-headless=={pinned}"]
