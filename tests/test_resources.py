"""The resource planner and `jlstm plan`: node shapes in, placements and epoch sizes out.

Pure computation on named node shapes (no Ray); the placement on a live multi-node
cluster is in test_multinode.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_shards.clips import clip_starts, needed_frames
from data_shards.config import DataConfig
from data_shards.sizing import FLOW_PAIRS_PER_CPU_S_224, data_size
from jlstm.cli import main
from orchestration.config import ClusterConfig, load_config
from orchestration.errors import ConfigError
from orchestration.resources import (
    GPU_WORKER_CPUS,
    NodeShape,
    describe_nodes,
    feature_pool,
    parse_nodes,
    plan_resources,
)

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "configs" / "ucf101_late_fusion.yaml"
SPLITS = REPO / "tests" / "fixtures" / "ucfTrainTestlist"


def _plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    code = main(["plan", "--config", str(PAPER), "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def test_paper_config_fits_the_rayjob_shape_one_gpu_worker_per_node(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, plan = _plan_json(capsys, "--nodes", "1x8", "4x8:1")
    assert code == 0 and plan["fits"] and plan["reason"] == ""
    workers = plan["workers"]
    assert len(workers) == 4 and all(w["GPU"] == 1.0 for w in workers)
    assert len({w["node"] for w in workers}) == 4 and 0 not in {w["node"] for w in workers}
    assert plan["data_cpus"] >= 24 and plan["data_cpus"] == 40 - 4 * GPU_WORKER_CPUS
    # One training clip moves T x taps x 512 x K x K fp16 values from the cache.
    assert plan["bytes_per_clip"] == 30 * 2 * 512 * 11 * 11 * 2
    # No manifest and no split files under /data/UCF-101: sizes unknown, said so.
    assert plan["clips_per_epoch"] is None and plan["cache_bytes"] is None
    assert plan["data_source"].startswith("none:")


def test_paper_config_fits_the_launcher_shape(capsys: pytest.CaptureFixture[str]) -> None:
    # deploy/ray-cluster.yaml: an m6i.4xlarge head (16 vCPU), up to 4 g5.2xlarge (8 vCPU,
    # 1 A10G) GPU workers.
    code, plan = _plan_json(capsys, "--nodes", "1x16", "4x8:1")
    assert code == 0 and len({w["node"] for w in plan["workers"]}) == 4


def test_too_few_gpus_is_refused_naming_the_shape(capsys: pytest.CaptureFixture[str]) -> None:
    code, plan = _plan_json(capsys, "--nodes", "1x8", "2x8:1", "--set", "cluster.num_workers=4")
    assert code == 2 and not plan["fits"] and plan["workers"] == []
    assert "1x8, 2x8:1" in plan["reason"] and "need 4 GPUs" in plan["reason"]
    assert "have 2" in plan["reason"]
    # Without --json: the same verdict as a line a person reads.
    assert main(["plan", "--config", str(PAPER), "--nodes", "1x8", "2x8:1",
                 "--set", "cluster.num_workers=4"]) == 2
    assert "does not fit: cluster.num_workers = 4" in capsys.readouterr().out


def test_a_bundle_larger_than_any_node_is_refused() -> None:
    cluster = ClusterConfig(num_workers=2, use_gpu=True, cpus_per_worker=12)
    plan = plan_resources(cluster, 1.0, parse_nodes(["1x8", "4x8:1"]))
    assert not plan.fits
    assert "12 CPU + 1 GPU" in plan.reason and "fits no single node (1x8, 4x8:1)" in plan.reason


def test_cpu_cluster_keeps_a_whole_cpu_for_ray_data() -> None:
    # Today's single-machine behaviour: 2 CPUs, 2 workers -> 0.5 each, 1 left to Ray Data.
    plan = plan_resources(ClusterConfig(num_workers=2), 0.5, [NodeShape(2)])
    assert plan.fits and plan.cpus_per_worker == 0.5 and plan.data_cpus == 1.0
    # A head with no CPUs and three 3-CPU nodes: a worker cannot span nodes, so each gets 3
    # (not (9 - 1) / 2 = 4) and a whole node is left to Ray Data.
    nodes = [NodeShape(0), NodeShape(3), NodeShape(3), NodeShape(3)]
    plan = plan_resources(ClusterConfig(num_workers=2), 0.5, nodes)
    assert plan.cpus_per_worker == 3.0 and [w.node for w in plan.workers] == [1, 2]
    assert plan.data_cpus == 3.0
    # Nothing left for Ray Data's whole CPU: refused, with the numbers.
    plan = plan_resources(ClusterConfig(num_workers=2, cpus_per_worker=1), 0.5, [NodeShape(2)])
    assert not plan.fits and "1 whole CPU on one node" in plan.reason


def test_node_shapes_parse_and_print_back() -> None:
    nodes = parse_nodes(["1x8", "4x8:1", "2x0.5"])
    assert [(n.cpus, n.gpus) for n in nodes] == [(8, 0), *[(8, 1)] * 4, (0.5, 0), (0.5, 0)]
    assert describe_nodes(nodes) == "1x8, 4x8:1, 2x0.5"
    with pytest.raises(ConfigError, match="'4x8:gpu': expected COUNTxCPU"):
        parse_nodes(["4x8:gpu"])


def test_bad_node_shape_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--config", str(PAPER), "--nodes", "eight"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--nodes 'eight'" in err


def test_a_cluster_of_another_python_is_one_line_and_exit_6(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A running `ray start` cluster of another Python or Ray (seen in CI: a Python 3.12
    cluster left on the machine) refuses the join with a multi-line RuntimeError; jlstm
    names the way out in one line. ray.init stands in for that cluster here: making one
    would take a second Python with Ray installed."""
    import ray

    def mismatch(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Version mismatch: The cluster was started with:\n    Ray: 2.60.0\n"
                           "    Python: 3.12.1\nThis process ... was started with: ...")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "init", mismatch)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # an earlier test's Ray
    assert main(["plan", "--config", str(PAPER)]) == 6
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "running Ray cluster of this machine" in err and "RAY_ADDRESS=local" in err


def test_feature_pool_uses_each_gpu_or_each_cpu() -> None:
    assert feature_pool(parse_nodes(["1x8", "4x8:1"])) == {"actors": 4, "use_gpu": True}
    assert feature_pool(parse_nodes(["1x0", "2x5"])) == {"actors": 10, "use_gpu": False}
    assert feature_pool([NodeShape(1)]) == {"actors": 1, "use_gpu": False}


def test_epoch_size_estimated_from_the_real_ucf101_split_files() -> None:
    cfg = load_config(PAPER, [f"data.splits_dir={SPLITS}"])
    size = data_size(cfg.data, cfg.clip_spec(101))
    # UCF101 split 1 lists 9,537 training and 3,783 test videos.
    assert (size.train_videos, size.test_videos) == (9537, 3783)
    assert size.source.startswith("split files (estimate")
    per_video = len(clip_starts(180, 30, 15))  # 180 frames, T = 30, stride 15
    assert size.train_clips == 9537 * per_video
    assert size.cache_bytes is not None and 400 * 2**30 < size.cache_bytes < 700 * 2**30


def test_epoch_size_from_a_manifest_is_exact(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.parquet"
    frames = [40, 17, 100, 33]
    pq.write_table(pa.table({
        "num_frames": frames, "subset": ["train", "train", "test", "test"],
    }), manifest)
    data_cfg = DataConfig(dataset="folder", root=str(tmp_path), manifest=str(manifest),
                          train_stride=4, use_feature_cache=True, feature_cache=str(tmp_path))
    cfg = load_config(REPO / "configs" / "demo.yaml")
    clip_spec = cfg.clip_spec(2)
    size = data_size(data_cfg, clip_spec)
    assert size.source == "manifest"
    assert size.train_clips == sum(len(clip_starts(n, clip_spec.clip_len, 4)) for n in frames[:2])
    frames_cached = sum(len(needed_frames(n, clip_spec.clip_len, 4)) for n in frames[:2]) + sum(
        len(needed_frames(n, clip_spec.clip_len, clip_spec.clip_len)) for n in frames[2:]
    )
    per_frame = len(clip_spec.taps) * 512 * clip_spec.map_size**2 * 2
    assert size.cache_bytes == frames_cached * per_frame


def test_plan_says_what_flow_costs_at_ucf101_scale(capsys: pytest.CaptureFixture[str]) -> None:
    """The flow config's plan: its cache holds a third input (the flow VGG16's), and the
    flow is made once, by the cache build: a pair per cached frame, in CPU hours at the
    config's frame size; the RGB config's plan has no flow line."""
    flow_config = REPO / "configs" / "ucf101_late_fusion_flow.yaml"
    splits = ["--nodes", "4x8:1", "--set", f"data.splits_dir={SPLITS}"]
    assert main(["plan", "--config", str(PAPER), "--json", *splits]) == 0
    rgb = json.loads(capsys.readouterr().out)
    assert main(["plan", "--config", str(flow_config), "--json", *splits]) == 0
    flow = json.loads(capsys.readouterr().out)
    assert rgb["flow_pairs"] is None and flow["cache_bytes"] == rgb["cache_bytes"] * 3 // 2
    frames_cached = rgb["cache_bytes"] // (2 * 512 * 11 * 11 * 2)  # 2 taps, float16
    assert flow["flow_pairs"] == frames_cached and "building the feature cache" in flow["flow_when"]
    rate = FLOW_PAIRS_PER_CPU_S_224["medium"] * (224 / 384) ** 2  # the default preset
    assert flow["flow_cpu_hours"] == pytest.approx(frames_cached / rate / 3600)
    assert main(["plan", "--config", str(flow_config), *splits]) == 0
    assert "optical flow: " in capsys.readouterr().out
    # Decoded every epoch instead (no cache): each clip's T + L - 1 pairs, every epoch.
    assert main(["plan", "--config", str(flow_config), "--json", *splits,
                 "--set", "data.use_feature_cache=false"]) == 0
    decoded = json.loads(capsys.readouterr().out)
    clips = decoded["clips_per_epoch"] + decoded["test_clips"]
    assert decoded["flow_pairs"] == clips * (30 + 5 - 1) and "every epoch" in decoded["flow_when"]


def test_an_elastic_run_starts_at_min_workers_where_num_workers_do_not_fit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    elastic = ["--nodes", "1x8", "2x8:1", "--set", "cluster.num_workers=4",
               "--set", "cluster.min_workers=2"]
    code, plan = _plan_json(capsys, *elastic)
    assert code == 0 and plan["fits"]
    assert (plan["num_workers"], plan["min_workers"], plan["max_workers"]) == (2, 2, 4)
    assert len({w["node"] for w in plan["workers"]}) == 2
    assert plan["at_min_workers"]["fits"] and not plan["at_num_workers"]["fits"]
    assert "need 4 GPUs" in plan["at_num_workers"]["reason"]
    # The paper's global batch of 64 at the starting size, and the same steps at any size.
    assert plan["global_batch"] == 64 and plan["rank_batch_sizes"] == [32, 32]
    assert main(["plan", "--config", str(PAPER), *elastic]) == 0
    out = capsys.readouterr().out
    assert "elastic: 2 to 4 workers; starts with 2" in out
    assert "at cluster.num_workers = 4: not on these nodes" in out


def test_an_elastic_run_takes_every_worker_that_fits_up_to_num_workers() -> None:
    cluster = ClusterConfig(num_workers=4, min_workers=2, use_gpu=True)
    plan = plan_resources(cluster, 1.0, parse_nodes(["1x8", "3x8:1"]))
    assert plan.fits and plan.num_workers == 3 and plan.scaling_workers() == (2, 4)
    plan = plan_resources(cluster, 1.0, parse_nodes(["1x8", "6x8:1"]))
    assert plan.num_workers == 4
    fixed = plan_resources(ClusterConfig(num_workers=4, use_gpu=True), 1.0,
                           parse_nodes(["1x8", "6x8:1"]))
    assert not fixed.elastic and fixed.scaling_workers() == 4


def test_an_elastic_run_that_cannot_start_names_min_workers() -> None:
    cluster = ClusterConfig(num_workers=4, min_workers=2, use_gpu=True)
    plan = plan_resources(cluster, 1.0, parse_nodes(["1x8", "1x8:1"]))
    assert not plan.fits
    assert "cluster.min_workers = 2 workers of 1 GPU each need 2 GPUs" in plan.reason


def test_min_workers_above_num_workers_is_refused_naming_both() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(PAPER, ["cluster.num_workers=2", "cluster.min_workers=3"])
    assert "cluster.min_workers = 3" in str(err.value)
    assert "cluster.num_workers = 2" in str(err.value)
