#!/usr/bin/env bash
# The GPU check of issue 16: one script, under 8 minutes on one CUDA GPU.
#
#   bash bench/gpu_check.sh [OUT.json]        # default bench/results/gpu_check.json
#   PYTHON=/path/python TRL_PYTHON=/path/python-with-trl bash bench/gpu_check.sh
#
# 1. The tests that only run on CUDA (they skip on CPU): FlexAttention gradients of packed rows,
#    segment attention on CUDA (fp32 and bf16 autocast), QLoRA (when bitsandbytes installs), and
#    the step-1 / bf16 tests, which run on the GPU there.
# 2. A short prefalign-vs-TRL comparison on the SmolLM2-135M shape (30 layers, random weights),
#    UltraFeedback-like lengths, SDPA (flash) attention, fp32 and bf16: pairs/s, tokens/s, peak
#    CUDA memory, step-1 loss; and prefalign without its issue-16 fast paths (--ab: segment
#    attention, fused AdamW) to measure them on the GPU.
# Everything lands in one JSON file. On a machine without CUDA it exits 3 with one line.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-bench/results/gpu_check.json}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# Segment-split attention is opt-in until measured on a GPU: this script measures it (--ab: without).
export PREFALIGN_SEGMENT_ATTENTION=1

if ! command -v "$PY" >/dev/null; then
    echo "gpu_check: no Python at '$PY' (set PYTHON=/path/to/python)" >&2
    exit 3
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); run it on a CUDA machine" >&2
    exit 3
fi
mkdir -p "$(dirname "$OUT")"
TMP=$(mktemp -d)
START=$(date +%s)

# bitsandbytes for the QLoRA test: optional, 45 s at most (an offline machine simply skips it)
timeout 45 "$PY" -m pip install -q bitsandbytes >"$TMP/bnb.log" 2>&1 || echo "bitsandbytes not installed: QLoRA test skips"

# 1. the CUDA-only tests (3 minutes at most)
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml="$TMP/tests.xml" \
    tests/test_flex_attention.py tests/test_speed_paths.py tests/test_step_one.py \
    "tests/test_packing.py::test_bf16_autocast_close" >"$TMP/tests.log" 2>&1
TESTS_RC=$?
tail -5 "$TMP/tests.log"

# 2. the comparison (3.5 minutes at most; TRL from $TRL_PYTHON when set)
timeout 210 "$PY" bench/real_shapes.py compare --cuda --ab --only smollm2/ultrafeedback --precisions fp32,bf16 \
    --warmup 1 --steps 3 --workdir "$TMP/bench" --out "$TMP/compare.json" >"$TMP/compare.log" 2>&1
BENCH_RC=$?
tail -8 "$TMP/compare.log"

"$PY" - "$OUT" "$TMP" "$TESTS_RC" "$BENCH_RC" "$START" <<'EOF'
import json, os, sys, time
import xml.etree.ElementTree as ET
import torch
out, tmp, tests_rc, bench_rc, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "tests_rc": tests_rc, "bench_rc": bench_rc,
       "seconds": time.time() - start, "tests": []}
xml = os.path.join(tmp, "tests.xml")
if os.path.isfile(xml):
    for case in ET.parse(xml).getroot().iter("testcase"):
        state = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                state = f"{tag}: {(node.get('message') or '')[:200]}"
        res["tests"].append({"test": f"{case.get('classname')}::{case.get('name')}", "result": state})
cmp_path = os.path.join(tmp, "compare.json")
res["compare"] = json.load(open(cmp_path)) if os.path.isfile(cmp_path) else None
for name in ("tests.log", "compare.log"):
    p = os.path.join(tmp, name)
    res[name.replace(".", "_")] = open(p).read()[-4000:] if os.path.isfile(p) else ""
json.dump(res, open(out, "w"), indent=1)
print(f"gpu_check: tests exit {tests_rc}, comparison exit {bench_rc}, {res['seconds']:.0f}s; wrote {out}")
EOF
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
