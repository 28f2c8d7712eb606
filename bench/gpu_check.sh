#!/usr/bin/env bash
# The GPU check for the kernels of kvlib/kernels, in one run on a lent H100/H200 (~5 min):
#   1. versions and the device;
#   2. the kernel tests on CUDA (tests/test_kernels_triton.py: kernels = references in fp32,
#      fp16, bf16; the model in bf16/fp16 on the Triton backend; the interpreter run too);
#   3. bench/gpu_decode.py: correctness, medians, copy bandwidth -> JSON.
# Logs and the JSON go to $OUT (or /tmp/gpu_check_out). Run from the repository root:
#   bash bench/gpu_check.sh
# Then copy $OUT/gpu_decode_*.json to bench/results/ and commit it with the logs' summary.
set -u -o pipefail
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

"$PY" - <<'EOF' 2>&1 | tee "$OUT/versions.log"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
EOF

timeout 300 "$PY" -m pytest -q -p no:cacheprovider --durations=5 \
    tests/test_kernels_triton.py tests/test_gpu_chapter.py 2>&1 | tee "$OUT/pytest.log"
echo "pytest exit: $?" | tee -a "$OUT/pytest.log"

slug=$("$PY" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
timeout 360 "$PY" bench/gpu_decode.py --out "$OUT/gpu_decode_${slug}.json" 2>&1 \
    | tee "$OUT/bench.log"
echo "bench exit: $?" | tee -a "$OUT/bench.log"
