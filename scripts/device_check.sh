#!/usr/bin/env bash
# The GPU-node check, in one call: install the carried wheels, then the GPU tests and the
# benchmarks, and print one summary table.
#
#   bash scripts/device_check.sh          # from the repo root, .device_wheels carried
#
# The node (one H100/H200, Python 3.12, torch 2.11 cu13) has no DeepSpeed, DALI or network:
# scripts/fetch_device_wheels.sh fills .device_wheels here, and its DALI parts may come over
# several earlier calls to the same warm machine (see that script). Everything after the
# install shares one budget (DEVICE_CHECK_BUDGET, 470 s: under 8 minutes); each stage runs
# under `timeout` for its share, at most what is left, so a stage that hangs or fails is
# recorded and the next one still runs. Results: stdout and $OUT (./device_out when unset;
# at most 8 files come back from a call, so there are 7): summary.txt, install.txt,
# gpu_tests.txt, dali_tests.txt, bench_step.txt, bench_step.json, bench_data.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${DEVICE_WHEELS:-.device_wheels}
OUT=${OUT:-device_out}
SITE=${DEVICE_SITE:-/tmp/site}
BUDGET=${DEVICE_CHECK_BUDGET:-470}
SCRATCH=$(mktemp -d /tmp/device_check.XXXXXX)
mkdir -p "$OUT"
: > "$OUT/summary.txt"
ROWS=()

record() {  # stage status details
    ROWS+=("$(printf '%-26s %-7s %s' "$1" "$2" "${3:0:300}")")
}

stage_limit() {  # seconds a stage that wants $1 gets: at most what is left
    local left=$((DEADLINE - SECONDS))
    echo $(($1 < left ? $1 : left))
}

# run_stage NAME SECONDS LOG CMD...: CMD under `timeout` (SIGINT to its whole process group
# first, so pytest and bench_step stop their children and still report; SIGKILL 20 s later),
# output appended to LOG, its tail printed. Sets RC (124/137: timed out) and SPENT.
run_stage() {
    local name=$1 log=$3 limit t0=$SECONDS
    limit=$(stage_limit "$2")
    shift 3
    if ((limit < 20)); then
        RC=skip; SPENT=0
        echo "== $name: skipped, the budget is spent" | tee -a "$log"
        return
    fi
    local head="== $name (limit ${limit} s): ${LABEL:-$*}"
    echo "${head:0:240}"
    echo "$head" >> "$log"
    timeout -s INT -k 20 "$limit" "$@" > "$SCRATCH/stage.out" 2>&1
    RC=$?
    SPENT=$((SECONDS - t0))
    cat "$SCRATCH/stage.out" >> "$log"
    tail -n 12 "$SCRATCH/stage.out"
    ((RC == 124 || RC == 137)) && echo "== $name: timed out after ${limit} s" | tee -a "$log"
    LABEL=
}

status() {  # from RC: PASS / FAIL / TIMEOUT / SKIP
    case $RC in
        0) echo PASS ;; skip) echo SKIP ;; 124|137) echo TIMEOUT ;; *) echo FAIL ;;
    esac
}

pytest_line() {  # pytest's closing counts ("5 passed, 1 skipped in 80.1s"), or why none
    local line
    line=$(grep -E '[0-9]+ (passed|failed|error|errors|skipped|deselected)' "$SCRATCH/stage.out" \
           | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
    echo "${line:-$(last_line)}"
}

pytest_status() {  # as status, but a run that passed nothing (all skipped: no GPU?) is SKIP
    local st
    st=$(status)
    [[ $st == PASS ]] && ! pytest_line | grep -q passed && st=SKIP
    echo "$st"
}

last_line() {  # the stage's last line of output, or that it did not run
    if [[ $RC == skip ]]; then echo "not run: the budget is spent"
    else grep -v '^\s*$' "$SCRATCH/stage.out" | tail -n 1 | cut -c1-150; fi
}

# ---- install (outside the budget: bounded by its own timeouts) ----
INSTALL_LOG=$OUT/install.txt
: > "$INSTALL_LOG"
DALI_WHEELS=()

join_dali() {
    # The DALI wheels, from DIR/dali: already joined (a rerun on a warm machine), or joined
    # now from all the parts. SHA256SUMS lists the parts and the wheels inside them.
    local d=$DIR/dali sums=SHA256SUMS
    [[ -f $d/$sums ]] || { echo "no $d/$sums (carry it with any part)"; return 1; }
    mapfile -t wheels < <(grep '\.whl$' "$d/$sums" | awk '{print $2}')
    if (cd "$d" && grep '\.whl$' $sums | sha256sum --quiet --status -c - 2>/dev/null); then
        echo "DALI wheels already joined in $d"
    else
        mapfile -t parts < <(grep ' part-' "$d/$sums" | awk '{print $2}')
        local missing=() p
        for p in "${parts[@]}"; do [[ -f $d/$p ]] || missing+=("$p"); done
        if ((${#missing[@]})); then
            echo "DALI parts missing (not yet carried to this machine): ${missing[*]}"
            return 1
        fi
        (cd "$d" && grep ' part-' $sums | sha256sum --quiet -c -) \
            || { echo "a DALI part is corrupt"; return 1; }
        (cd "$d" && cat "${parts[@]}" | tar -x) || { echo "cannot unpack the DALI parts"; return 1; }
        (cd "$d" && grep '\.whl$' $sums | sha256sum --quiet -c -) \
            || { echo "a DALI wheel is corrupt"; return 1; }
        echo "joined ${#parts[@]} parts into ${#wheels[@]} wheels in $d"
    fi
    for p in "${wheels[@]}"; do DALI_WHEELS+=("$d/$p"); done
}

echo "== install" >> "$INSTALL_LOG"
if join_dali >> "$INSTALL_LOG" 2>&1; then
    record "dali wheels" PASS "$(tail -n 1 "$INSTALL_LOG")"
else
    record "dali wheels" FAIL "$(tail -n 1 "$INSTALL_LOG")"
fi
BASE_WHEELS=("$DIR"/base/*.whl)
[[ -e ${BASE_WHEELS[0]} ]] || BASE_WHEELS=()
# A rerun on a warm machine with the same wheels keeps /tmp/site (the DALI wheel alone
# takes ~20 s to install).
STAMP=$( (sha256sum "${BASE_WHEELS[@]}"; printf '%s\n' "${DALI_WHEELS[@]}"
          cat "$DIR/dali/SHA256SUMS" 2>/dev/null) | sha256sum | cut -c1-16)
if ((${#BASE_WHEELS[@]} + ${#DALI_WHEELS[@]} == 0)); then
    echo "no wheels in $DIR/base or $DIR/dali" | tee -a "$INSTALL_LOG"
    record "install" FAIL "no wheels in $DIR (carry .device_wheels/base)"
elif [[ -f $SITE/.stamp && $(cat "$SITE/.stamp") == "$STAMP" ]]; then
    record "install" PASS "kept $SITE (same wheels)"
else
    rm -rf "$SITE"
    t0=$SECONDS
    if timeout 300 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$SITE" "${BASE_WHEELS[@]}" "${DALI_WHEELS[@]}" >> "$INSTALL_LOG" 2>&1; then
        echo "$STAMP" > "$SITE/.stamp"
        n=$((${#BASE_WHEELS[@]} + ${#DALI_WHEELS[@]}))
        record "install" PASS "$n wheels into $SITE in $((SECONDS - t0)) s"
    else
        record "install" FAIL "pip install failed (install.txt)"
    fi
fi
tail -n +2 "$INSTALL_LOG" | grep -v "Running pip as the 'root' user" | tail -n 5
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
DEADLINE=$((SECONDS + BUDGET))

# ---- versions ----
CARD=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 \
       | head -n 1)
echo "== nvidia-smi: $CARD" | tee -a "$INSTALL_LOG"
LABEL="python3 -c (versions of python, torch, deepspeed, timm, dali)"
run_stage versions 60 "$INSTALL_LOG" python3 -c '
import importlib.util, sys
print("pytest-timeout", "yes" if importlib.util.find_spec("pytest_timeout") else "no")
try:
    import nvidia.dali as dali
    print("dali", dali.__version__)
except ImportError as e:
    print("dali NOT importable:", e)
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
import deepspeed, timm
from deepspeed.accelerator import get_accelerator
print("deepspeed", deepspeed.__version__, "accelerator", get_accelerator()._name, "| timm",
      timm.__version__)
assert torch.cuda.is_available() and get_accelerator()._name == "cuda", "no CUDA GPU"
'
if [[ $RC == 0 ]]; then
    record versions PASS "$(grep -E '^(python|deepspeed|dali)' "$SCRATCH/stage.out" | tr '\n' ' ')"
else
    record versions "$(status)" "$(last_line)"
fi
HAVE_DALI=0
grep -q '^dali [0-9]' "$SCRATCH/stage.out" && HAVE_DALI=1
HAVE_TIMEOUT=0  # pytest-timeout: a hung test fails with its traceback instead of the stage
grep -q '^pytest-timeout yes' "$SCRATCH/stage.out" && HAVE_TIMEOUT=1
per_test() { ((HAVE_TIMEOUT)) && echo "--timeout=$1"; }

# ---- tests ----
# -x is left out: the training runs of test_gpu.py run side by side from the start, so the
# tests after a failure cost seconds and still tell something.
LOG=$OUT/gpu_tests.txt
: > "$LOG"
run_stage "gpu tests" 280 "$LOG" python3 -m pytest -m gpu -q -rfEs -p no:cacheprovider \
    $(per_test 270) tests/test_gpu.py
record "gpu tests" "$(pytest_status)" "$(pytest_line), ${SPENT} s"

LOG=$OUT/dali_tests.txt
: > "$LOG"
if ((HAVE_DALI)); then
    run_stage "dali tests" 120 "$LOG" python3 -m pytest -q -rfEs -p no:cacheprovider \
        $(per_test 110) tests/test_dali.py
    record "dali tests" "$(pytest_status)" "$(pytest_line), ${SPENT} s"
else
    record "dali tests" SKIP "DALI not importable"
fi

# ---- benchmarks ----
# bench_step.py runs each (model, batch) in a child process; a trial limit below the stage's
# lets it stop its own children and still print its table.
LOG=$OUT/bench_step.txt
: > "$LOG"
bench_step() {  # name seconds json args...
    local name=$1 limit json=$3 trial=()
    limit=$(stage_limit "$2")
    shift 3
    if grep -q -- '--trial-timeout' scripts/bench_step.py && ((limit > 40)); then
        trial=(--trial-timeout $((limit - 20)))
    fi
    run_stage "$name" "$limit" "$LOG" python3 scripts/bench_step.py --steps 5 --warmup 2 \
        "${trial[@]}" --json "$SCRATCH/$json" "$@"
    local rows
    rows=$(python3 - "$SCRATCH/$json" <<'EOF' 2>/dev/null
import json, sys
out = []
for r in json.load(open(sys.argv[1])):
    head = f"{r['model']} b{r['batch_per_device']}"
    if "error" in r:
        out.append(f"{head}: {r['error']}")
    else:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        out.append(f"{head}: {r['step_ms']:.0f} ms/step {r['img_per_s']:.0f} img/s "
                   f"MFU {mfu} {r['peak_gib']:.1f} GiB")
print("; ".join(out))
EOF
)
    [[ -n $rows ]] || rows="no rows: $(last_line)"
    record "$name" "$(status)" "$rows, ${SPENT} s"
}
bench_step "step ViT-S/B zero1" 100 sb.json --models vit_small_16 vit_base_16 \
    --batch-sizes 64 --deepspeed_config ds_configs/zero1_bf16.json

LOG=$OUT/bench_data.txt
: > "$LOG"
if ((HAVE_DALI)); then
    # 256 synthetic ImageNet-sized JPEGs; DALI decoding and augmenting on the GPU, then the
    # torch loader with 8 workers for comparison
    run_stage "data dali gpu" 60 "$LOG" python3 scripts/bench_data.py --root "$SCRATCH/jpegs" \
        --synthesize 256 --loader dali --device gpu --workers 8 --batch 32 --steps 10
    rate=$(awk '$1 == "dali" && $2 == "gpu" {print $9 " img/s, first batch " $7 " s"}' \
           "$SCRATCH/stage.out")
    record "data dali gpu" "$(status)" "${rate:-$(last_line)}, ${SPENT} s"
else
    record "data dali gpu" SKIP "DALI not importable"
fi
run_stage "data torch x8" 45 "$LOG" python3 scripts/bench_data.py --root "$SCRATCH/jpegs" \
    --synthesize 256 --loader torch --workers 8 --batch 32 --steps 10
rate=$(awk '$1 == "torch" && $2 == "cpu" {print $9 " img/s"}' "$SCRATCH/stage.out")
record "data torch x8" "$(status)" "${rate:-$(last_line)}, ${SPENT} s"

LOG=$OUT/bench_step.txt
bench_step "step ViT-B/4 zero2 ckpt" 75 b4.json --models vit_base_4 --batch-sizes 8 \
    --deepspeed_config ds_configs/zero2_bf16.json meta.activation_checkpointing=1
bench_step "step ViT-L/7 zero2 ckpt" 75 l7.json --models vit_large_7 --batch-sizes 16 \
    --deepspeed_config ds_configs/zero2_bf16.json meta.activation_checkpointing=1
python3 - "$OUT/bench_step.json" "$SCRATCH"/{sb,b4,l7}.json <<'EOF' 2>/dev/null
import json, os, sys
rows = [r for p in sys.argv[2:] if os.path.exists(p) for r in json.load(open(p))]
json.dump(rows, open(sys.argv[1], "w"), indent=1)
EOF

# ---- summary ----
{
    echo "card: ${CARD:-unknown}"
    echo "host: $(nproc) CPUs; total ${SECONDS} s (budget after the install: ${BUDGET} s)"
    printf '%-26s %-7s %s\n' stage status details
    printf '%s\n' "${ROWS[@]}"
} | tee "$OUT/summary.txt"
rm -rf "$SCRATCH"
grep -qE '^.{27}(FAIL|TIMEOUT)' "$OUT/summary.txt" && exit 1
exit 0
