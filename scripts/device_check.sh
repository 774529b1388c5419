#!/usr/bin/env bash
# The prepared check for a lent GPU machine (one H100/H200, Python 3.12, torch 2.11 cu13, no
# DeepSpeed, no DALI, no network), in two separate calls. docs/device-check.md gives the call
# sequence; this script is the command of each call.
#
#   bash scripts/device_check.sh --core [--dry-run]   # first, and alone if time is short
#   bash scripts/device_check.sh --dali [--dry-run]   # only after --core passed, time left
#
# --core: install DeepSpeed and its small dependencies (.device_wheels/base, carried: no DALI,
#   no optree), `pytest -m gpu` without the DALI tests, bench_step.py for ViT-S/16 and B/16 at
#   batch 256 and ViT-L/7 at 32 (ZeRO-1 bf16, each beside a plain PyTorch step: ours/plain),
#   one 20-step train.py run on synthetic JPEGs with the torch loader, and a summary table.
# --dali: DALI (its parts carried one call each beforehand), its tests on the GPU and the
#   DALI GPU loader against the torch loader.
#
# Each stage runs under `timeout` for its budget (at most what is left of the call's), so a
# stage that runs out is reported TIMEOUT and the next one still runs; stages that cannot
# work without an earlier one (no install: no tests) are reported SKIP. Budgets sum to at
# most 360 s (--core) and 240 s (--dali), summary included. --dry-run prints the stages,
# their budgets and commands, and the files the call carries with their sizes; it runs
# nothing. Results: stdout and $OUT (./device_out when unset; at most 8 files come back):
# summary.md (the table), one log per stage group, bench_step.json.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE= DRY=0
for a in "$@"; do
    case $a in
        --core) MODE=core ;;
        --dali) MODE=dali ;;
        --dry-run) DRY=1 ;;
        *) echo "usage: bash scripts/device_check.sh --core|--dali [--dry-run]" >&2; exit 2 ;;
    esac
done
[[ -n $MODE ]] || { echo "usage: bash scripts/device_check.sh --core|--dali [--dry-run]" >&2
                    exit 2; }

DIR=${DEVICE_WHEELS:-.device_wheels}
OUT=${OUT:-device_out}
SITE=${DEVICE_SITE:-/tmp/site}            # the core wheels (kept between calls: same stamp)
DALI_SITE=${DEVICE_DALI_SITE:-/tmp/site_dali}
SUMMARY_S=10                              # kept back for the summary and the glue between
TIMEOUT_S=(core 420 dali 300)             # the run call's timeout_s: the total plus margin

# ---- the stages: name, budget (s), what it runs (its command is in stage_<id> below) ----
CORE_STAGES=(
    "install|20|pip install --no-deps the carried $DIR/base wheels into $SITE"
    "versions|20|python3: torch, CUDA, the card, deepspeed, timm import"
    "gpu tests|150|pytest -m gpu -k 'not dali' tests/test_gpu.py"
    "step S/16,B/16 b256|75|bench_step.py --baseline plain vit_small_16 vit_base_16, batch 256, zero1_bf16"
    "step L/7 b32|45|bench_step.py --baseline plain vit_large_7, batch 32, zero1_bf16"
    "train 20 steps|40|train.py ViT-S/16 b64 zero1_bf16, 20 steps, 256 synthetic JPEGs, torch loader x12"
)
DALI_STAGES=(
    "install dali|45|join $DIR/dali/part-*, pip install --no-deps dali_base + DALI into $DALI_SITE"
    "versions|15|python3: torch, CUDA, deepspeed, nvidia.dali import"
    "dali tests|120|pytest -k dali tests/test_dali.py tests/test_gpu.py"
    "data dali gpu|30|bench_data.py --loader dali --device gpu, 256 synthetic JPEGs, batch 32"
    "data torch x8|20|bench_data.py --loader torch --workers 8, the same JPEGs"
)
if [[ $MODE == core ]]; then STAGES=("${CORE_STAGES[@]}"); LIMIT=360; else
    STAGES=("${DALI_STAGES[@]}"); LIMIT=240; fi
budget_of() {  # budget of the stage named $1
    local s
    for s in "${STAGES[@]}"; do
        [[ ${s%%|*} == "$1" ]] && { s=${s#*|}; echo "${s%%|*}"; return; }
    done
    echo 0
}
TOTAL=$SUMMARY_S
for s in "${STAGES[@]}"; do b=${s#*|}; TOTAL=$((TOTAL + ${b%%|*})); done

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
tree_bytes() {  # what travels besides the carry list: tracked and untracked-not-ignored files
    git ls-files -z -co --exclude-standard 2>/dev/null | xargs -0 stat -c %s 2>/dev/null \
        | awk '{ t += $1 } END { print t + 0 }'
}

# the carried files of one call, with sizes: carry_list PATH... (directories expand)
carry_list() {
    local p f total=0 sz
    for p in "$@"; do
        for f in $( [[ -d $p ]] && ls -d "$p"/* || echo "$p" ); do
            if [[ -f $f ]]; then
                sz=$(stat -c %s "$f")
                printf '    %10d  %s\n' "$sz" "$f"
                total=$((total + sz))
            else
                printf '    %10s  %s (missing)\n' - "$f"
            fi
        done
    done
    CARRY_BYTES=$total
}

dry_run() {
    echo "device_check.sh --$MODE: ${#STAGES[@]} stages; budgets sum to $((TOTAL - SUMMARY_S)) s" \
         "+ $SUMMARY_S s for the summary = $TOTAL s (limit $LIMIT s = $((LIMIT / 60)) min)"
    printf '  %-22s %8s  %s\n' stage "budget s" "what it runs"
    local s name rest
    for s in "${STAGES[@]}"; do
        name=${s%%|*}; rest=${s#*|}
        printf '  %-22s %8s  %s\n' "$name" "${rest%%|*}" "${rest#*|}"
    done
    printf '  %-22s %8s\n' "(summary)" "$SUMMARY_S"
    printf '  %-22s %8s\n' total "$TOTAL"
    local tree
    tree=$(tree_bytes)
    if [[ $MODE == core ]]; then
        echo "carry: [\"$DIR/base\"]"
        if [[ -n $(ls "$DIR"/base/*.whl 2>/dev/null) ]]; then
            carry_list "$DIR/base"
        else
            echo "  not fetched yet: bash scripts/fetch_device_wheels.sh --core would fetch" \
                 "(sizes as last fetched):"
            local name sz
            CARRY_BYTES=0
            while read -r name sz; do
                printf '    %10d  %s/base/%s\n' "$sz" "$DIR" "$name"
                CARRY_BYTES=$((CARRY_BYTES + sz))
            done < <(bash scripts/fetch_device_wheels.sh --list)
        fi
        echo "  carried files: $CARRY_BYTES bytes ($(mib "$CARRY_BYTES")); bar: 20 MiB or less"
        echo "  the working tree travels besides: $tree bytes ($(mib "$tree")); call total" \
             "$(mib $((CARRY_BYTES + tree))) of 64 MiB"
        echo "run: command \"bash scripts/device_check.sh --core\", carry [\"$DIR/base\"]," \
             "timeout_s ${TIMEOUT_S[1]}"
        return
    fi
    local sums=$DIR/dali/SHA256SUMS parts=() p i=0
    if [[ ! -f $sums ]]; then
        echo "  DALI not fetched yet: bash scripts/fetch_device_wheels.sh fetches dali_base" \
             "(~5.6 MiB) and 5 parts of DALI (~251 MiB)"
        return
    fi
    mapfile -t parts < <(grep ' part-' "$sums" | awk '{print $2}')
    for p in "${parts[@]:0:${#parts[@]}-1}"; do
        i=$((i + 1))
        echo "call $i of $((${#parts[@]})): command \"true\", timeout_s 60, carry" \
             "[\"$DIR/dali/$p\", \"$sums\"]"
        carry_list "$DIR/dali/$p" "$sums"
        echo "    carried $(mib "$CARRY_BYTES"); with the tree $(mib $((CARRY_BYTES + tree))) of 64 MiB"
    done
    p=${parts[-1]}
    echo "call ${#parts[@]} of ${#parts[@]}: command \"bash scripts/device_check.sh --dali\"," \
         "timeout_s ${TIMEOUT_S[3]}, carry [\"$DIR/base\", \"$DIR/dali_base\", \"$DIR/dali/$p\"," \
         "\"$sums\"]"
    carry_list "$DIR/base" "$DIR/dali_base" "$DIR/dali/$p" "$sums"
    echo "    carried $(mib "$CARRY_BYTES"); with the tree $(mib $((CARRY_BYTES + tree))) of 64 MiB"
}

if ((DRY)); then
    dry_run
    exit 0
fi

# ---- running ----
SCRATCH=$(mktemp -d /tmp/device_check.XXXXXX)
mkdir -p "$OUT"
DEADLINE=$((SECONDS + TOTAL - SUMMARY_S))
ROWS=()        # markdown rows of the stage table
declare -A ST  # stage name -> PASS / FAIL / TIMEOUT / SKIP

record() {  # name status spent details
    ST[$1]=$2
    local d=${4//|/\\|}
    ROWS+=("| $1 | $2 | $(budget_of "$1") | $3 | ${d:0:400} |")
    printf '== %-22s %-7s %4s s  %s\n' "$1" "$2" "$3" "${4:0:200}"
}

# run_stage NAME LOG CMD...: CMD under `timeout` for the stage's budget, at most what is left
# (SIGINT to its process group first, so pytest and bench_step stop their children and still
# report; SIGKILL 10 s later); output appended to LOG and its tail printed. Sets RC
# (124/137: timed out; skip: no time left) and SPENT.
run_stage() {
    local name=$1 log=$2 limit t0=$SECONDS
    shift 2
    limit=$(budget_of "$name")
    local left=$((DEADLINE - SECONDS))
    ((left < limit)) && limit=$left
    # test seam: every stage's limit capped (tests/test_bench.py runs the stages on stubs)
    [[ -n ${DEVICE_CHECK_CAP:-} ]] && ((DEVICE_CHECK_CAP < limit)) && limit=$DEVICE_CHECK_CAP
    : > "$SCRATCH/stage.out"
    if ((left < 5)); then
        RC=skip; SPENT=0
        echo "== $name: not run, the call's budget is spent" | tee -a "$log"
        return
    fi
    local cmd="$*"
    cmd=${cmd//$'\n'/ }
    echo "== $name (limit ${limit} s): ${cmd:0:200}" | tr -s ' ' | tee -a "$log"
    timeout -s INT -k 10 "$limit" "$@" > "$SCRATCH/stage.out" 2>&1
    RC=$?
    SPENT=$((SECONDS - t0))
    cat "$SCRATCH/stage.out" >> "$log"
    tail -n 8 "$SCRATCH/stage.out"
    if ((RC == 124 || RC == 137)) || [[ $RC == 130 && $SPENT -ge $limit ]]; then
        RC=124
        echo "== $name: timed out after ${limit} s" | tee -a "$log"
    fi
}
status() {  # from RC
    case $RC in 0) echo PASS ;; skip) echo SKIP ;; 124|137) echo TIMEOUT ;; *) echo FAIL ;; esac
}
last_line() {
    if [[ $RC == skip ]]; then echo "not run: the call's budget is spent"
    else grep -v '^\s*$' "$SCRATCH/stage.out" | tail -n 1 | cut -c1-200; fi
}
pytest_line() {  # pytest's closing counts, or the last line
    local line
    line=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)' "$SCRATCH/stage.out" \
           | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
    echo "${line:-$(last_line)}"
}
pytest_status() {  # as status, but a run that passed nothing (all skipped: no GPU?) is SKIP
    local st
    st=$(status)
    [[ $st == PASS ]] && ! pytest_line | grep -q passed && st=SKIP
    echo "$st"
}
skip_unless() {  # name needed...: records SKIP unless every needed stage passed
    local name=$1 n
    shift
    for n in "$@"; do
        if [[ ${ST[$n]:-} != PASS ]]; then
            record "$name" SKIP 0 "not run: $n did not pass"
            return 1
        fi
    done
}

# install_wheels SITE WHEELS...: pip install --no-deps into SITE, kept when SITE holds the
# same wheels already (a rerun on the same warm machine)
install_wheels() {
    local site=$1 stamp
    shift
    (($#)) || { echo "no wheels to install"; return 1; }
    stamp=$(sha256sum "$@" | sha256sum | cut -c1-16)
    if [[ -f $site/.stamp && $(cat "$site/.stamp") == "$stamp" ]]; then
        echo "kept $site: the same $# wheels are installed"
        return 0
    fi
    rm -rf "$site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$@" 2>&1 | { grep -v "Running pip as the 'root' user" || true; }
    ((PIPESTATUS[0] == 0)) || return 1
    echo "$stamp" > "$site/.stamp"
    echo "installed $# wheels into $site"
}
export -f install_wheels

export PYTHONPATH=$SITE:$DALI_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
CARD=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 \
       | head -n 1)
echo "== card: $CARD; $(nproc) CPUs; mode --$MODE, budget $TOTAL s"

versions_stage() {  # name log extra-python
    run_stage "$1" "$2" python3 -c '
import importlib.util, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
print("pytest-timeout", "yes" if importlib.util.find_spec("pytest_timeout") else "no")
import deepspeed, timm
from deepspeed.accelerator import get_accelerator
print("deepspeed", deepspeed.__version__, "accelerator", get_accelerator()._name,
      "| timm", timm.__version__)
'"$3"'
assert torch.cuda.is_available() and get_accelerator()._name == "cuda", "no CUDA GPU"
'
    if [[ $RC == 0 ]]; then
        record "$1" PASS "$SPENT" "$(grep -E '^(python|deepspeed|dali)' "$SCRATCH/stage.out" \
                                     | tr '\n' ' ')"
    else
        record "$1" "$(status)" "$SPENT" "$(last_line)"
    fi
    PER_TEST=()  # pytest-timeout: a hung test fails with its traceback, not the whole stage
    grep -q '^pytest-timeout yes' "$SCRATCH/stage.out" && PER_TEST=(--timeout=100)
}

# bench_stage NAME JSON ARGS...: bench_step.py with the plain baseline; the trial limit is the
# stage's less 15 s, so that a hung trial becomes a row and the table is still printed
bench_stage() {
    local name=$1 json=$SCRATCH/$2 limit
    shift 2
    limit=$(budget_of "$name")
    run_stage "$name" "$OUT/bench_step.txt" python3 scripts/bench_step.py --baseline plain \
        --steps 5 --warmup 2 --trial-timeout $((limit - 15)) --json "$json" \
        --deepspeed_config ds_configs/zero1_bf16.json "$@"
    local rows
    rows=$(python3 - "$json" <<'EOF' 2>/dev/null
import json, sys
out = []
for r in json.load(open(sys.argv[1])):
    if r.get("step") == "plain":
        continue
    head = f"{r['model']} b{r['batch_per_device']}"
    if "error" in r:
        out.append(f"{head}: {r['error']}")
    else:
        x = r.get("ours_over_plain")
        out.append(f"{head}: {r['img_per_s']:.0f} img/s, ours/plain "
                   + (f"{x:.2f}" if x is not None else "-"))
print("; ".join(out))
EOF
)
    record "$name" "$(status)" "$SPENT" "${rows:-no rows: $(last_line)}"
}

core() {
    local log=$OUT/install.txt wheels=("$DIR"/base/*.whl)
    [[ -e ${wheels[0]} ]] || wheels=()
    run_stage install "$log" bash -c 'install_wheels "$@"' _ "$SITE" "${wheels[@]}"
    record install "$(status)" "$SPENT" "$(last_line)"

    if skip_unless versions install; then
        versions_stage versions "$log" ""
    fi

    log=$OUT/gpu_tests.txt
    : > "$log"
    if skip_unless "gpu tests" versions; then
        run_stage "gpu tests" "$log" python3 -m pytest -m gpu -k "not dali" -q -rfEs \
            -p no:cacheprovider "${PER_TEST[@]}" tests/test_gpu.py
        record "gpu tests" "$(pytest_status)" "$SPENT" "$(pytest_line)"
    fi

    : > "$OUT/bench_step.txt"
    if skip_unless "step S/16,B/16 b256" versions; then
        bench_stage "step S/16,B/16 b256" sb.json --models vit_small_16 vit_base_16 \
            --batch-sizes 256
    fi
    if skip_unless "step L/7 b32" versions; then
        bench_stage "step L/7 b32" l7.json --models vit_large_7 --batch-sizes 32
    fi
    python3 - "$OUT/bench_step.json" "$SCRATCH"/{sb,l7}.json <<'EOF' 2>/dev/null
import json, os, sys
rows = [r for p in sys.argv[2:] if os.path.exists(p) for r in json.load(open(p))]
json.dump(rows, open(sys.argv[1], "w"), indent=1)
EOF

    log=$OUT/train.txt
    : > "$log"
    if skip_unless "train 20 steps" versions; then
        local run=$SCRATCH/train_run
        run_stage "train 20 steps" "$log" bash -c '
            python3 -c "import sys; sys.path.insert(0, \"scripts\"); import bench_data
bench_data.synthesize(sys.argv[1], 256)" "$1/synth/train" || exit 1
            python3 train.py --config configs/pretrain/msn_vits16.yaml \
                --deepspeed_config ds_configs/zero1_bf16.json --max-steps 20 \
                data.root_path="$1" data.image_folder=synth data.num_workers=12 \
                data.loader=torch criterion.batch_size=64 logging.folder="$2" \
                logging.log_every=10' _ "$SCRATCH" "$run"
        local detail
        detail=$(python3 - "$run/metrics.jsonl" <<'EOF' 2>/dev/null
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
r = rows[-1]
print(f"step {r['step']}: loss {r['loss']:.3f}, {r['img_per_s']:.0f} img/s, "
      f"data wait {r.get('data_wait_frac', float('nan')):.2f}, peak {r.get('peak_mem_gib', 0):.1f} GiB, "
      f"{sum(x.get('skipped', 0) for x in rows)} skipped")
EOF
)
        [[ -f $run/metrics.jsonl ]] && { echo "== metrics.jsonl"; cat "$run/metrics.jsonl"; } >> "$log"
        record "train 20 steps" "$(status)" "$SPENT" "${detail:-$(last_line)}"
    fi
}

dali() {
    local log=$OUT/install.txt
    run_stage "install dali" "$log" bash -c '
        set -e
        dir=$1 site=$2 dsite=$3
        core=("$dir"/base/*.whl)
        [[ -e ${core[0]} ]] && install_wheels "$site" "${core[@]}"
        d=$dir/dali
        [[ -f $d/SHA256SUMS ]] || { echo "no $d/SHA256SUMS (carry it with every part)"; exit 1; }
        mapfile -t wheels < <(grep "\.whl$" "$d/SHA256SUMS" | awk "{print \$2}")
        if ! (cd "$d" && grep "\.whl$" SHA256SUMS | sha256sum --quiet --status -c - 2>/dev/null); then
            mapfile -t parts < <(grep " part-" "$d/SHA256SUMS" | awk "{print \$2}")
            for p in "${parts[@]}"; do
                [[ -f $d/$p ]] || { echo "DALI part $p is not on this machine (carry the parts" \
                                         "one call each to the same warm machine)"; exit 1; }
            done
            (cd "$d" && grep " part-" SHA256SUMS | sha256sum --quiet -c -)
            (cd "$d" && cat "${parts[@]}" | tar -x)
            (cd "$d" && grep "\.whl$" SHA256SUMS | sha256sum --quiet -c -)
            echo "joined ${#parts[@]} parts into ${#wheels[@]} wheels"
        fi
        install_wheels "$dsite" "$dir"/dali_base/*.whl "${wheels[@]/#/$d/}"
    ' _ "$DIR" "$SITE" "$DALI_SITE"
    record "install dali" "$(status)" "$SPENT" "$(last_line)"

    if skip_unless versions "install dali"; then
        versions_stage versions "$log" '
import nvidia.dali as dali
print("dali", dali.__version__)'
    fi

    log=$OUT/dali_tests.txt
    : > "$log"
    if skip_unless "dali tests" versions; then
        run_stage "dali tests" "$log" python3 -m pytest -k dali -q -rfEs -p no:cacheprovider \
            "${PER_TEST[@]}" tests/test_dali.py tests/test_gpu.py
        record "dali tests" "$(pytest_status)" "$SPENT" "$(pytest_line)"
    fi

    log=$OUT/bench_data.txt
    : > "$log"
    local jpegs=$SCRATCH/jpegs rate
    if skip_unless "data dali gpu" versions; then
        run_stage "data dali gpu" "$log" python3 scripts/bench_data.py --root "$jpegs" \
            --synthesize 256 --loader dali --device gpu --workers 8 --batch 32 --steps 10
        rate=$(awk '$1 == "dali" && $2 == "gpu" {print $9 " img/s, first batch " $7 " s"}' \
               "$SCRATCH/stage.out")
        record "data dali gpu" "$(status)" "$SPENT" "${rate:-$(last_line)}"
    fi
    if skip_unless "data torch x8" versions; then
        run_stage "data torch x8" "$log" python3 scripts/bench_data.py --root "$jpegs" \
            --synthesize 256 --loader torch --workers 8 --batch 32 --steps 10
        rate=$(awk '$1 == "torch" && $2 == "cpu" {print $9 " img/s"}' "$SCRATCH/stage.out")
        record "data torch x8" "$(status)" "$SPENT" "${rate:-$(last_line)}"
    fi
}

PER_TEST=()
: > "$OUT/install.txt"
if [[ $MODE == core ]]; then core; else dali; fi

# ---- summary: $OUT/summary.md ----
{
    echo "## device_check.sh --$MODE, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "card: ${CARD:-unknown}; host: $(nproc) CPUs; total ${SECONDS} s of a $TOTAL s budget"
    echo
    echo "| stage | status | budget s | spent s | details |"
    echo "| --- | --- | ---: | ---: | --- |"
    printf '%s\n' "${ROWS[@]}"
    if [[ $MODE == core && -s $OUT/bench_step.json ]]; then
        python3 - "$OUT/bench_step.json" <<'EOF' 2>/dev/null
import json, sys
rows = json.load(open(sys.argv[1]))
if not rows:
    sys.exit()
print("\nStep benchmark, ZeRO-1 bf16, 5 timed steps after 2 (ours: the DeepSpeed engine; plain:"
      "\nplain PyTorch, same model, views and loss; ours/plain above 1: ours is faster)\n")
plain = {(r["model"], r["batch_per_device"]): r for r in rows if r.get("step") == "plain"}
print("| model | batch/dev | ours img/s | plain img/s | ours/plain | ours MFU | plain MFU "
      "| ours peak GiB | plain peak GiB |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
def num(r, key, fmt):
    return format(r[key], fmt) if r and r.get(key) is not None and "error" not in r else \
        (r or {}).get("error", "-")
def pct(r):
    return f"{100 * r['mfu']:.1f}%" if r and r.get("mfu") is not None else "-"
for r in rows:
    if r.get("step") == "plain":
        continue
    p = plain.get((r["model"], r["batch_per_device"]))
    x = r.get("ours_over_plain")
    print(f"| {r['model']} | {r['batch_per_device']} | {num(r, 'img_per_s', '.0f')} "
          f"| {num(p, 'img_per_s', '.0f')} | {f'{x:.2f}' if x is not None else '-'} "
          f"| {pct(r)} | {pct(p)} | {num(r, 'peak_gib', '.1f')} | {num(p, 'peak_gib', '.1f')} |")
EOF
    fi
} > "$OUT/summary.md"
echo
cat "$OUT/summary.md"
rm -rf "$SCRATCH"
for s in "${ST[@]}"; do [[ $s == FAIL || $s == TIMEOUT ]] && exit 1; done
exit 0
