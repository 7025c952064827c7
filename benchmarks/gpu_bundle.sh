#!/usr/bin/env bash
# Packs the Python packages that jlstm needs and the offline GPU machine's image lacks.
#
# The lent GPU machine (one H200; Python 3.12, torch 2.11; no package index, no network)
# already holds torch, torchvision, numpy, pandas, pyarrow, psutil, nvidia-ml-py, matplotlib
# and its deps, pyyaml, pytest + pytest-timeout, click, filelock, msgpack, requests, aiohttp,
# grpcio, attrs, anyio, cloudpickle, fsspec, tqdm, ... (/work/.library/device/KINDS.md).
# This script downloads cp312 manylinux x86_64 wheels of the rest of what `jlstm train`,
# `jlstm eval`, `jlstm plan`, benchmarks/ (gpu_suite.py's stages) and pytest import there, at
# requirements.lock's versions (CI's), unpacks them into one folder (site/), drops what no
# jlstm path uses (Ray's Java jars, RLlib, Serve, LLM and the dashboard's web UI; symbol
# tables and debug info of the native files) and packs two archives:
#     benchmarks/gpu_bundle/deps.tar.xz      Ray (Data, Train V2, Tune), MLflow-skinny with its
#                                            SQLite store, pydantic, decord, ...  (~36 MiB)
#     benchmarks/gpu_bundle/deps-av.tar.xz   PyAV, only for writing videos: data_shards/synth.py
#                                            (every benchmark that makes its own videos, `jlstm
#                                            demo`) and `jlstm data index`'s probe   (~18 MiB)
# Both unpack into the same site/. Not the full mlflow (its server and UI), not optuna (only
# `searcher: optuna` sweeps import it), not ray[default]'s dashboard deps (Ray runs minimal).
#
# Here (needs pip, PyPI and `strip`; ~4 minutes on 2 cores, mostly xz; wheels kept for reruns):
#     bash benchmarks/gpu_bundle.sh            # --no-pack: stop at the unpacked build/site/
# On the GPU machine, from the repository root (device tool: run with carry
# ["benchmarks/gpu_bundle/deps.tar.xz", "benchmarks/gpu_bundle/deps-av.tar.xz"]: ~54 MiB of
# the 64 MiB it carries, beside the repository's own ~3 MiB; leave deps-av out when nothing
# writes videos):
#     mkdir -p /tmp/deps && for f in benchmarks/gpu_bundle/deps*.tar.xz; do python3 -m tarfile --filter tar -e "$f" /tmp/deps || exit; done
#     (Python's own lzma: the GPU image may have no xz binary)
#     export PYTHONPATH=/tmp/deps/site:$PWD
#     python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py
#     python3 benchmarks/gpu_suite.py --out-dir $OUT/gpu --stage-dir /tmp/gpu-stages
#     python3 -m jlstm train --config ...       # `python3 -m jlstm`: no console script there
# The folder is plain site-packages (no pip install); Ray's workers inherit PYTHONPATH.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
LOCK=$ROOT/requirements.lock
OUT_DIR=$ROOT/benchmarks/gpu_bundle
BUILD=$OUT_DIR/build
WHEELS=$BUILD/wheels
SITE=$BUILD/site

if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -x $ROOT/.venv/bin/python ]]; then
    PY=$ROOT/.venv/bin/python
else
    PY=python3
fi

# What the GPU image lacks, found by importing jlstm's paths (and running Ray, Ray Data,
# Train V2, Tune, MLflow on SQLite, decord and av) on Python 3.12 with only the image's
# packages installed. Each one is pinned by requirements.lock.
PACKAGES=(
    # Ray core + Data/Train/Tune; jsonschema is a Ray core requirement the image lacks.
    ray
    jsonschema jsonschema-specifications referencing rpds-py
    # jlstm's configs, Ray Train/Tune, MLflow, FastAPI.
    pydantic pydantic-core annotated-types typing-inspection
    # MLflow client + SQLite tracking and registry store (`import mlflow` needs fastapi,
    # starlette and the `databricks` package; the SQL store needs cryptography's Fernet).
    mlflow-skinny mlflow-tracing fastapi starlette databricks-sdk
    sqlalchemy alembic mako sqlparse cryptography cffi
    cachetools python-dotenv importlib-metadata
    opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
    # In the image, but at a version that may be too old: pydantic 2.14 needs
    # typing-extensions >= 4.16; MLflow's and OpenTelemetry's generated protos a protobuf
    # runtime >= 5.26. These pins override the image's copies for jlstm's processes.
    typing-extensions protobuf
    # Clips are decoded with decord (0.6.0: one py3 wheel, loaded with ctypes).
    decord
    # Feature-cache checksums. The image has an xxhash too, of a version not pinned here;
    # this one (~0.2 MiB) is the one the cache was tested with.
    xxhash
    # Videos are written with PyAV: packed apart, in deps-av.tar.xz.
    av
)
# Top-level entries of site/ that go to deps-av.tar.xz instead of deps.tar.xz.
AV_ENTRIES=(av av.libs "av-*.dist-info")
# Packages not in requirements.lock: NAME==VERSION.
EXTRA_PINS=()

pinned() {
    local name=$1 line
    line=$(grep -i -m1 "^${name}==" "$LOCK" || true)
    if [[ -z $line ]]; then
        echo "gpu_bundle.sh: $name is not pinned in requirements.lock; add it to EXTRA_PINS" >&2
        return 1
    fi
    echo "$line"
}

SPECS=()
for name in "${PACKAGES[@]}"; do
    SPECS+=("$(pinned "$name")")
done
SPECS+=("${EXTRA_PINS[@]}")

PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux_2_28_x86_64)

echo "== downloading ${#SPECS[@]} wheels (cp312, manylinux x86_64) into $WHEELS"
mkdir -p "$WHEELS"
"$PY" -m pip download --quiet --no-deps "${PLATFORM[@]}" -d "$WHEELS" "${SPECS[@]}"

# Exactly the pinned wheels (the folder may hold older ones from an earlier pin). Wheel
# names spell the project in lowercase with underscores.
shopt -s nullglob nocaseglob
FILES=()
for spec in "${SPECS[@]}"; do
    name=${spec%%==*} version=${spec#*==}
    stem=$(echo "$name" | tr '.-' '__')
    match=("$WHEELS/${stem}-${version}-"*.whl)
    if (( ${#match[@]} != 1 )); then
        echo "gpu_bundle.sh: expected one wheel for $spec in $WHEELS, found ${#match[@]}" >&2
        exit 1
    fi
    FILES+=("${match[0]}")
done
shopt -u nullglob nocaseglob

echo "== unpacking into $SITE"
rm -rf "$SITE"
# pip (not unzip) keeps the executables' mode bits (Ray's raylet, gcs_server) and lays out
# each wheel's .data folders; nothing is compiled for this machine's Python.
"$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-warn-script-location \
    --disable-pip-version-check "${PLATFORM[@]}" --target "$SITE" "${FILES[@]}"

echo "== stripping what jlstm does not use"
before=$(du -sm "$SITE" | cut -f1)
rm -rf \
    "$SITE/bin" \
    "$SITE/ray/jars" \
    "$SITE/ray/rllib" \
    "$SITE/ray/serve" \
    "$SITE/ray/llm" \
    "$SITE/ray/dashboard/client/build"
find "$SITE" -name __pycache__ -type d -prune -exec rm -rf {} +
# Symbol tables and debug info of the native files (loading uses .dynsym only; a crash's
# stack trace loses function names): Ray's raylet, gcs_server and _raylet.so, av's and
# cryptography's extensions, ... A stripped copy replaces a file only if every LOAD segment
# is still page-aligned: strip breaks some files that auditwheel's patchelf rewrote
# (decord's libdecord.so: "ELF load command address/offset not page-aligned"), and those
# stay as they came.
if command -v strip >/dev/null; then
    "$PY" - "$SITE" <<'PYEOF'
import os, struct, subprocess, sys

def loadable(path):
    """Every PT_LOAD's offset is congruent to its address mod the page (and its align)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[4] != 2 or head[5] != 1:  # ELF64 little-endian only
            return False
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        p_type, _, offset, vaddr, _, _, _, align = struct.unpack_from("<IIQQQQQQ", table, i * phentsize)
        if p_type == 1 and ((vaddr - offset) % 4096 or (align > 1 and (vaddr - offset) % align)):
            return False
    return True

saved = kept = 0
for folder, _, names in os.walk(sys.argv[1]):
    for name in names:
        path = os.path.join(folder, name)
        if os.path.islink(path):
            continue
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                continue
        tmp = path + ".stripped"
        if subprocess.run(["strip", "--strip-unneeded", "-o", tmp, path],
                          stderr=subprocess.DEVNULL).returncode != 0:
            if os.path.exists(tmp):
                os.remove(tmp)
            continue
        before, after = os.path.getsize(path), os.path.getsize(tmp)
        if after < before and loadable(tmp):
            os.chmod(tmp, os.stat(path).st_mode)
            os.replace(tmp, path)
            saved += before - after
        else:
            os.remove(tmp)
            kept += after < before
print(f"  strip: {saved / 2**20:.0f} MiB removed; {kept} files left as they came "
      "(stripping would misalign them)")
PYEOF
else
    echo "gpu_bundle.sh: no strip here; the bundle keeps the debug symbols (bigger)" >&2
fi
after=$(du -sm "$SITE" | cut -f1)
echo "site/: ${before} MiB unpacked, ${after} MiB after stripping"

printf '%s\n' "${SPECS[@]}" > "$SITE/BUNDLE_PACKAGES.txt"
if [[ ${1:-} == --no-pack ]]; then
    echo "site/ left unpacked at $SITE (--no-pack)"
    exit 0
fi

# deps-av.tar.xz: AV_ENTRIES; deps.tar.xz: every other entry of site/.
shopt -s nullglob
AV_MEMBERS=() BASE_MEMBERS=()
for path in "$SITE"/* "$SITE"/.[!.]*; do
    entry=${path##*/} is_av=0
    for pattern in "${AV_ENTRIES[@]}"; do
        # shellcheck disable=SC2053  # a glob pattern on purpose
        if [[ $entry == $pattern ]]; then is_av=1; fi
    done
    if (( is_av )); then AV_MEMBERS+=("site/$entry"); else BASE_MEMBERS+=("site/$entry"); fi
done
shopt -u nullglob

pack() {  # pack ARCHIVE MEMBER...: tar | xz, the x86 filter first (~6% off the binaries)
    local archive=$1
    shift
    echo "== packing $archive (xz -9e, x86 filter)"
    tar -C "$BUILD" --owner=0 --group=0 --numeric-owner -cf - "$@" \
        | xz --x86 --lzma2=preset=9e -T1 > "$archive.tmp"
    mv "$archive.tmp" "$archive"
}
pack "$OUT_DIR/deps.tar.xz" "${BASE_MEMBERS[@]}"
pack "$OUT_DIR/deps-av.tar.xz" "${AV_MEMBERS[@]}"

total=0
for archive in "$OUT_DIR/deps.tar.xz" "$OUT_DIR/deps-av.tar.xz"; do
    size=$(stat -c %s "$archive")
    total=$((total + size))
    awk -v f="${archive#"$ROOT"/}" -v s="$size" 'BEGIN { printf "%s: %.1f MiB\n", f, s / 1048576 }'
done
awk -v s="$total" \
    'BEGIN { printf "together: %.1f MiB (the device tool carries 64 MiB with the repository)\n", s / 1048576 }'
echo "${#SPECS[@]} packages:"
sed 's/^/    /' "$SITE/BUNDLE_PACKAGES.txt"
