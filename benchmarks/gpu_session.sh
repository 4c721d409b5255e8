#!/usr/bin/env bash
# One GPU session: every package's CUDA tests, then the benchmarks, logs and JSON under $OUT
# (default ./gpu-out). Usage: bash benchmarks/gpu_session.sh [tests] [newlen] [dense] [ring]
# [sparse] [shapes] [decode] [hf] [cli] (default: all; PACKAGES="ring sparse" limits the tests).
# Each step has its own time limit, so one slow step never takes the rest.
set -uo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests newlen dense ring sparse shapes decode hf cli)
root="$(cd "$(dirname "$0")/.." && pwd)"
has() { local s; for s in "${steps[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
summary=()

if has tests; then
    # One package at a time, with pytest-xdist workers inside it when installed: the tests are
    # bound by compiles (Triton, CuTe, Inductor) more than by the GPU, but all five packages at
    # once ran an 80 GB H100 out of memory (the ring's world-of-one cases hold 65K-token judges).
    have_xdist=0
    python3 -c "import xdist" 2>/dev/null && have_xdist=1
    for pkg in ${PACKAGES:-core kernels ring longnet sparse}; do
        dir="$root/packages/dilated-$pkg/tests"
        [ -d "$dir" ] || continue
        workers=()
        [ $have_xdist = 1 ] && workers=(-n "${TEST_WORKERS:-4}")
        [ $have_xdist = 1 ] && [ "$pkg" = ring ] && workers=(-n 2)
        # 360 s: longnet's GPU tests compile a model twice (fullgraph, and transformers' static
        # cache); sparse's compile one CuTe kernel per mask rule and block shape.
        (cd "$dir" && timeout "${TEST_LIMIT:-360}" python3 -m pytest -q -m gpu -p no:cacheprovider \
            "${workers[@]}" . >"$OUT/gpu-tests-$pkg.log" 2>&1)
        summary+=("tests $pkg: $(tail -1 "$OUT/gpu-tests-$pkg.log")")
    done
fi
if has newlen; then
    # The first call at a length not seen before, against the steady call (engines' target).
    for causal in off on; do
        timeout 200 python3 "$root/benchmarks/kernels.py" --new-lengths --causal-modes $causal \
            --seqs ${NEWLEN_SEQS:-8192 16384 32768 65536} --json "$OUT/new-lengths-$causal.json" \
            >"$OUT/new-lengths-$causal.log" 2>&1
        summary+=("new lengths (causal $causal): $(grep -c '| no |' "$OUT/new-lengths-$causal.log") rows over target")
    done
fi
if has dense; then
    # The dense op on each engine against the cuDNN and flash-attn-4 ideals.
    timeout 420 python3 "$root/benchmarks/kernels.py" --seqs ${DENSE_SEQS:-65536 262144 1048576} \
        --causal-modes off on --methods ideal auto cudnn flash --ideal-backends cudnn fa4 \
        --json "$OUT/dense.json" >"$OUT/dense.log" 2>&1
    summary+=("dense: $(grep -c '^| ' "$OUT/dense.log") table lines")
fi
if has ring; then
    timeout 100 python3 "$root/benchmarks/ring.py" --iters 5 --out "$OUT/ring-world1.json" \
        >"$OUT/ring-world1.log" 2>&1
    timeout 240 python3 "$root/benchmarks/ring.py" --skip-world-of-one --simulate 2 4 8 \
        --iters 3 --out "$OUT/ring-sim.json" >"$OUT/ring-sim.log" 2>&1
    timeout 90 python3 "$root/benchmarks/ring.py" --skip-world-of-one --simulate 8 \
        --strategy allgather --no-check --iters 3 --out "$OUT/ring-sim-ag.json" \
        >"$OUT/ring-sim-ag.log" 2>&1
    summary+=("ring: see ring-*.log")
fi
if has sparse && [ -f "$root/benchmarks/sparse.py" ]; then
    timeout 300 python3 "$root/benchmarks/sparse.py" ${SPARSE_ARGS:-} --out "$OUT/sparse.json" \
        >"$OUT/sparse.log" 2>&1
    summary+=("sparse: $(tail -1 "$OUT/sparse.log")")
fi
if has shapes; then
    # Short sequences (eager and graphed), a packed batch, segments longer than the sequence.
    # auto against cudnn: flash-attn-4's Python wrapper against cuDNN's C++ path, host-bound.
    timeout 300 python3 "$root/benchmarks/shapes.py" ${SHAPES_ARGS:---backends auto cudnn} \
        --json "$OUT/shapes.json" \
        >"$OUT/shapes.log" 2>&1
    # The same short rows with the small-call rule off (flash-attn-4 at every size): the rule's
    # before/after in one session.
    DILATED_SMALL_CALLS_ON_SDPA_FLASH=0 timeout 200 python3 "$root/benchmarks/shapes.py" \
        --rows short --json "$OUT/shapes-rule-off.json" >"$OUT/shapes-rule-off.log" 2>&1
    summary+=("shapes: $(grep -c '^| ' "$OUT/shapes.log") table lines (rule off: shapes-rule-off.log)")
fi
if has decode; then
    # LongNetLM cached decoding after a 16K prompt: eager, and fast (the step from a CUDA graph).
    timeout 300 python3 "$root/benchmarks/decode.py" --parts lm --profile-eager \
        --json "$OUT/decode.json" \
        >"$OUT/decode.log" 2>&1
    summary+=("decode: $(grep -E '^\| (eager|fast) ' "$OUT/decode.log" | tr '\n' ' ')")
fi
if has hf; then
    # HF Llama with attn_implementation="dilated" against "sdpa": generate (dynamic and static
    # cache; transformers compiles the static one's step), then the training step.
    timeout 600 python3 "$root/benchmarks/decode.py" --parts hf-generate \
        --json "$OUT/hf-generate.json" >"$OUT/hf-generate.log" 2>&1
    timeout 480 python3 "$root/benchmarks/decode.py" --parts hf-train \
        --json "$OUT/hf-train.json" >"$OUT/hf-train.log" 2>&1
    summary+=("hf: see hf-generate.log, hf-train.log")
    for log in "$OUT/hf-generate.log" "$OUT/hf-train.log"; do
        [ -f "$log" ] && summary+=("$(grep -E '^\| dilated ' "$log" | tr '\n' ' ')")
    done
fi
if has cli; then
    timeout 120 dilated check >"$OUT/cli-check.log" 2>&1
    summary+=("dilated check: $(tail -1 "$OUT/cli-check.log")")
fi
for log in "$OUT"/ring-world1.log "$OUT"/ring-sim.log "$OUT"/ring-sim-ag.log; do
    [ -f "$log" ] && grep -v '^row ' "$log" | tail -16
done
printf '%s\n' "${summary[@]}"
