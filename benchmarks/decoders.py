"""decord 0.6.0 vs decord2: frames/s and broken-file survival, each in its own venv.

Both distributions install the same `decord` module, so each runs in its own virtual
environment (python3.11 -m venv, numpy at requirements.lock's version and the one decoder),
made under --venv-dir when missing, or given with --venv NAME=PATH. This script, run with the
project's venv, writes the videos (PyAV) into a temp dir and starts this same file inside each
decoder's venv (`--worker`, `--probe`: those modes import only the standard library, numpy and
decord), so the two decoders read the same files:

- demo: the demo's synthetic videos (`synthesize_dataset` at the demo's 128 px source size,
  48 frames, MPEG-4 Part 2 in AVI);
- ucf_h264, ucf_mpeg4: UCF101-shaped, 320 x 240 at 25 fps, 6 s, H.264 (libx264 defaults:
  preset medium, CRF 23, keyframe interval 250, B-frames) in MP4 and MPEG-4 Part 2 (GOP 12,
  600 kb/s) in AVI; moving shapes on a drifting background with grain;
- hd_h264: 1920 x 1080 at 25 fps, 3 s, H.264 as above.

Frames/s on one thread (`num_threads=1`, as `data_shards.decode.open_reader` opens readers:
"per CPU"; the CPU time the process used is recorded as well), at S = 224 (decord resizes
while decoding, width = height = S, as the project decodes) and at the native size:
sequential (16-frame clips back to back, `get_batch`, a fresh reader) and random clip access
(16-frame clips at seeded random starts on one open reader, so a seek each). Rounds alternate
the decoders' order (ABBA...) so a shared machine's drifting load falls on both; the JSON
holds each figure's median, min and max over the rounds, and `headline` decord2 / decord in
frames per CPU second paired round by round. Every frame of the UCF-shaped and 1080p videos
carries its index as a 4 x 4 bit stamp in its top-left corner, so each returned frame is
checked to be the frame asked for (`wrong_frames`); `decoded_pixels_differ` compares the two
decoders' first clip of each video, pixel by pixel.

Survival: the 8 broken kinds of tests/test_data_index.py (`write_broken_videos`' 6, a FIFO
that blocks its reader forever and a missing file), each opened and read in a child process
of the decoder's venv with a deadline: `error` (a Python exception: survived), `frames`
(returned frames: survived, the index must catch it), `crashed` (killed by a signal or died
without a word) or `hung` (past the deadline, killed). `formats`: HEVC, VP9 and AV1 files
(320 x 240, 1 s) probed the same way, a user's own videos may come in those.

About 4 minutes on 2 shared cores; making the two venvs the first time adds about 9 s each.

    .venv/bin/python benchmarks/decoders.py --out benchmarks/results/decoders.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# The two candidates. decord 0.6.0 is what requirements.lock pinned before this benchmark.
DECODERS = {"decord": "decord==0.6.0", "decord2": "decord2==3.4.0"}
CLIP_LEN = 16
SIZES: tuple[int | None, ...] = (224, None)  # None: native size
STAMP_CELLS = 4  # 4 x 4 cells, 16 bits: the frame index (as data_shards.synth.index_frame)
BROKEN_KINDS = (
    "empty", "truncated", "random_bytes", "text", "zero_frames", "mp4_cut", "hang", "missing"
)


# ---- pure helpers (numpy only: they run inside the decoders' venvs too) -------------------


def read_stamp(frame: np.ndarray, h_frac: float, w_frac: float) -> int:
    """The frame index stamped in the top-left h_frac x w_frac of a (possibly resized) frame."""
    h, w = frame.shape[:2]
    ys = ((np.arange(STAMP_CELLS) + 0.5) * h * h_frac / STAMP_CELLS).astype(int)
    xs = ((np.arange(STAMP_CELLS) + 0.5) * w * w_frac / STAMP_CELLS).astype(int)
    bits = frame[np.ix_(ys, xs)].mean(axis=2).reshape(-1) > 127
    return int((bits.astype(np.int64) << np.arange(STAMP_CELLS**2)).sum())


def stamp(index: int, side: int) -> np.ndarray:
    """uint8 [side, side, 3]: `index` as 16 white/black cells (what `read_stamp` reads)."""
    bits = (index >> np.arange(STAMP_CELLS**2)) & 1
    cells = bits.reshape(STAMP_CELLS, STAMP_CELLS).astype(np.uint8) * 255
    cell = -(-side // STAMP_CELLS)
    image = np.kron(cells, np.ones((cell, cell), dtype=np.uint8))[:side, :side]
    return np.repeat(image[:, :, None], 3, axis=2)


def clip_starts(num_frames: int, count: int, seed: int) -> list[int]:
    """`count` seeded random clip starts of a video (repeats allowed: a training shuffle's)."""
    rng = np.random.default_rng(seed)
    return [int(s) for s in rng.integers(0, num_frames - CLIP_LEN + 1, size=count)]


def summarize(values: list[float], digits: int = 1) -> dict[str, float]:
    """Median, min, max and (max - min) / median of one figure over the rounds."""
    median = statistics.median(values)
    return {
        "median": round(median, digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "spread": round((max(values) - min(values)) / median, 3) if median else 0.0,
    }


def classify(returncode: int | None, stdout: str) -> dict[str, Any]:
    """A probe child's outcome: its JSON line if it wrote one, else how it died."""
    if returncode is None:
        return {"outcome": "hung"}
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if returncode == 0 and lines:
        return json.loads(lines[-1])
    if returncode < 0:
        return {"outcome": "crashed", "signal": signal.Signals(-returncode).name}
    return {"outcome": "crashed", "returncode": returncode}


# ---- inside a decoder's venv ---------------------------------------------------------------


def _decoder_facts() -> dict[str, Any]:
    """Which distribution provides `decord` here, its version and its bundled libavcodec."""
    from importlib import metadata

    import decord

    dists = [d for d in ("decord", "decord2") if _has_dist(metadata, d)]
    package = Path(decord.__file__).parent
    libs = sorted(
        p.name
        for folder in (package, *package.parent.glob("decord*.libs"))
        for p in folder.glob("libavcodec*")
    )
    return {"distribution": dists, "module_version": decord.__version__, "libavcodec": libs}


def _has_dist(metadata: Any, name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def _open(path: str, size: int | None):
    import decord

    if size is None:
        return decord.VideoReader(path, num_threads=1)
    return decord.VideoReader(path, width=size, height=size, num_threads=1)


def _timed(readers, clips: list[list[int]], stamp_frac: list[float] | None) -> dict[str, Any]:
    """Decode clip k from readers[k] (16-frame `get_batch` calls), clock stopped in between.

    Returns frames/s of wall and of CPU time, and how many frames were not the frame asked
    for (read from the stamp; None when the video carries none).
    """
    wall = cpu = 0.0
    wrong = 0
    for reader, indices in zip(readers, clips, strict=True):
        w, c = time.perf_counter(), time.process_time()
        batch = reader.get_batch(indices).asnumpy()
        wall, cpu = wall + time.perf_counter() - w, cpu + time.process_time() - c
        if stamp_frac is not None:
            stamps = [read_stamp(frame, *stamp_frac) for frame in batch]
            wrong += sum(got != asked for got, asked in zip(stamps, indices, strict=True))
    frames = len(clips) * CLIP_LEN
    return {"wall_s": wall, "cpu_s": cpu, "frames": frames,
            "wrong_frames": wrong if stamp_frac is not None else None,
            "shape": list(batch.shape[1:])}


def _measure(path: str, size: int | None, stamp_frac, spec: dict, dump: Path | None) -> dict:
    """Sequential and random clips of one video at one size, each repeated to spec["min_s"]."""
    started = time.perf_counter()
    reader = _open(path, size)
    open_s = time.perf_counter() - started
    n = len(reader)
    if dump is not None:  # the decoded pixels, to compare the decoders' output afterwards
        np.save(dump, reader.get_batch(list(range(CLIP_LEN))).asnumpy())
    runs: dict[str, list[dict]] = {"sequential": [], "random": []}
    sequential = [list(range(s, s + CLIP_LEN)) for s in range(0, n - CLIP_LEN + 1, CLIP_LEN)]
    # Sequential: a fresh reader per pass (opened off the clock), clips back to back.
    while not runs["sequential"] or sum(r["wall_s"] for r in runs["sequential"]) < spec["min_s"]:
        fresh = _open(path, size)
        runs["sequential"].append(_timed([fresh] * len(sequential), sequential, stamp_frac))
    # Random: seeded random starts on the one open reader, so every clip seeks.
    seed = spec["seed"]
    while not runs["random"] or sum(r["wall_s"] for r in runs["random"]) < spec["min_s"]:
        starts = clip_starts(n, spec["random_clips"], seed)
        seed += 1
        clips = [list(range(s, s + CLIP_LEN)) for s in starts]
        runs["random"].append(_timed([reader] * len(clips), clips, stamp_frac))
    return {"num_frames": n, "open_s": open_s, **runs}


def _total(parts: list[dict]) -> dict[str, Any]:
    """Pool the runs of one mode (several passes, several videos) into one rate."""
    wall, cpu = sum(p["wall_s"] for p in parts), sum(p["cpu_s"] for p in parts)
    frames = sum(p["frames"] for p in parts)
    checked = [p["wrong_frames"] for p in parts if p["wrong_frames"] is not None]
    return {"fps": frames / wall, "cpu_fps": frames / cpu if cpu > 0 else None,
            "frames": frames, "wrong_frames": sum(checked) if checked else None,
            "shape": parts[0]["shape"]}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One round: every video (a set of files) at every size, sequential then random clips."""
    out: dict[str, Any] = {"decoder": _decoder_facts(), "videos": {}}
    dump_dir = Path(spec["dump_dir"]) if spec.get("dump_dir") else None
    for video in spec["videos"]:
        per_size = {}
        for size in spec["sizes"]:
            key = "native" if size is None else f"S{size}"
            dump = dump_dir / f"{video['name']}_{key}.npy" if dump_dir else None
            files = [_measure(p, size, video["stamp"], spec, dump if i == 0 else None)
                     for i, p in enumerate(video["paths"])]
            per_size[key] = {
                "num_frames": sum(f["num_frames"] for f in files),
                "open_s": statistics.mean(f["open_s"] for f in files),
                **{mode: _total([r for f in files for r in f[mode]])
                   for mode in ("sequential", "random")},
            }
        out["videos"][video["name"]] = per_size
    return out


def probe(path: str, size: int, stamp_frac: list[float] | None = None) -> dict[str, Any]:
    """Open and read a file as the project does; the outcome of the first step that raised.

    Steps: open at S (resizing, one thread), len, the first clip (`get_batch`), the last frame
    (what `data_shards.index.probe_video` reads to find files cut short). With `stamp_frac`,
    also how many of the first clip's frames are not the frame asked for.
    """
    stage = "open"
    try:
        reader = _open(path, size)
        stage = "len"
        n = len(reader)
        stage = "first_clip"
        first = reader.get_batch(list(range(min(CLIP_LEN, n)))).asnumpy()
        stage = "last_frame"
        reader[n - 1].asnumpy()
    except Exception as e:  # DECORDError, RuntimeError, IndexError...: a clean Python error
        message = " ".join(str(e).split())[:200]
        return {"outcome": "error", "stage": stage, "error": f"{type(e).__name__}: {message}"}
    result = {"outcome": "frames", "num_frames": n, "first_clip": list(first.shape)}
    if stamp_frac is not None:
        result["wrong_frames"] = sum(
            read_stamp(frame, *stamp_frac) != i for i, frame in enumerate(first)
        )
    return result


# ---- in the project's venv -----------------------------------------------------------------


def lock_pin(package: str) -> str:
    """`package==version` as requirements.lock pins it."""
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.lower().startswith(f"{package}=="):
            return line.strip()
    raise SystemExit(f"{package} is not pinned in requirements.lock")


def ensure_venv(path: Path, requirement: str, python: str) -> float | None:
    """Make `path` a venv holding numpy (the lock's) and `requirement`; seconds, None if there."""
    py = path / "bin" / "python"
    name = requirement.split("==")[0]
    if py.exists():
        check = subprocess.run(
            [str(py), "-c", f"from importlib import metadata; print(metadata.version('{name}'))"],
            capture_output=True, text=True,
        )
        if check.returncode == 0 and check.stdout.strip() == requirement.split("==")[1]:
            return None
    started = time.perf_counter()
    subprocess.run([python, "-m", "venv", "--clear", str(path)], check=True)
    subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         lock_pin("numpy"), requirement],
        check=True,
    )
    return round(time.perf_counter() - started, 1)


def _scene_frames(num_frames: int, height: int, width: int, seed: int):
    """uint8 [H, W, 3] frames: a drifting smooth background, moving shapes, grain, a stamp."""
    rng = np.random.default_rng(seed)
    block = 16 * max(1, height // 240)
    field = rng.integers(40, 200, size=(height // block + 2, width // block + 2 + num_frames, 3))
    background = np.kron(field, np.ones((block, block, 1))).astype(np.int16)
    shapes = [
        (rng.integers(0, height), rng.integers(0, width), rng.uniform(-4, 4, 2) * height / 240,
         int(rng.integers(height // 10, height // 4)), rng.integers(0, 256, 3))
        for _ in range(4)
    ]
    side = min(height, width) // 4
    ys, xs = np.ogrid[:height, :width]
    for t in range(num_frames):
        shift = t * block // 8  # the background drifts left, an eighth of a block a frame
        frame = background[:height, shift : shift + width].copy()
        for y0, x0, (vy, vx), radius, colour in shapes:
            cy, cx = (y0 + vy * t) % height, (x0 + vx * t) % width
            frame[(ys - cy) ** 2 + (xs - cx) ** 2 < radius**2] = colour
        frame += rng.integers(-6, 7, size=frame.shape, dtype=np.int16)
        frame = np.clip(frame, 0, 255).astype(np.uint8)
        frame[:side, :side] = stamp(t, side)
        yield frame


def write_scene(path: Path, codec: str, width: int, height: int, seconds: float) -> dict:
    """A stamped scene video (see the module docstring for the codecs' settings)."""
    import av

    num_frames = int(seconds * 25)
    keyframes = 0
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "mpeg4":
            stream.bit_rate, stream.gop_size = 600_000, 12
        if codec == "libx265":
            stream.options = {"x265-params": "log-level=error"}
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only, not its banner
        for frame in _scene_frames(num_frames, height, width, seed=width + len(codec)):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                keyframes += packet.is_keyframe
                container.mux(packet)
        for packet in stream.encode():
            keyframes += packet.is_keyframe
            container.mux(packet)
    side = min(height, width) // 4
    return {"codec": codec, "width": width, "height": height, "fps": 25,
            "num_frames": num_frames, "keyframes": keyframes, "bytes": path.stat().st_size,
            "stamp": [side / height, side / width]}


def make_videos(tmp: Path) -> tuple[list[dict], dict[str, dict], dict[str, str]]:
    """The measured videos (worker specs), the other codecs' files and the broken files."""
    from data_shards.synth import synthesize_dataset, write_broken_videos

    videos = []
    # The demo's data (orchestration/demo.py: 4 classes, source frames S * 4 / 3 = 128 px);
    # one video a class is enough for a rate.
    root = synthesize_dataset(tmp / "demo", classes=4, videos_per_class=1, frame_size=128)
    demo = sorted(str(p) for p in (root / "UCF-101").rglob("*.avi"))
    videos.append({"name": "demo", "paths": demo, "stamp": None,
                   "facts": {"codec": "mpeg4", "width": 128, "height": 128, "fps": 25,
                             "files": len(demo), "num_frames": 48,
                             "bytes": sum(Path(p).stat().st_size for p in demo)}})
    for name, codec, suffix, (w, h), seconds in (
        ("ucf_h264", "libx264", "mp4", (320, 240), 6.0),
        ("ucf_mpeg4", "mpeg4", "avi", (320, 240), 6.0),
        ("hd_h264", "libx264", "mp4", (1920, 1080), 3.0),
    ):
        started = time.perf_counter()
        path = tmp / f"{name}.{suffix}"
        facts = write_scene(path, codec, w, h, seconds)
        print(f"wrote {name} ({time.perf_counter() - started:.1f} s)", flush=True)
        videos.append({"name": name, "paths": [str(path)], "stamp": facts.pop("stamp"),
                       "facts": facts})
    formats = {}
    # Codecs a user's own videos may come in (phones: HEVC; the web: VP9, AV1): readable?
    for name, codec, suffix in (
        ("hevc", "libx265", "mp4"), ("vp9", "libvpx-vp9", "webm"), ("av1", "libsvtav1", "mp4")
    ):
        path = tmp / f"format_{name}.{suffix}"
        facts = write_scene(path, codec, 320, 240, 1.0)
        formats[name] = {"path": str(path), "stamp": facts.pop("stamp"), "facts": facts}
    broken = {kind: str(p) for kind, p in write_broken_videos(tmp / "bad").items()}
    broken["hang"] = str(tmp / "bad" / "hang.avi")
    os.mkfifo(broken["hang"])  # opening it blocks forever: a hung decoder
    broken["missing"] = str(tmp / "bad" / "missing.avi")
    return videos, formats, broken


def run_worker(python: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """One round in the decoder's venv (the file itself, `--worker`)."""
    done = subprocess.run(
        [str(python), __file__, "--worker", json.dumps(spec)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.splitlines()[-1])


def run_probe(
    python: Path, path: str, size: int, timeout_s: float, stamp_frac: list[float] | None = None
) -> dict[str, Any]:
    """`probe` in a child of the decoder's venv, killed past `timeout_s`."""
    stamp_args = ["--stamp", json.dumps(stamp_frac)] if stamp_frac else []
    try:
        done = subprocess.run(
            [str(python), __file__, "--probe", path, "--size", str(size), *stamp_args],
            capture_output=True, text=True, timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:  # subprocess.run kills the child (SIGKILL) first
        return classify(None, "")
    result = classify(done.returncode, done.stdout)
    if result["outcome"] == "crashed":
        result["stderr_tail"] = " ".join(done.stderr.split())[-200:]
    return result


def merge_rounds(rounds: list[dict]) -> dict[str, Any]:
    """Per video, size and mode: each figure summarized over the rounds."""
    merged: dict[str, Any] = {}
    for video, sizes in rounds[0]["videos"].items():
        merged[video] = {}
        for size, first in sizes.items():
            entry: dict[str, Any] = {
                "num_frames": first["num_frames"],
                "open_ms": summarize([r["videos"][video][size]["open_s"] * 1e3 for r in rounds]),
            }
            for mode in ("sequential", "random"):
                runs = [r["videos"][video][size][mode] for r in rounds]
                checked = first[mode]["wrong_frames"] is not None
                entry[mode] = {
                    "fps": summarize([r["fps"] for r in runs]),
                    "cpu_fps": summarize([r["cpu_fps"] or 0.0 for r in runs]),
                    "frames_per_round": statistics.median(r["frames"] for r in runs),
                    "wrong_frames": sum(r["wrong_frames"] for r in runs) if checked else None,
                    "frames_checked": sum(r["frames"] for r in runs) if checked else 0,
                    "shape": first[mode]["shape"],
                }
            merged[video][size] = entry
    return merged


def headline(rounds: dict[str, list[dict]]) -> dict[str, Any]:
    """decord2 / decord in frames per CPU second, paired round by round (the two ran back to
    back, so a shared machine's load falls on both): median, min and max over the rounds per
    video, size and mode (> 1: decord2 does more per CPU), and the medians' geometric mean."""
    a, b = rounds["decord"], rounds["decord2"]
    ratios = {}
    for video, sizes in a[0]["videos"].items():
        for size in sizes:
            for mode in ("sequential", "random"):
                ratios[f"{video} {size} {mode}"] = summarize(
                    [rb["videos"][video][size][mode]["cpu_fps"]
                     / ra["videos"][video][size][mode]["cpu_fps"]
                     for ra, rb in zip(a, b, strict=True)],
                    digits=2,
                )
    geomean = float(np.exp(np.mean(np.log([r["median"] for r in ratios.values()]))))
    return {"decord2_over_decord_cpu_fps": ratios, "geomean": round(geomean, 2)}


def frame_differences(dump: Path, videos: list[str]) -> dict[str, Any]:
    """Mean and max |decord2 - decord| over the first clip's pixels, per video and size."""
    out: dict[str, Any] = {}
    for video in videos:
        for size in ("S224", "native"):
            a = np.load(dump / "decord" / f"{video}_{size}.npy").astype(np.int16)
            b = np.load(dump / "decord2" / f"{video}_{size}.npy").astype(np.int16)
            diff = np.abs(a - b)
            out[f"{video} {size}"] = {"mean": round(float(diff.mean()), 3), "max": int(diff.max())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/decoders.json")
    parser.add_argument("--venv", action="append", default=[], metavar="NAME=PATH",
                        help="use this venv for decoder NAME (decord, decord2) as it is")
    parser.add_argument("--venv-dir", default=str(REPO / "benchmarks" / ".decoder_venvs"),
                        help="where missing venvs are made (git-ignored)")
    parser.add_argument("--python", default="python3.11", help="the venvs' interpreter")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per decoder (ABBA order)")
    parser.add_argument("--random-clips", type=int, default=8, help="random clips per pass")
    parser.add_argument("--min-s", type=float, default=0.25,
                        help="each video, size and mode is decoded at least this long a round")
    parser.add_argument("--probe-timeout-s", type=float, default=10.0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=224, help=argparse.SUPPRESS)
    parser.add_argument("--stamp", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:  # inside a decoder's venv
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.probe is not None:
        print(json.dumps(probe(args.probe, args.size, json.loads(args.stamp or "null"))))
        return

    from machine import load_average, machine_info  # the project's venv only (torch)

    load_start = load_average()
    given = dict(item.split("=", 1) for item in args.venv)
    pythons, setup_s = {}, {}
    for name, requirement in DECODERS.items():
        if name in given:
            pythons[name], setup_s[name] = Path(given[name]) / "bin" / "python", None
            continue
        path = Path(args.venv_dir) / name
        print(f"venv {name}: {path}", flush=True)
        setup_s[name] = ensure_venv(path, requirement, args.python)
        pythons[name] = path / "bin" / "python"

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        videos, formats, broken = make_videos(Path(tmp))
        spec = {"videos": [{k: v[k] for k in ("name", "paths", "stamp")} for v in videos],
                "sizes": list(SIZES), "random_clips": args.random_clips, "seed": 0,
                "min_s": args.min_s}
        rounds: dict[str, list[dict]] = {name: [] for name in DECODERS}
        order = list(DECODERS)
        started = time.perf_counter()
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                dump = Path(tmp) / "frames" / name
                dump.mkdir(parents=True, exist_ok=True)
                rounds[name].append(
                    run_worker(pythons[name], {**spec, "dump_dir": str(dump) if r == 0 else None})
                )
            print(f"round {r + 1}/{args.rounds} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
        for name in DECODERS:
            survival = {kind: run_probe(pythons[name], broken[kind], 224, args.probe_timeout_s)
                        for kind in BROKEN_KINDS}
            results[name] = {
                "requirement": DECODERS[name],
                "venv_setup_s": setup_s[name],
                **rounds[name][0]["decoder"],
                "videos": merge_rounds(rounds[name]),
                "survival": survival,
                "survives": sum(s["outcome"] in ("error", "frames") for s in survival.values()),
                "formats": {
                    codec: run_probe(pythons[name], f["path"], 224, args.probe_timeout_s,
                                     f["stamp"])
                    for codec, f in formats.items()
                },
            }
        differ = frame_differences(Path(tmp) / "frames", [v["name"] for v in videos])
    result = {
        "setup": {
            "clip_len": CLIP_LEN,
            "sizes": ["S224" if s else "native" for s in SIZES],
            "rounds": args.rounds,
            "random_clips_per_video": args.random_clips,
            "num_threads": 1,
            "probe_timeout_s": args.probe_timeout_s,
            "videos": {v["name"]: v["facts"] for v in videos},
            "formats": {codec: f["facts"] for codec, f in formats.items()},
            "numpy": lock_pin("numpy"),
            "note": "fps: frames / wall s of get_batch calls (open excluded, open_ms apart); "
                    "cpu_fps: frames / CPU s of the process; median, min, max over rounds",
        },
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "headline": headline(rounds),
        "decoded_pixels_differ": differ,
        **results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("headline", "load_average_end")}, indent=2))
    for name in DECODERS:
        print(name, {k: v["outcome"] for k, v in results[name]["survival"].items()})
        print(name, {k: (v["outcome"], v.get("wrong_frames"))
                     for k, v in results[name]["formats"].items()})


if __name__ == "__main__":
    sys.exit(main())
