"""The assembled network: shapes, attention, regularization, gradients, backbone, config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from pydantic import ValidationError

from model import (
    VARIANTS,
    JointAttentionNet,
    ModelConfig,
    VGG16Taps,
    build_model,
    clip_scores,
    model_config,
    normalize_frames,
)
from model.attention import SpatialPyramid, pyramid_masks
from model.branch import activity_map, attention_regularization

pytestmark = pytest.mark.filterwarnings("ignore:VGG16Taps. no backbone_weights")

# S=64 makes pool4 / conv5_3 4x4, so K=4 is the largest map.
SMALL: dict[str, Any] = {
    "frame_size": 64,
    "clip_len": 6,
    "last_steps": 4,
    "map_size": 4,
    "channels": 8,
    "hidden_size": 16,
    "num_layers": 2,
    "supervision_hidden": 8,
}
NUM_CLASSES = 5


def small_net(variant: str = "late_fusion", **overrides: Any) -> JointAttentionNet:
    torch.manual_seed(0)
    return build_model(variant, NUM_CLASSES, **{**SMALL, **overrides})


def random_frames(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, SMALL["clip_len"], 3, SMALL["frame_size"], SMALL["frame_size"])


def random_taps(net: JointAttentionNet, batch: int = 2) -> dict[str, torch.Tensor]:
    k = net.cfg.map_size
    return {tap: torch.rand(batch, net.cfg.clip_len, 512, k, k) for tap in net.cfg.taps}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_runs_with_the_documented_shapes(variant: str) -> None:
    net = small_net(variant)
    out = net(random_frames())
    cfg, steps, locations = net.cfg, SMALL["clip_len"], SMALL["map_size"] ** 2
    branches = len(cfg.taps)

    assert out.step_logits.shape == (2, steps, NUM_CLASSES)
    assert out.attention.shape == (2, branches, steps, locations)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(2, branches, steps))
    assert out.attention_reg.shape == (2,)
    if cfg.temporal == "none":
        assert out.branch_logits is None
        assert torch.equal(out.attention_reg, torch.zeros(2))
    else:
        assert out.branch_logits is not None
        assert out.branch_logits.shape == (2, branches, steps, NUM_CLASSES)
        assert (out.attention_reg > 0).all()
    losses = net.losses(out, torch.tensor([0, 3]))
    assert set(losses) == {"lstm", "supervision", "attention_reg", "total"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_variants_are_the_papers_tables() -> None:
    assert set(VARIANTS) == {
        "late_fusion",
        "early_fusion",
        "single_pool4",
        "single_conv5_3",
        "conv2d_reg",
        "conv3d_plain",
        "vgg_lstm",
        "soft_attention",
    }
    assert model_config("conv3d_plain", 2).attention_reg_weight == 0.0
    baseline = model_config("soft_attention", 2)
    assert (len(baseline.taps), baseline.temporal, baseline.joint_inputs, baseline.pyramid) == (
        1,
        "none",
        False,
        False,
    )
    assert isinstance(small_net("soft_attention").first_layer, torch.nn.LSTMCell)


def test_losses_combine_as_specified() -> None:
    net = small_net(attention_reg_weight=7.0, supervision_weight=0.5)
    out = net(random_frames())
    labels = torch.tensor([1, 4])
    losses = net.losses(out, labels)
    assert out.branch_logits is not None

    per_step = torch.nn.functional.cross_entropy(
        out.step_logits.reshape(-1, NUM_CLASSES), labels.repeat_interleave(SMALL["clip_len"])
    )
    supervision = sum(
        torch.nn.functional.cross_entropy(
            out.branch_logits[n, b], labels[n].repeat(SMALL["clip_len"]), reduction="sum"
        )
        for n in range(2)
        for b in range(2)
    )
    torch.testing.assert_close(losses["lstm"], per_step)
    torch.testing.assert_close(losses["supervision"], supervision / 2)
    torch.testing.assert_close(losses["attention_reg"], out.attention_reg.mean())
    expected_total = losses["lstm"] + 0.5 * (losses["supervision"] + 7.0 * losses["attention_reg"])
    torch.testing.assert_close(losses["total"], expected_total)


def test_pyramid_masks_share_the_middle_row_and_column_of_an_odd_map() -> None:
    masks = pyramid_masks(3, pyramid=True).view(5, 3, 3)
    assert torch.equal(masks[0], torch.ones(3, 3))
    top_left = torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 0]])
    assert torch.equal(masks[1], top_left)
    assert torch.equal(masks[4], top_left.flip(0, 1))  # bottom-right
    assert torch.equal(pyramid_masks(4, pyramid=True).view(5, 4, 4)[1].sum(), torch.tensor(4.0))
    assert pyramid_masks(3, pyramid=False).shape == (1, 9)


def test_pyramid_renormalizes_attention_inside_each_part() -> None:
    torch.manual_seed(0)
    k, channels = 3, 4
    attention = torch.rand(1, 1, k * k).softmax(-1)
    maps = torch.rand(1, 1, k * k, channels)
    pooled = SpatialPyramid(k, pyramid=True)(attention, maps).view(5, channels)

    att, y = attention.view(k, k), maps.view(k, k, channels)
    parts = [
        (range(3), range(3)),
        (range(2), range(2)),
        (range(2), range(1, 3)),
        (range(1, 3), range(2)),
        (range(1, 3), range(1, 3)),
    ]
    for p, (rows, cols) in enumerate(parts):
        weighted = sum(att[r, c] * y[r, c] for r in rows for c in cols)
        mass = sum(att[r, c] for r in rows for c in cols)
        torch.testing.assert_close(pooled[p], weighted / mass)
    # Without the pyramid only the full map remains.
    full = SpatialPyramid(k, pyramid=False)(attention, maps).view(channels)
    torch.testing.assert_close(full, pooled[0])


def test_regularization_is_zero_exactly_when_attention_matches_the_activity_map() -> None:
    torch.manual_seed(0)
    maps = torch.rand(2, 6, 8, 4, 4)  # [B, T, C, K, K]
    target = activity_map(maps)
    torch.testing.assert_close(target.sum(-1), torch.ones(2, 6))

    reg = attention_regularization(maps, target, "conv")
    assert torch.allclose(reg, torch.zeros(2), atol=1e-12)
    other = torch.rand(2, 6, 16).softmax(-1)
    expected = (target - other).pow(2).sum(dim=(1, 2))
    reg = attention_regularization(maps, other, "conv")
    assert (reg > 0).all()
    torch.testing.assert_close(reg, expected)


@pytest.mark.parametrize("grad", ["conv", "attention", "conv_and_attention"])
def test_regularization_trains_the_side_it_is_asked_to(grad: str) -> None:
    net = small_net(conv3d_grad_from_lstm=False, attention_reg_grad=grad)
    out = net.forward_taps(random_taps(net))
    out.attention_reg.sum().backward()
    conv = net.branches["pool4"].temporal.convs[0].weight.grad
    attention = net.attention.logits.weight.grad
    trained = {
        "conv": conv is not None and bool(conv.abs().sum() > 0),
        "attention": attention is not None and bool(attention.abs().sum() > 0),
    }
    assert trained == {"conv": grad != "attention", "attention": grad != "conv"}


def _same_weights_other_fusion(net: JointAttentionNet) -> JointAttentionNet:
    other = JointAttentionNet(net.cfg.model_copy(update={"fusion": "early"}))
    other.load_state_dict(net.state_dict())
    return other.eval()


def test_early_and_late_fusion_differ_unless_input_subgates_are_one() -> None:
    late = small_net(fusion="late").eval()
    early = _same_weights_other_fusion(late)
    taps = random_taps(late)
    with torch.no_grad():
        differ = late.forward_taps(taps).step_logits - early.forward_taps(taps).step_logits
        assert differ.abs().max() > 1e-4

        def ones(_module: torch.nn.Module, _inputs: object, out: torch.Tensor) -> torch.Tensor:
            return torch.ones_like(out)

        for net in (late, early):
            net.first_layer.input_subgate.register_forward_hook(ones)
        torch.testing.assert_close(
            late.forward_taps(taps).step_logits, early.forward_taps(taps).step_logits
        )


def test_frozen_backbone_gets_no_gradient_and_no_optimizer_slot() -> None:
    net = small_net(backbone="frozen")
    net.train()
    assert not net.backbone.training and net.branches.training
    assert all(not p.requires_grad for p in net.backbone.parameters())

    net.losses(net(random_frames()), torch.tensor([0, 1]))["total"].backward()
    assert all(p.grad is None for p in net.backbone.parameters())

    grouped = {id(p) for group in net.parameter_groups(1e-5) for p in group["params"]}
    assert grouped.isdisjoint(id(p) for p in net.backbone.parameters())
    trainable = {id(p) for n, p in net.named_parameters() if not n.startswith("backbone.")}
    assert grouped == trainable


def test_finetuned_backbone_is_trained() -> None:
    net = small_net(backbone="finetune", taps=["pool4"])
    net.losses(net(random_frames()), torch.tensor([0, 1]))["total"].backward()
    first_conv = net.backbone.features[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    groups = net.parameter_groups(1e-5)
    assert any(p is first_conv for group in groups for p in group["params"])
    assert groups[0]["weight_decay"] == 1e-5 and groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("grad_from_lstm", [True, False])
def test_lstm_loss_reaches_the_3d_convnet_only_when_allowed(grad_from_lstm: bool) -> None:
    net = small_net(conv3d_grad_from_lstm=grad_from_lstm)
    out = net.forward_taps(random_taps(net))
    convs = [p for branch in net.branches.values() for p in branch.temporal.parameters()]
    grads = torch.autograd.grad(
        net.losses(out, torch.tensor([0, 1]))["lstm"], convs, allow_unused=True
    )
    reached = any(g is not None and g.abs().sum() > 0 for g in grads)
    assert reached == grad_from_lstm


def test_forward_is_forward_taps_of_extracted_taps_even_from_fp16() -> None:
    net = small_net().eval()
    frames = random_frames()
    with torch.no_grad():
        taps = net.extract_taps(frames)
        assert taps["pool4"].shape == (2, SMALL["clip_len"], 512, 4, 4)
        direct = net(frames).step_logits
        torch.testing.assert_close(net.forward_taps(taps).step_logits, direct)
        cached = net.forward_taps({k: v.half() for k, v in taps.items()}).step_logits
    assert cached.dtype == torch.float32
    torch.testing.assert_close(cached, direct, atol=1e-2, rtol=1e-2)


def test_a_saved_config_rebuilds_the_same_network() -> None:
    net = small_net("early_fusion", init_state="zeros").eval()
    dumped = net.cfg.model_dump(mode="json")
    rebuilt = JointAttentionNet(ModelConfig.model_validate(dumped)).eval()
    rebuilt.load_state_dict(net.state_dict())
    taps = random_taps(net)
    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt.forward_taps(taps).step_logits, net.forward_taps(taps).step_logits
        )


def _save_torchvision_vgg16(path: Path, prefix: bool = True) -> torchvision.models.VGG:
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16().eval()
    state = vgg.state_dict() if prefix else vgg.features.state_dict()
    torch.save(state, path)
    return vgg


def test_torchvision_vgg16_weights_load_and_taps_match_its_features(tmp_path: Path) -> None:
    path = tmp_path / "vgg16.pth"
    vgg = _save_torchvision_vgg16(path)
    all_taps = ["conv4_3", "pool4", "conv5_3", "pool5"]
    backbone = VGG16Taps(all_taps, map_size=1, weights=path)
    frames = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        raw = backbone.raw_taps(frames)
        # Conv taps are read after their ReLU.
        for tap, end in {"conv4_3": 23, "pool4": 24, "conv5_3": 30, "pool5": 31}.items():
            torch.testing.assert_close(raw[tap], vgg.features[:end](frames))
        pooled = backbone(frames)
    assert pooled["conv4_3"].shape == (2, 512, 1, 1)
    torch.testing.assert_close(pooled["conv4_3"], raw["conv4_3"].mean(dim=(-2, -1), keepdim=True))


def test_backbone_stops_at_the_deepest_tap_and_digests_its_weights(tmp_path: Path) -> None:
    path = tmp_path / "features.pth"
    _save_torchvision_vgg16(path, prefix=False)  # keys without the "features." prefix
    loaded = VGG16Taps(["pool4"], map_size=2, weights=path)
    assert len(loaded.features) == 24
    with pytest.warns(UserWarning, match="RANDOMLY INITIALIZED"):
        random = VGG16Taps(["pool4"], map_size=2)
    assert loaded.weights_digest() == VGG16Taps(["pool4"], 2, weights=path).weights_digest()
    assert loaded.weights_digest() != random.weights_digest()


def test_backbone_refuses_a_state_dict_that_is_not_vgg16(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match=r"missing keys \['0.bias'"):
        VGG16Taps(["conv4_3"], map_size=2, weights=path)


def test_normalize_frames_is_channels_first_imagenet_normalized() -> None:
    frames = torch.zeros(1, 2, 4, 4, 3, dtype=torch.uint8)
    frames[..., 0] = 255
    out = normalize_frames(frames)
    assert out.shape == (1, 2, 3, 4, 4) and out.dtype == torch.float32
    expected = torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    torch.testing.assert_close(out[0, 0, :, 0, 0], expected)
    with pytest.raises(ValueError, match="uint8"):
        normalize_frames(frames.float())


def test_clip_scores_vote_and_prob_on_a_hand_built_clip() -> None:
    # Steps 2..4 (the last three) predict classes 1, 1, 0; step 1 is outside L2.
    step_logits = torch.tensor(
        [[[0.0, 0.0, 9.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [6.0, 0.0, 0.0]]]
    )
    vote = clip_scores(step_logits, last_steps=3, mode="vote")
    torch.testing.assert_close(vote, torch.tensor([[1 / 3, 2 / 3, 0.0]]))
    prob = clip_scores(step_logits, last_steps=3, mode="prob")
    torch.testing.assert_close(prob, step_logits[:, 1:].softmax(-1).mean(1))
    torch.testing.assert_close(prob.sum(-1), torch.ones(1))
    # The two rules disagree here: one confident step outweighs two lukewarm votes.
    assert vote.argmax().item() == 1 and prob.argmax().item() == 0
    with pytest.raises(ValueError, match="last_steps"):
        clip_scores(step_logits, last_steps=5, mode="vote")


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"colour": "red"}, "colour"),
        ({"fusion": "middle"}, "fusion"),
        ({"temporal": "lstm"}, "temporal"),
        ({"taps": ["pool3"]}, "taps"),
        ({"taps": []}, "taps"),
        ({"taps": ["pool4", "pool4"]}, "taps"),
        ({"attention_reg_weight": -1.0}, "attention_reg_weight"),
        ({"num_classes": 1}, "num_classes"),
        ({"last_steps": 31}, "last_steps"),
        ({"map_size": 25}, "map_size"),
    ],
)
def test_model_config_refuses_bad_values_naming_the_key(
    overrides: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValidationError, match=named):
        ModelConfig.model_validate({"num_classes": 3, **overrides})


def test_map_size_refusal_names_frame_size_and_the_tap() -> None:
    with pytest.raises(ValidationError) as err:
        ModelConfig(num_classes=3, frame_size=64, taps=["conv4_3", "pool5"], map_size=3)
    message = str(err.value)
    assert "frame_size = 64" in message and "map_size = 3" in message and "'pool5'" in message
    assert ModelConfig(num_classes=3, frame_size=64, taps=["conv4_3"], map_size=8).map_size == 8


def test_unknown_variant_lists_the_allowed_names() -> None:
    with pytest.raises(ValueError, match=r"late_fusion.*vgg_lstm"):
        build_model("resnet", NUM_CLASSES)


def test_overfits_eight_random_clips() -> None:
    """Eight clips of random taps (what the frozen-backbone cache feeds ``forward_taps``).

    Random taps rather than a random-init VGG16 of noise frames: that backbone maps every
    noise clip to nearly the same taps (spread across clips ~1/8 of that across
    locations), which leaves nothing to fit.
    """
    net = small_net(channels=16, hidden_size=32)
    labels = torch.arange(8) % 4
    taps = random_taps(net, batch=8)
    optimizer = torch.optim.Adam(net.parameter_groups(0.0), lr=3e-3)
    net.train()
    first = last = float("nan")
    for step in range(400):
        losses = net.losses(net.forward_taps(taps), labels)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        last = losses["lstm"].item()
        first = last if step == 0 else first
        if last < first / 10:
            break
    assert last < first / 10, (first, last)


def test_forward_accepts_cached_taps_dict() -> None:
    net = build_model(
        "late_fusion", num_classes=3, frame_size=64, clip_len=4, last_steps=2, map_size=2,
        channels=8, hidden_size=8, num_layers=1, supervision_hidden=8,
    ).eval()
    frames = torch.randn(2, 4, 3, 64, 64)
    with torch.no_grad():
        from_taps = net({k: v.half() for k, v in net.extract_taps(frames).items()})
        from_frames = net(frames)
    torch.testing.assert_close(from_taps.step_logits, from_frames.step_logits, atol=1e-2, rtol=0)


def test_center_taps_keeps_only_what_changes_over_time() -> None:
    net = build_model(
        "late_fusion", num_classes=3, frame_size=64, clip_len=4, last_steps=2, map_size=2,
        channels=8, hidden_size=8, num_layers=1, supervision_hidden=8, center_taps=True,
    ).eval()
    static_a = torch.randn(1, 1, 512, 2, 2).expand(1, 4, 512, 2, 2)
    static_b = torch.randn(1, 1, 512, 2, 2).expand(1, 4, 512, 2, 2)
    moving = static_a + torch.randn(1, 4, 512, 2, 2)
    with torch.no_grad():
        out_a, out_b, out_moving = (
            net.forward_taps({"pool4": x, "conv5_3": x}).step_logits
            for x in (static_a, static_b, moving)
        )
    torch.testing.assert_close(out_a, out_b)
    assert not torch.allclose(out_a, out_moving)


def test_regularization_of_the_input_maps_trains_the_adapter_not_the_temporal_convnet() -> None:
    net = small_net(conv3d_grad_from_lstm=False, attention_reg_maps="input")
    out = net.forward_taps(random_taps(net))
    out.attention_reg.sum().backward()
    branch = net.branches["pool4"]
    assert branch.adapter[0].weight.grad is not None
    assert branch.adapter[0].weight.grad.abs().sum() > 0
    assert branch.temporal.convs[0].weight.grad is None
