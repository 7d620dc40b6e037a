#!/usr/bin/env bash
# Device check of issue 14 (about 4 minutes on one H200): the CUDA tests and the inference benchmark on cuda
# (fp32 and bf16), plus the same benchmark on that machine's idle CPU at 2 threads.
#
#   bash bench/gpu_check.sh fetch     # on the workstation (needs the package registry): put the wheels the GPU
#                                     # image lacks into .whl/ (git-ignored through .git/info/exclude)
#   bash bench/gpu_check.sh           # on the GPU machine (device `run` with carry [".whl"]); results in $OUT
#                                     # (or bench/results/gpu/ when OUT is unset)
#
# Python: $PYTHON if set; else ./.venv/bin/python if present; else python3 when it imports torch (the GPU image's
# /opt/torch venv), with .whl/ installed into /tmp/site; else a new .venv from requirements.lock (uv or pip; needs
# network). Every step has its own timeout and the script carries on after a failed step, so one failure still
# leaves the other results; the exit status is the number of failed steps.
set -uo pipefail
set -x
cd "$(dirname "$0")/.."
ROOT="$PWD"

# what the GPU image (python3 with torch, transformers, torchvision ...) lacks, at requirements.lock's versions
WHEELS="open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 ultralytics==8.4.190 ultralytics-thop==2.2.3
ultralytics-platform==0.1.99 pycocotools==2.0.11 pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3
python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0"

if [ "${1:-}" = "fetch" ]; then
    set -e
    exclude="$(git rev-parse --git-common-dir)/info/exclude"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    mkdir -p .whl
    PIP="${PYTHON:-python3} -m pip"
    # shellcheck disable=SC2086
    $PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
    # pycocoevalcap's wheel is 104 MB (Java jars, METEOR data): only its Python scorers travel (CIDEr-D, BLEU, ROUGE)
    tmp="$(mktemp -d)"
    $PIP download --no-deps --only-binary=:all: -d "$tmp" pycocoevalcap==1.2
    mkdir -p .whl/site
    (cd .whl/site && python3 -m zipfile -e "$tmp"/pycocoevalcap-1.2-py3-none-any.whl . \
        && find pycocoevalcap -type f ! -name '*.py' -delete && rm -rf pycocoevalcap-1.2.dist-info)
    rm -rf "$tmp"
    du -sh .whl
    exit 0
fi

OUT="${OUT:-$ROOT/bench/results/gpu}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CAPTIONER_NO_PROGRESS=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false YOLO_CONFIG_DIR="${TMPDIR:-/tmp}/ultralytics-config"
date -u
uname -a
nvidia-smi || echo "nvidia-smi failed"
grep -m1 'model name' /proc/cpuinfo; nproc
grep -o -m1 -w 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u

PY="${PYTHON:-}"
if [ -z "$PY" ] && [ -x .venv/bin/python ]; then PY="$ROOT/.venv/bin/python"; fi
if [ -z "$PY" ] && python3 -c "import torch" 2>/dev/null; then
    PY="$(command -v python3)"
    if [ -d .whl ]; then
        timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl && cp -r .whl/site/. /tmp/site/ 2>/dev/null
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
if [ -z "$PY" ]; then
    if command -v uv >/dev/null; then
        timeout 600 uv venv .venv && timeout 900 uv pip install --python .venv/bin/python -r requirements.lock
    else
        timeout 600 python3 -m venv .venv && timeout 900 .venv/bin/pip install -r requirements.lock
    fi
    PY="$ROOT/.venv/bin/python"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
for name in ("transformers", "torchvision", "open_clip", "ultralytics", "pycocoevalcap", "captioning"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", ""), module.__file__)
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING", exc)
from captioning import accel
print("native cpu bf16", accel.cpu_has_native_bf16(), "auto device", accel.resolve_device("auto"),
      "auto precision", accel.resolve_precision("auto", accel.resolve_device("auto")))
EOF

failed=0
step() {  # step NAME SECONDS command...
    local name="$1" seconds="$2"
    shift 2
    echo "=== $name (limit ${seconds}s) ==="
    local t0=$SECONDS
    if timeout --kill-after=10 "$seconds" "$@"; then
        echo "=== $name: ok in $((SECONDS - t0)) s ==="
    else
        echo "=== $name: FAILED (status $?) after $((SECONDS - t0)) s ==="
        failed=$((failed + 1))
    fi
}

step "cuda tests" 120 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -ra \
    tests/test_fast_inference.py tests/test_accel.py --junitxml="$OUT/tests.xml"
step "bench cuda fp32+bf16" 120 "$PY" bench/inference.py --device cuda --paths reference,fast --threads 2 --repeats 5 --images 64 \
    --out "$OUT/inference-cuda"
if [ "${GPU_CHECK_CPU:-1}" != "0" ]; then  # GPU_CHECK_CPU=0 skips the CPU comparison (a shorter device run)
    step "bench cpu 2 threads" 240 "$PY" bench/inference.py --device cpu --threads 2 --repeats 3 --images 32 \
        --out "$OUT/inference-cpu"
fi
ls -la "$OUT"
echo "failed steps: $failed"
exit "$failed"
