#!/usr/bin/env bash
# The GPU check, in one run on a lent H100/H200 (about 8-9 minutes):
#   1. versions and the device;
#   2. bench/gpu_decode.py $BENCH_ARGS alone on the GPU: correctness, medians of every path,
#      other launch options of both kernels, copy bandwidth -> gpu_decode_<device>.json;
#      then bench/gpu_engine.py alone: the engine against transformers (padded and
#      continuous) on a Llama-3.2-1B-shaped model, each decode step against its floor, host
#      syncs per step, decode steps eager against CUDA graphs -> gpu_engine_<device>.json;
#   3. then, side by side: the GPU tests (kernels = references in fp32/fp16/bf16; every cache,
#      the model and the engine on CUDA in bf16 and fp16; chapter 7's helpers) and every
#      chapter of the book ($NOTEBOOKS, default all) executed top to bottom on the GPU machine,
#      naming every cell that takes over 10 s.
# The machine's own torch and triton are used. Python packages it lacks (the Jupyter stack,
# for step 3) can travel as wheels in .whl/, fetched beforehand where pip can reach PyPI:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl -r bench/gpu_wheels.txt
# Logs and the JSON go to $OUT (or /tmp/gpu_check_out). From the repository root:
#   bash bench/gpu_check.sh
#   NOTEBOOKS="book/07_gpu_mapping.ipynb" BENCH_ARGS="--sweep none --graphs" bash bench/gpu_check.sh
# Then copy $OUT/gpu_decode_*.json to bench/results/ and commit it with the logs' summary.
set -u -o pipefail
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
NOTEBOOKS="${NOTEBOOKS:-$(ls book/*.ipynb)}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  "$PY" - <<'EOF'
import numba, numpy, torch, transformers, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda,
      "numpy", numpy.__version__, "numba", numba.__version__, "transformers",
      transformers.__version__)
p = torch.cuda.get_device_properties(0)
print(torch.cuda.get_device_name(), p.multi_processor_count, "SMs", p.total_memory >> 30, "GiB")
EOF
} 2>&1 | tee "$OUT/versions.log"

slug=$("$PY" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
timeout 270 "$PY" bench/gpu_decode.py ${BENCH_ARGS:-} --out "$OUT/gpu_decode_${slug}.json" 2>&1 \
    | tee "$OUT/bench.log"
echo "bench exit: $? after $((SECONDS - start)) s" | tee -a "$OUT/bench.log"
timeout 240 "$PY" bench/gpu_engine.py --out "$OUT/gpu_engine_${slug}.json" 2>&1 \
    | tee "$OUT/engine.log"
echo "engine bench exit: $? after $((SECONDS - start)) s" | tee -a "$OUT/engine.log"

# Step 3: tests and chapters side by side (timings in them are not recorded).
( timeout 280 "$PY" -m pytest -q -rfE -n 6 -p no:cacheprovider --durations=8 \
      tests/test_kernels_triton.py tests/test_devices.py tests/test_gpu_chapter.py \
      tests/test_cuda_graphs.py \
      tests/test_bench.py > "$OUT/pytest.log" 2>&1
  echo "pytest exit: $?" >> "$OUT/pytest.log" ) &
mkdir -p /tmp/nb
for nb in $NOTEBOOKS; do
    name=$(basename "$nb" .ipynb)
    ( t0=$SECONDS
      OMP_NUM_THREADS=3 timeout 280 "$PY" tools/execute_notebooks.py --timeout 150 "$nb" \
          > "/tmp/nb/$name.log" 2>&1
      echo "$name: exit $? in $((SECONDS - t0)) s" >> "/tmp/nb/$name.log" ) &
done
wait
grep -h -v "IPKernelApp" /tmp/nb/*.log | grep -v "^\s*$" | head -400 > "$OUT/notebooks.log"
[ -f /tmp/nb/07_gpu_mapping.log ] && cp book/07_gpu_mapping.ipynb "$OUT/07_gpu_mapping_on_gpu.ipynb"
echo "== pytest"; tail -n 25 "$OUT/pytest.log"
echo "== notebooks"; grep -h "exit\|took\|Error" /tmp/nb/*.log | head -40
echo "== bench"; tail -n 12 "$OUT/bench.log" | cut -c1-400
echo "== engine"; tail -n 8 "$OUT/engine.log" | cut -c1-400
echo "total $((SECONDS - start)) s"
