"""Evaluation metrics on a hand-built example, the per-class CSV, and the PNG plots."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pyarrow.csv as pacsv
import pytest
import torch

from orchestration import metrics, plots
from orchestration.evaluate import ClipPredictions, attention_on_target, evaluate, top_k_correct

CLASS_NAMES = ["a", "b", "c", "d"]  # "d" has no test videos at all


def hand_built() -> ClipPredictions:
    """Six clips of four videos, interleaved; comments give each clip's vote/prob verdict.

    v0 (a): three clips, the middle one wrong under both rules; the video average fixes it.
    v1 (b): one clip where vote says a (wrong) but prob says b (right).
    v2 (c): one clip right under both rules.
    v3 (c): one clip wrong under both rules (says b).
    """
    rows = [
        # video, label, vote scores, prob scores
        ("v0", 0, [0.75, 0.25, 0.0, 0.0], [0.6, 0.3, 0.1, 0.0]),  # right, right
        ("v1", 1, [0.5, 0.25, 0.25, 0.0], [0.3, 0.45, 0.25, 0.0]),  # wrong, right
        ("v0", 0, [0.0, 1.0, 0.0, 0.0], [0.4, 0.5, 0.1, 0.0]),  # wrong, wrong
        ("v2", 2, [0.0, 0.0, 1.0, 0.0], [0.1, 0.2, 0.7, 0.0]),  # right, right
        ("v0", 0, [1.0, 0.0, 0.0, 0.0], [0.7, 0.2, 0.1, 0.0]),  # right, right
        ("v3", 2, [0.0, 0.75, 0.25, 0.0], [0.1, 0.6, 0.3, 0.0]),  # wrong, wrong
    ]
    return ClipPredictions(
        video_id=np.array([r[0] for r in rows]),
        label=np.array([r[1] for r in rows]),
        scores_vote=np.array([r[2] for r in rows]),
        scores_prob=np.array([r[3] for r in rows]),
    )


EXPECTED = {
    "clip_top1_vote": 3 / 6,
    "clip_top1_prob": 4 / 6,
    # per class (a, b, c): vote 2/3, 0, 1/2; prob 2/3, 1, 1/2
    "clip_mean_class_vote": (2 / 3 + 0 + 1 / 2) / 3,
    "clip_mean_class_prob": (2 / 3 + 1 + 1 / 2) / 3,
    # videos: v0 right/right (fixed by averaging), v1 wrong/right, v2 right/right, v3 wrong/wrong
    "video_top1_vote": 2 / 4,
    "video_top1_prob": 3 / 4,
    "video_mean_class_vote": (1 + 0 + 1 / 2) / 3,
    "video_mean_class_prob": (1 + 1 + 1 / 2) / 3,
    # 4 classes: top-5 is top-4, always right
    "clip_top5_vote": 1.0,
    "clip_top5_prob": 1.0,
    "video_top5_vote": 1.0,
    "video_top5_prob": 1.0,
}


def test_metrics_on_hand_built_example() -> None:
    report = evaluate(hand_built(), CLASS_NAMES)
    assert report.metrics.keys() == EXPECTED.keys()
    for name, value in EXPECTED.items():
        assert report.metrics[name] == pytest.approx(value), name


def test_confusion_matrix_is_video_level_vote() -> None:
    report = evaluate(hand_built(), CLASS_NAMES)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0] = 1  # v0
    expected[1, 0] = 1  # v1: vote says a
    expected[2, 2] = 1  # v2
    expected[2, 1] = 1  # v3
    np.testing.assert_array_equal(report.confusion, expected)


def test_concat_of_parts_gives_the_same_metrics() -> None:
    whole = hand_built()
    parts = [
        ClipPredictions(
            whole.video_id[s], whole.label[s], whole.scores_vote[s], whole.scores_prob[s]
        )
        for s in (slice(0, 2), slice(2, 3), slice(3, 6))
    ]
    joined = ClipPredictions.concat(parts)
    assert evaluate(joined, CLASS_NAMES).metrics == evaluate(whole, CLASS_NAMES).metrics


def test_top_k_counts_ties_in_class_order() -> None:
    scores = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0, 0.0]])
    # row 0: label 5 is ranked last of 6, label 0 fifth
    assert top_k_correct(scores, np.array([5, 0]), 5).tolist() == [False, True]
    assert top_k_correct(scores[:1], np.array([0]), 5).tolist() == [True]
    # row 1: a tie goes to the lower class index, as argmax does
    assert top_k_correct(scores[1:], np.array([0]), 1).tolist() == [True]
    assert top_k_correct(scores[1:], np.array([1]), 1).tolist() == [False]


def test_refuses_inconsistent_input() -> None:
    preds = hand_built()
    with pytest.raises(ValueError, match="class names"):
        evaluate(preds, CLASS_NAMES[:3])
    mixed = ClipPredictions(
        preds.video_id, np.array([0, 1, 1, 2, 0, 2]), preds.scores_vote, preds.scores_prob
    )
    with pytest.raises(ValueError, match="different labels"):
        evaluate(mixed, CLASS_NAMES)
    with pytest.raises(ValueError, match="shape"):
        ClipPredictions(preds.video_id, preds.label[:3], preds.scores_vote, preds.scores_prob)


def test_write_per_class_csv_metrics_json_and_confusion_png(tmp_path) -> None:
    report = evaluate(hand_built(), CLASS_NAMES)
    paths = report.write(tmp_path / "eval")

    rows = pacsv.read_csv(paths["per_class_accuracy"]).to_pylist()
    assert [r["class_name"] for r in rows] == CLASS_NAMES
    assert rows[0] == {
        "class_name": "a",
        "label": 0,
        "videos": 1,
        "video_top1_vote": 1.0,
        "video_top1_prob": 1.0,
        "clips": 3,
        "clip_top1_vote": pytest.approx(2 / 3),
    }
    assert (rows[1]["video_top1_vote"], rows[1]["video_top1_prob"]) == (0.0, 1.0)
    assert (rows[2]["videos"], rows[2]["clips"], rows[2]["video_top1_vote"]) == (2, 2, 0.5)
    assert rows[3]["videos"] == 0 and rows[3]["video_top1_vote"] is None  # no data: empty

    assert json.loads(paths["metrics"].read_text()) == pytest.approx(report.metrics)

    image = mpimg.imread(paths["confusion_matrix"])
    side = round(plots.confusion_figsize(len(CLASS_NAMES)) * plots.DPI)
    assert image.shape[:2] == (side, side)


def test_loss_curves_png(tmp_path) -> None:
    history = [
        {
            "epoch": e,
            "loss_total": 2.0 / e,
            "loss_lstm": 1.5 / e,
            "loss_supervision": 0.4 / e,
            "loss_attention_reg": 0.1 / e,
            "val_video_top1_vote": 0.2 * e,
        }
        for e in range(1, 5)
    ]
    del history[1]["val_video_top1_vote"]  # metrics missing in some epochs are skipped
    path = plots.plot_loss_curves(
        history, metrics.PLOTTED_LOSSES, metrics.PLOTTED_ACCURACIES, tmp_path / "loss_curves.png"
    )
    image = mpimg.imread(path)
    width, height = plots.LOSS_FIGSIZE
    assert image.shape[:2] == (round(height * plots.DPI), round(width * plots.DPI))


def test_loss_curves_show_the_accuracies_a_user_reads() -> None:
    """Of a real epoch's 14 accuracy-like figures, the 4 of `PLOTTED_ACCURACIES`, each in
    a colour of its own (once 14 series under a legend that covered them)."""
    figures = [f"val_{scope}_{kind}_{mode}" for scope in ("clip", "video")
               for kind in ("top1", "top5", "mean_class") for mode in ("vote", "prob")]
    history = [
        {"epoch": e, "loss_total": 1.0 / e, "train_clip_top1": 0.1 * e, "lr": 0.01,
         **{name: 0.05 * e for name in figures}, "val_attention_on_target": 1.5}
        for e in range(1, 4)
    ]
    fig = plots.loss_curves_figure(history, metrics.PLOTTED_LOSSES, metrics.PLOTTED_ACCURACIES)
    loss_ax, acc_ax = fig.axes
    assert [line.get_label() for line in acc_ax.get_lines()] == list(metrics.PLOTTED_ACCURACIES)
    assert [line.get_label() for line in loss_ax.get_lines()] == ["loss_total"]
    colours = [line.get_color() for line in acc_ax.get_lines()]
    assert len(set(colours)) == len(colours)


def test_attention_overlay_grid_has_one_row_per_input(tmp_path) -> None:
    rng = np.random.default_rng(0)
    m, t, s, k = 3, 10, 16, 2
    frames = rng.integers(0, 256, size=(t, s, s, 3), dtype=np.uint8)
    attention = rng.dirichlet(np.ones(k * k), size=(m, t))
    path = plots.plot_attention_overlay(frames, attention, tmp_path / "att.png", "v0", 4)
    image = mpimg.imread(path)
    cell = plots.ATTENTION_CELL_INCHES
    expected_height = round((m * cell + plots.ATTENTION_TITLE_INCHES) * plots.DPI)
    assert image.shape[:2] == (expected_height, round(4 * cell * plots.DPI))
    np.testing.assert_array_equal(plots.frame_indices(t, 4), [0, 3, 6, 9])


def test_upsample_attention_matches_torch_bilinear() -> None:
    rng = np.random.default_rng(1)
    maps = rng.random((2, 3, 9))  # [M, T, K*K], K = 3
    ours = plots.upsample_attention(maps, 12)
    theirs = torch.nn.functional.interpolate(
        torch.from_numpy(maps).reshape(6, 1, 3, 3),
        size=(12, 12),
        mode="bilinear",
        align_corners=False,
    ).reshape(2, 3, 12, 12)
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-12)


def test_attention_on_target_is_one_for_uniform_and_grid_over_box_inside() -> None:
    k2, steps = 36, 4
    inside = np.zeros((2, steps, k2), dtype=bool)
    inside[0, :, [0, 1, 6, 7]] = True  # a 2 x 2 box
    inside[1, :, 14] = True  # a one-location box
    uniform = np.full((2, 1, steps, k2), 1 / k2)
    assert np.allclose(attention_on_target(uniform, inside), 1.0)
    # All of the attention spread over the box's locations: K*K / box locations.
    on_box = inside[:, None].astype(float) / inside.sum(-1, keepdims=True)[:, None]
    assert np.allclose(attention_on_target(on_box, inside), [[k2 / 4], [k2 / 1]])
    # Two branches, one looking away from the box: 0 for that branch.
    away = np.where(inside[:, None], 0.0, 1.0)
    away /= away.sum(-1, keepdims=True)
    both = np.concatenate([on_box, away], axis=1)
    assert np.allclose(attention_on_target(both, inside), [[k2 / 4, 0.0], [k2, 0.0]])
    # Half the steps on the box, half uniform: the mean over the steps.
    half = np.concatenate([on_box[:, :, :2], uniform[:, :, 2:]], axis=2)
    assert np.allclose(attention_on_target(half, inside)[:, 0], [(9 + 1) / 2, (36 + 1) / 2])
    with pytest.raises(ValueError, match="box is missing"):
        attention_on_target(uniform, np.zeros_like(inside))
