#!/usr/bin/env bash
# One call on the lent GPU machine: set up, then the stages named as arguments, logs under $OUT.
#   bash bench/gpu_session.sh setup tests parity quick   (repository root; .whl carried, see
#   ../shared/gpu-wheels.sh); results come back packed in $OUT/session.tgz
# Stages: setup (wheels, setup.py's build of the extensions), tests (GPU runs of the Triton and
# engine tests), tests-fused (the kernel tests alone), parity (greedy vs transformers,
# both models), quick (our throughput alone), bench-smollm, bench-qwen (ragged 256 against
# transformers static and continuous batching), decode (batch-1 llama-3-8b MBU, batch-256 idle
# gap), decode-256, decode-ab (plain torch kernels), decode-async (batch-256 idle gap
# with and without async scheduling, Llama-3-8B batch 1), graphs-ab (the ragged 256 with CUDA
# graphs for every step and for decode steps only, both models), sweep (tokens/s per batch size against
# transformers), ragged-ab (the ragged 256 run, async scheduling on and off, ours alone),
# batching (the serving batching table: a capacity probe, then bench.batching_table at 60%),
# long-qwen / long-llama (bench.long_context: long-context decode and prefill against the
# roofline; SWEEP=1 times the attention kernels' knobs too), decode-knobs (the decode
# kernel's knobs at batch-1 long contexts), structured (bench.structured_outputs, issue 24),
# serve-ragged (bench.serving_overhead: the ragged 256 through serve against offline, issue 23),
# gemv (bench.gemv_bench: decode-shape linears, cuBLAS against a Triton GEMV).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
# Logs and results gather in $W and are packed into $OUT/session.tgz after every stage (what
# comes back from the machine is limited to 8 files; a stage killed at the limit keeps the rest).
W=/tmp/work
RES="$W/results"
mkdir -p "$OUT" "$RES"
run() {  # run NAME TIMEOUT CMD...: log to $W/NAME.log, keep going on failure
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS rc
  timeout "$limit" "$@" >"$W/$name.log" 2>&1
  rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  tail -n "${TAILN:-8}" "$W/$name.log"
  tar czf "$OUT/session.tgz" -C "$W" .
  return $rc
}
# The wheels setup installs: on the path of every call of this script, not only setup's (a
# second call without it found no zmq).
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
RAGGED="--load-format dummy --workload ragged --num-prompts 256 --dtype bfloat16"
for stage in "$@"; do
  case $stage in
    setup)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >/dev/null 2>&1
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
      # setup.py's build, skipped on a warm machine when the sources are those of the kept
      # build and every module is there (a fresh carry removes ignored files it does not name).
      # Old modules go first: a failed build leaves none to be imported stale.
      sum=$(cat setup.py csrc/*.pyx csrc/*.h ipc/*.h minivllm/_cext/*.pxd | sha1sum)
      built=yes
      for pyx in csrc/*.pyx; do
        compgen -G "minivllm/_cext/$(basename "$pyx" .pyx).cpython-312*.so" >/dev/null || built=
      done
      if [ -z "$built" ] || [ "$(cat /tmp/cext.stamp 2>/dev/null)" != "$sum" ]; then
        rm -f /tmp/cext.stamp minivllm/_cext/*.cpython-312*.so
        run build 600 python3 setup.py build_ext --inplace -j 16 && echo "$sum" > /tmp/cext.stamp
      fi
      mkdir -p "$W/cext" && cp minivllm/_cext/*cpython-312*.so "$W/cext/" ;;
    tests)
      run tests 420 python3 -m pytest -q -p no:cacheprovider tests/test_triton_attention.py \
        tests/test_triton_fused.py tests/test_gpu_engine.py tests/test_generate.py \
        -k 'not smollm and not embedded and not stop_rules and not seeded and not bad_ and not min_tokens' ;;
    tests-async)
      run tests-async 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py \
        tests/test_generate.py -k 'async or graphs' ;;
    tests-graphs)  # the kernels against the reference, the graphs against eager
      run tests-graphs 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py \
        tests/test_triton_attention.py ;;
    tests-fused)
      run tests-fused 200 python3 -m pytest -q -p no:cacheprovider tests/test_triton_fused.py \
        tests/test_triton_attention.py ;;
    decode-256)
      run decode-256 300 python3 -m bench.decode_bench --model qwen2.5-0.5b --batch 256 \
        --json "$RES/decode_qwen2.5-0.5b_bs256.json" ;;
    parity)
      run parity-qwen 240 python3 -m bench.gpu_parity --model qwen2.5-0.5b --dtype bfloat16 \
        --json "$RES/gpu_parity_qwen2.5-0.5b_bf16.json"
      run parity-smollm 240 python3 -m bench.gpu_parity --model smollm2-135m --dtype bfloat16 \
        --json "$RES/gpu_parity_smollm2-135m_bf16.json" ;;
    quick)
      TAILN=8 run quick-qwen 240 python3 -m bench.offline_throughput --model qwen2.5-0.5b $RAGGED \
        --peers --gpu-memory-utilization 0.5 --json "$RES/quick_qwen.json" ;;
    bench-smollm)
      TAILN=6 run bench-smollm 590 python3 -m bench.offline_throughput --model smollm2-135m $RAGGED \
        --peers hf hf-cb --gpu-memory-utilization 0.4 \
        --json "$RES/offline_gpu_smollm2-135m.json" ;;
    bench-qwen)
      TAILN=6 run bench-qwen 590 python3 -m bench.offline_throughput --model qwen2.5-0.5b $RAGGED \
        --peers hf hf-cb --gpu-memory-utilization 0.4 --json "$RES/offline_gpu_qwen2.5-0.5b.json" ;;
    decode-ab)  # plain torch kernels (no Triton attention or fused kernels, so no CUDA graphs)
      run decode-8b-torch 300 python3 -m bench.decode_bench --model llama-3-8b --batch 1 \
        --kernels torch --json "$RES/decode_llama-3-8b_bs1_torch.json"
      run decode-256-torch 300 python3 -m bench.decode_bench --model qwen2.5-0.5b --batch 256 \
        --kernels torch --json "$RES/decode_qwen2.5-0.5b_bs256_torch.json" ;;
    decode-async)
      for mode in async no-async; do
        run decode-256-$mode 300 python3 -m bench.decode_bench --model qwen2.5-0.5b --batch 256 \
          --$mode-scheduling --json "$RES/decode_qwen2.5-0.5b_bs256_$mode.json"
      done
      run decode-8b 300 python3 -m bench.decode_bench --model llama-3-8b --batch 1 \
        --json "$RES/decode_llama-3-8b_bs1.json" ;;
    sweep)
      TAILN=14 run sweep 420 python3 -m bench.offline_throughput --model qwen2.5-0.5b \
        --load-format dummy --workload fixed --prompt-len 128 --output-len 128 \
        --num-prompts 1 4 16 64 128 256 --dtype bfloat16 --peers hf \
        --gpu-memory-utilization 0.4 --json "$RES/batch_sweep_h100.json" ;;
    graphs-ab)  # issue 22: the ragged 256 with every step's graphs and with decode graphs only
      for model in ${MODELS:-qwen2.5-0.5b smollm2-135m}; do
        for mode in full decode-only; do
          TAILN=6 run ragged-$model-$mode 240 python3 -m bench.offline_throughput --model $model \
            $RAGGED --peers --gpu-memory-utilization 0.5 --cuda-graph-mode $mode \
            --json "$RES/ragged_${model}_graphs_$mode.json"
        done
      done ;;
    ragged-ab)
      for mode in async no-async; do
        TAILN=3 run ragged-$mode 240 python3 -m bench.offline_throughput --model qwen2.5-0.5b \
          $RAGGED --peers --gpu-memory-utilization 0.5 --$mode-scheduling \
          --json "$RES/ragged_qwen_$mode.json"
      done ;;
    batching)
      SERVE="qwen2.5-0.5b --load-format dummy --dtype bfloat16 --api-servers 4"
      LENS="--prompt-len uniform:32:256 --output-len uniform:16:64"
      TAILN=12 run probe 240 python3 -m bench.serve_load --serve-args "$SERVE --max-num-seqs 128" \
        --num-requests 400 $LENS --no-progress --json "$RES/batching_probe_h100.json"
      RATE=$(python3 -c "import json; r=json.load(open('$RES/batching_probe_h100.json'))['runs'][0]; print(round(0.6 * r['request_throughput'], 1))")
      echo "capacity probe -> rate $RATE req/s"
      TAILN=30 run batching 590 python3 -m bench.batching_table --tag h100 --max-num-seqs 128 \
        --num-requests 400 --rate "$RATE" --serve-common "$SERVE" ${BATCHING_ROWS:+--rows $BATCHING_ROWS}
      cp bench/results/batching_h100.* "$RES/" 2>/dev/null
      tar czf "$OUT/session.tgz" -C "$W" . ;;
    long-qwen)  # issue 21's shapes; SWEEP=1 adds the kernels' knob sweep
      TAILN=40 run long-qwen 420 python3 -m bench.long_context --model qwen2.5-0.5b \
        --shapes 1x30000 32x8000 256x1000 --prefill 16000 ${SWEEP:+--sweep} \
        --json "$RES/long_context_qwen2.5-0.5b.json" ;;
    long-llama)
      TAILN=40 run long-llama 420 python3 -m bench.long_context --model llama-3-8b \
        --shapes 1x7900 16x4000 --prefill 8000 ${SWEEP:+--sweep} \
        --json "$RES/long_context_llama-3-8b.json" ;;
    decode-knobs)  # issue 21: the decode kernel's knobs at the batch-1 long-context shapes
      TAILN=3 run knobs-qwen 300 python3 -m bench.long_context --model qwen2.5-0.5b \
        --shapes 1x30000 --steps 8 --sweep --json "$RES/decode_knobs_qwen2.5-0.5b.json"
      TAILN=3 run knobs-llama 300 python3 -m bench.long_context --model llama-3-8b \
        --shapes 1x7900 --steps 8 --sweep --json "$RES/decode_knobs_llama-3-8b.json" ;;
    structured)  # issue 24's H200 target
      TAILN=12 run structured 300 python3 -m bench.structured_outputs --model qwen2.5-0.5b \
        --load-format dummy --dtype bfloat16 --outputs 0 --batch 64 --tokens 256 --profile \
        --json "$RES/structured_outputs_h200.json" ;;
    serve-ragged)  # issue 23's H200 target: the ragged 256 served against offline, same engine
      # API_SERVERS / LOAD_PROCS override the counts; the result's name then carries them
      A=${API_SERVERS:-8} L=${LOAD_PROCS:-6}
      TAILN=6 run serve-ragged-$A-$L 420 python3 -m bench.serving_overhead --model qwen2.5-0.5b \
        --load-format dummy --dtype bfloat16 --workload ragged --requests 256 \
        --max-num-seqs 256 --api-servers "$A" --load-procs "$L" \
        --json "$RES/serving_ragged${API_SERVERS:+_${A}x${L}}_h200.json" ;;
    gemv)  # issue 22 item 3: the linears at decode shapes, cuBLAS against a Triton GEMV
      TAILN=14 run gemv 420 python3 -m bench.gemv_bench --json "$RES/gemv.json" ;;
    decode)
      run decode-8b 300 python3 -m bench.decode_bench --model llama-3-8b --batch 1 \
        --json "$RES/decode_llama-3-8b_bs1.json"
      run decode-256 300 python3 -m bench.decode_bench --model qwen2.5-0.5b --batch 256 \
        --json "$RES/decode_qwen2.5-0.5b_bs256.json" ;;
  esac
done
