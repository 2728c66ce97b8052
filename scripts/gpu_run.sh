#!/usr/bin/env bash
# Everything that needs the GPU, in one call, with the image's python3 (never pip-installs torch):
#   1. the GPU tests (-m gpu), in parallel: they are compile-bound
#   2. the GPU fuzz profiles (tests/test_fuzz.py, SKATTN_FUZZ_EXAMPLES cases, default 2000;
#      tests/test_fuzz_serving_gpu.py, SKATTN_SERVING_FUZZ_EXAMPLES, default 160)
#   3. compute-sanitizer memcheck, racecheck and synccheck over tools/sanitize_cases.py
#      (racecheck and synccheck on its --quick cases), memcheck over tools/sanitize_serving.py
#      and tools/sanitize_quant.py, in the background beside 1 and 2 (racecheck over all
#      but the warp-specialised kernel's calls; those in a racecheck log of their own, gated
#      by scripts/racecheck_ws.py: hazards only at Triton's warp-specialisation protocol, which
#      scripts/ws_protocol_probe.py reproduces alone, in a log of its own: docs/prefill.md,
#      "Checking it")
#   4. `skattn bench` with the arguments given (e.g. --quick, --seed-table, --host)
#   5. optional stages, each a quick benchmark: `serving` (skattn bench --serving --quick, on
#      the graph timer, then eager: --timer event),
#      `quant` (skattn bench --quant, llama-8b; then skattn bench --serving --quick with
#      skattn auto over f16, FP8, q8_0 and q4_0 K/V; then tools/quant_prefill_ab.py: prompt
#      chunks over FP8 and q8_0 K/V, as stored and dequantized to f16 first), `prefill` (tools/prefill_ab.py --quick,
#      or PREFILL_ARGS),
#      `cb` (continuous-batching steps alone, tools/varlen_prefill.py; transformers'
#      generate_batch with CUDA graphs, tokens/s; eager, tokens/s; then with graphs again,
#      each attention launch and step shape recorded and GPU time by kernel,
#      tools/cb_bench.py --profile --kernels), `e2e` (skattn bench --e2e --quick: sdpa and skattn
#      over f16, FP8 and q8_0 caches), `prompt` (tools/prompt_square.py: whole prompts and
#      long chunks, plan variants and SDPA flash; PROMPT_CELLS overrides its cells), `pdl`
#      (the main kernel launched by PDL against auto, same runs: decode cells on the graph
#      timer, skattn:auto vs skattn:auto-nowait; serving mixes, auto vs auto/pdl_wait=0),
#      `host` (skattn bench --host: decode, n = 1 Lk = 256, then a prompt chunk, n = 128
#      Lk = 2048; host/host.csv and host/host-prompt.csv of benchmarks/results), `ws` (the
#      serving plans' Hopper whole-tile kernel, `Tuning(prefill="ws")`: its GPU tests and the
#      serving tests, memcheck over tools/sanitize_serving.py, then mixed batches and their
#      chunks, auto against prefill=ws, with 128-key blocks too: llama-8b, gpt-oss)
# PACK=1 leaves $OUT as summary.txt and results.tar.gz (every log and result file inside).
# STAGES="tests fuzz sanitize bench" picks stages (default those four); TESTS="files" limits
# the GPU tests to those files. On a machine whose Triton cache is cold, "tests sanitize" took
# over 590 s on an H200 (the sanitizers beside the tests run slower than alone, where the
# three racechecks took 140 s): under a 10-minute limit run STAGES=tests and STAGES=sanitize
# as two calls. Logs and results go to $OUT (or
# benchmarks/results/latest); the last lines printed are a short summary.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR="${OUT:-benchmarks/results/latest}"
STAGES="${STAGES:-tests fuzz sanitize bench}"
mkdir -p "$OUT_DIR"
summary=()
rc=0
has() { [[ " $STAGES " == *" $1 "* ]]; }

nvidia-smi -L || echo "nvidia-smi failed"
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, \
'| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"

# the sanitizers run beside the tests (they are slow and use one GPU stream each)
sanitize_pids=()
if has sanitize; then
    python3 tools/sanitize_cases.py > /dev/null 2>&1  # compile outside the sanitizer first
    for tool in memcheck racecheck synccheck; do
        quick=$([ "$tool" = memcheck ] || echo --quick)
        # racecheck gates the kernels but the warp-specialised one (see below)
        only=$([ "$tool" = racecheck ] && echo --no-ws)
        compute-sanitizer --tool "$tool" --error-exitcode 9 python3 tools/sanitize_cases.py $quick \
            $only > "$OUT_DIR/sanitize-$tool.log" 2>&1 &
        sanitize_pids+=("$tool:$!")
    done
    for cases in serving quant; do  # the ragged/paged and quantized kernels under memcheck
        python3 tools/sanitize_$cases.py > /dev/null 2>&1
        compute-sanitizer --tool memcheck --error-exitcode 9 python3 tools/sanitize_$cases.py \
            > "$OUT_DIR/sanitize-memcheck-$cases.log" 2>&1 &
        sanitize_pids+=("memcheck-$cases:$!")
    done
    # racecheck over the warp-specialised kernel's calls (gated below by scripts/racecheck_ws.py)
    # and over Triton's warp-specialisation protocol alone (docs/prefill.md, "Checking it")
    (compute-sanitizer --tool racecheck python3 tools/sanitize_cases.py --quick --ws \
        > "$OUT_DIR/sanitize-racecheck-ws.log" 2>&1
     compute-sanitizer --tool racecheck python3 scripts/ws_protocol_probe.py \
        > "$OUT_DIR/sanitize-racecheck-ws-probe.log" 2>&1) &
    ws_race_pid=$!
fi
workers() { python3 -c "import xdist" 2>/dev/null && echo "-n $1" || echo ""; }
# a test still running after this many seconds has its threads' stacks dumped to the log
# (pytest's faulthandler), and each stage is stopped after STAGE_LIMIT seconds, so one hung
# kernel costs its stage, not the whole call; a GPU test still running after
# SKATTN_TEST_TIMEOUT seconds (240 here; the fuzz shards run longer, so 0 = off there) ends
# its process with every stack printed (tests/conftest.py)
HANG_DUMP_S=${HANG_DUMP_S:-150}
STAGE_LIMIT=${STAGE_LIMIT:-420}
if has tests; then
    SKATTN_TEST_TIMEOUT=${SKATTN_TEST_TIMEOUT:-240} \
    timeout "$STAGE_LIMIT" python3 -m pytest -v -rfE -m "gpu and not serial" $(workers 8) -p no:cacheprovider \
        -o faulthandler_timeout="$HANG_DUMP_S" ${TESTS:-tests} --ignore=tests/test_fuzz.py \
        --ignore=tests/test_fuzz_serving_gpu.py \
        2>&1 | tee "$OUT_DIR/gpu_tests.log"
    t=${PIPESTATUS[0]}; [ "$t" -ne 0 ] && rc=$t
    summary+=("gpu tests: $(tail -n 1 "$OUT_DIR/gpu_tests.log")")
fi
if has fuzz; then
    SKATTN_TEST_TIMEOUT=0 timeout "$STAGE_LIMIT" python3 -m pytest -q -m gpu -s $(workers 4) -p no:cacheprovider \
        -o faulthandler_timeout="$HANG_DUMP_S" tests/test_fuzz.py 2>&1 \
        | tee "$OUT_DIR/fuzz.log"
    t=${PIPESTATUS[0]}; [ "$t" -ne 0 ] && rc=$t
    summary+=("gpu fuzz: $(grep -h 'passed .* cases' "$OUT_DIR/fuzz.log" | tr '\n' ' ') | $(tail -n 1 "$OUT_DIR/fuzz.log")")
    # the serving functions' fuzz, under a limit of its own (its kernels compile per case)
    SKATTN_TEST_TIMEOUT=0 timeout "$STAGE_LIMIT" python3 -m pytest -q -m gpu $(workers 4) -p no:cacheprovider \
        -o faulthandler_timeout="$HANG_DUMP_S" tests/test_fuzz_serving_gpu.py 2>&1 \
        | tee "$OUT_DIR/fuzz-serving.log"
    t=${PIPESTATUS[0]}; [ "$t" -ne 0 ] && rc=$t
    summary+=("gpu serving fuzz: $(tail -n 1 "$OUT_DIR/fuzz-serving.log")")
fi
for entry in "${sanitize_pids[@]}"; do
    tool=${entry%%:*}
    wait "${entry#*:}"; t=$?; [ "$t" -ne 0 ] && rc=$t
    errors=$(grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" "$OUT_DIR/sanitize-$tool.log" | tail -n 1)
    summary+=("sanitizer $tool: exit $t; ${errors:-no summary}; $(grep -h 'sanitize .*cases' "$OUT_DIR/sanitize-$tool.log")")
done
if has sanitize; then
    wait "$ws_race_pid"
    # the warp-specialised calls: every hazard at the protocol's two places, none elsewhere
    gate=$(python3 scripts/racecheck_ws.py "$OUT_DIR/sanitize-racecheck-ws.log"); t=$?
    [ "$t" -ne 0 ] && rc=$t
    summary+=("$gate; $(grep -h 'cases:' "$OUT_DIR/sanitize-racecheck-ws.log")")
    summary+=("racecheck ws-probe (informative): $(grep -h 'probe\|RACECHECK SUMMARY' \
        "$OUT_DIR/sanitize-racecheck-ws-probe.log" | tr '\n' ' ')")
fi
if has tests; then  # wall-clock host timings, alone on the machine
    python3 -m pytest -q -m "gpu and serial" -p no:cacheprovider ${TESTS:-tests} 2>&1 | tee "$OUT_DIR/gpu_serial.log"
    t=${PIPESTATUS[0]}; [ "$t" -ne 0 ] && rc=$t
    summary+=("gpu tests timed alone: $(tail -n 1 "$OUT_DIR/gpu_serial.log")")
fi
if has bench; then
    python3 -m skattn.cli bench "$@" --out "$OUT_DIR"
    t=$?; [ "$t" -ne 0 ] && rc=$t
    summary+=("bench $*: exit $t")
fi
quick_bench() {  # name, command...: a quick benchmark stage, its log and exit status
    local name=$1; shift
    timeout "$STAGE_LIMIT" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    t=${PIPESTATUS[0]}; [ "$t" -ne 0 ] && rc=$t
    summary+=("$name: exit $t")
}
has prefill && quick_bench prefill env OUT="$OUT_DIR/prefill" python3 tools/prefill_ab.py ${PREFILL_ARGS:---quick}
has serving && quick_bench serving python3 -m skattn.cli bench --serving --quick --no-progress \
    --time-limit 100 --out "$OUT_DIR/serving"
has serving && quick_bench serving-eager python3 -m skattn.cli bench --serving --quick \
    --no-progress --timer event --tag eager --time-limit 100 --out "$OUT_DIR/serving"
has cb && quick_bench varlen-steps env OUT="$OUT_DIR/cb" python3 tools/varlen_prefill.py
has cb && quick_bench cb env OUT="$OUT_DIR/cb" python3 tools/cb_bench.py --layers 8 --requests 32 \
    --providers "paged|skattn,paged|skattn_one,paged|sdpa" --graphs --reps 2
has cb && quick_bench cb-eager env OUT="$OUT_DIR/cb-eager" python3 tools/cb_bench.py --layers 8 \
    --requests 32 --providers "paged|skattn,paged|sdpa" --reps 2
has cb && quick_bench cb-profile env OUT="$OUT_DIR/cb-profile" python3 tools/cb_bench.py --layers 8 \
    --requests 32 --providers "paged|skattn,paged|sdpa" --graphs --profile --kernels --reps 1
has quant && quick_bench quant python3 -m skattn.cli bench --quant --models llama-8b --n 1,16,512 \
    --no-progress --time-limit 70 --out "$OUT_DIR/quant"
has quant && quick_bench quant-serving python3 -m skattn.cli bench --serving --quick --no-progress \
    --providers skattn:auto,skattn-fp8:auto,skattn-q8_0:auto,skattn-q4_0:auto --time-limit 150 \
    --out "$OUT_DIR/quant-serving"
has quant && quick_bench quant-prefill env OUT="$OUT_DIR/quant-prefill" python3 tools/quant_prefill_ab.py
has e2e && quick_bench e2e python3 -m skattn.cli bench --e2e --quick --no-progress \
    --providers sdpa,skattn:auto,skattn-fp8:auto,skattn-q8_0:auto --out "$OUT_DIR/e2e"
has prompt && quick_bench prompt env OUT="$OUT_DIR/prompt" python3 tools/prompt_square.py \
    --cells "${PROMPT_CELLS:-llama-8b:2048:2048,llama-8b:8192:8192,gpt-oss:8192:8192,qwen3-14b:8192:8192,llama-8b:512:8192,qwen3-14b:1024:32768}"
has host && quick_bench host python3 -m skattn.cli bench --host --no-progress --out "$OUT_DIR/host"
has host && quick_bench host-prompt python3 -m skattn.cli bench --host --n 128 --depth 2048 \
    --no-progress --out "$OUT_DIR/host-prompt"
has pdl && quick_bench pdl-decode python3 -m skattn.cli bench --n 1,4,16 \
    --models llama-8b,qwen3-14b,gpt-oss --providers skattn:auto,skattn:auto-nowait \
    --timer graph --reps 20 --time-limit 300 --no-progress --out "$OUT_DIR/pdl"
has pdl && quick_bench pdl-serving env OUT="$OUT_DIR/pdl" python3 tools/serving_sweep.py \
    --mixes equal,one-long,lognormal --pages 16 --variants "auto;auto/pdl_wait=0"
# (the dense prompt kernel's tests too: it shares its Gluon helpers with the serving kernel)
has ws && quick_bench ws-tests python3 -m pytest -q -rfE -m gpu $(workers 8) -p no:cacheprovider \
    tests/test_serving_ws_gpu.py tests/test_serving_gpu.py tests/test_gpu_prefill_ws.py
has ws && quick_bench ws-memcheck compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 tools/sanitize_serving.py
has ws && quick_bench ws-ab env OUT="$OUT_DIR/ws-ab" python3 tools/serving_sweep.py \
    --models llama-8b,gpt-oss --mixes mixed,mixed-chunk --pages 16,64 --reps 20 \
    --variants "auto;auto/prefill=ws;auto/prefill=ws,block_n=128"
echo "== summary"
printf '%s\n' "${summary[@]}" | tee "$OUT_DIR/summary.txt"
if [ -n "${PACK:-}" ]; then  # one archive of every log and result (for hosts that return few files)
    tar -czf /tmp/gpu_run.tar.gz -C "$OUT_DIR" . && find "$OUT_DIR" -mindepth 1 ! -name summary.txt \
        -delete && mv /tmp/gpu_run.tar.gz "$OUT_DIR/results.tar.gz"
fi
exit "$rc"
