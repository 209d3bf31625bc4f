#!/usr/bin/env bash
# The prepared GPU check (one GPU, <= 5 minutes on an H200): fp16 + DeepSpeed ZeRO-2 LoRA pre-training of a
# ~1.1B random LLaMA at block 2048 (`zhtrain pretrain`, the seed's run_pt.sh settings) and a bf16 FSDP
# full_shard SFT run (`zhtrain sft`, the seed's FastChat settings); prints tokens/s, peak GPU memory and MFU,
# and fails unless each ran on the engine it asked for. What it runs: benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh                   # on a machine with a CUDA GPU
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh  # tiny sizes, CPU allowed: checks the script itself
#   GPU_CHECK_DIR=/scratch/x bash ...              # keep the work folder (default: a temp folder)
#
# Needs torch (CUDA), transformers, peft, accelerate, sentencepiece, safetensors and deepspeed; zhtrain is taken
# from this checkout (src/). On a machine that cannot reach a package index (an image with torch and transformers
# but no deepspeed, say), bring wheels made elsewhere and point GPU_CHECK_WHEELS at their folder:
#   pip wheel --no-deps -w .whl deepspeed==0.19.8     # an sdist: this builds a pure-Python wheel
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#       hjson pydantic pydantic-core annotated-types typing-inspection   # versions matching each other
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site "$GPU_CHECK_WHEELS"/*.whl
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY="$PWD/.venv/bin/python"; else PY=python3; fi
fi
missing=$("$PY" - <<'PYCHECK'
import importlib.util
need = ["torch", "transformers", "peft", "accelerate", "sentencepiece", "safetensors", "deepspeed"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PYCHECK
)
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages for $PY: $missing (pip install them, or set PYTHON=...)" >&2
    exit 2
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
