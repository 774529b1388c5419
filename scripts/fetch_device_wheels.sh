#!/usr/bin/env bash
# Wheels for the lent GPU machine (Python 3.12, x86-64, torch 2.11 cu13, no network), which
# lacks DeepSpeed, DALI and some of their dependencies. Run here, where pip reaches PyPI:
#
#   bash scripts/fetch_device_wheels.sh --core [DIR]   # only what device_check.sh --core needs
#   bash scripts/fetch_device_wheels.sh [DIR]          # that, and the DALI set for --dali
#   bash scripts/fetch_device_wheels.sh --check [DIR]  # only the resolution check of DIR
#   bash scripts/fetch_device_wheels.sh --list         # what --core fetches, expected sizes
#
# DIR (default .device_wheels, git-ignored):
#   base/*.whl       the core set, ~7 MB, carried by every call: DeepSpeed (built here as a
#                    pure wheel), its dependencies the machine lacks, and mlxtend
#   dali_base/*.whl  DALI's small pure dependencies (optree among them: it stays out of the
#                    core call, so it cannot change torch's pytree path there)
#   dali/part-*      DALI for CUDA 13 and its codec libraries (~260 MB) as one tar split into
#                    parts of at most 60 MiB (a call carries at most 64 MiB in all), one call
#                    each to the same warm machine; dali/SHA256SUMS: the parts' and wheels' sums
#
# Each directory is one carry path, so a call takes only what it needs (8 paths at most).
# scripts/device_check.sh installs them with --no-deps; docs/device-check.md has the calls.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

MODE=all
case ${1:-} in
    --check) MODE=check; shift ;;
    --core) MODE=core; shift ;;
    --list) MODE=list; shift ;;
esac
DIR=${1:-.device_wheels}
PLAT=(--python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --only-binary=:all:)

# The versions installed in .venv, where the CPU suite runs them. Requires-Dist of each
# (`unzip -p W '*/METADATA' | grep ^Requires-Dist`, extras left out), less what the machine
# has (/work/.library/device KINDS.md, 'Python packages already there'):
#   deepspeed 0.19.8: hjson, pydantic>=2.0.0 (einops, msgpack, ninja, numpy, packaging,
#              psutil, py-cpuinfo, torch, tqdm are on the machine: not carried)
#   pydantic 2.14.4: pydantic-core==2.50.5, annotated-types>=0.6.0, typing-inspection>=0.4.4,
#              typing-extensions>=4.16.0 (the machine has typing-extensions at a version not
#              read: carried, it shadows the machine's through PYTHONPATH; the module only
#              ever adds names)
#   mlxtend 0.25.0: tests/test_gpu.py's demo data (scripts/make_demo_data.py reads the MNIST
#              digits it bundles; scipy, pandas, scikit-learn, matplotlib, joblib are there)
#   nvidia-dali-cuda130 2.4.0 (the DALI set only): astunparse, gast, optree, nvtx (the
#              Python package, not the machine's nvidia-nvtx), makefun, libcst~=1.8,
#              nvidia-nvimgcodec-cu13[all] (nvjpeg, nvjpeg2k, nvtiff, libnvcomp),
#              nvidia-libnvcomp-cu13==5.3.0.16 (six, numpy, packaging, pyyaml are there)
BASE=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
      typing-inspection==0.4.5 typing-extensions==4.16.0 mlxtend==0.25.0)
DALI_BASE=(astunparse==1.6.3 gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0
           libcst==1.9.0)
DALI=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20
      nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvjpeg==13.3.2.43
      nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82)
# Sizes seen when fetched here (2026-12-03), for --list before any fetch.
EXPECTED="deepspeed-0.19.8-py3-none-any.whl 2168865
hjson-3.1.0-py3-none-any.whl 54018
pydantic-2.14.4-py3-none-any.whl 494865
pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 2264846
annotated_types-0.8.0-py3-none-any.whl 13427
typing_inspection-0.4.5-py3-none-any.whl 14874
typing_extensions-4.16.0-py3-none-any.whl 45571
mlxtend-0.25.0-py3-none-any.whl 1355323"

if [[ $MODE == list ]]; then
    echo "$EXPECTED"
    exit 0
fi

# What the machine has, with the versions seen there where known: the check below gives each
# one a metadata-only stub wheel, so pip must find every other requirement among the carried
# wheels. Versions not seen on the machine are taken from .venv (a stand-in).
NODE_KNOWN="torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0 triton==3.6.0 numpy==2.5.2
  safetensors==0.8.0 transformers==5.17.0 tokenizers==0.23.2 huggingface-hub==1.33.0
  accelerate==1.15.0 jax==0.11.2 jaxlib==0.11.2 onnx==1.23.1 torchmetrics==1.9.0"
NODE_NAMES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
  attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
  coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
  diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
  frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
  hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
  jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
  lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
  mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
  ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
  nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
  nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
  nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
  opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
  pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
  psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
  pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
  pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
  scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
  shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
  tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
  torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
  treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
  werkzeug wheel wrapt xarray xxhash yarl zipp"

# resolve NAME DIRS... -- REQS...: with full dependency resolution, from the wheels in DIRS
# and stubs of the machine's packages alone, pip must satisfy REQS; every wheel in DIRS must
# be used (a carried wheel nothing needs is a mistake), and no project may come twice.
resolve() {
    local name=$1 tmp dirs=() reqs
    shift
    while [[ $1 != -- ]]; do dirs+=("$1"); shift; done
    shift
    reqs=("$@")
    tmp=$(mktemp -d)
    local dup
    dup=$(for d in "${dirs[@]}"; do ls "$d"; done | grep '\.whl$' | cut -d- -f1 | tr A-Z a-z \
          | sort | uniq -d)
    [[ -z $dup ]] || { echo "error: several versions of: $dup" >&2; rm -rf "$tmp"; return 1; }
    NODE_KNOWN=$NODE_KNOWN NODE_NAMES=$NODE_NAMES "$PY" - "$tmp/node" "${dirs[@]}" <<'PYEOF'
import glob, importlib.metadata as md, os, re, sys, zipfile
out, carried_dirs = sys.argv[1], sys.argv[2:]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
carried = {norm(os.path.basename(w).split("-")[0]) for d in carried_dirs
           for w in glob.glob(os.path.join(d, "*.whl"))}
known = dict(x.split("==") for x in os.environ["NODE_KNOWN"].split())
os.makedirs(out)
for name in sorted(set(os.environ["NODE_NAMES"].split()) | set(known)):
    if norm(name) in carried:  # a carried project gets no stub: its wheel is the only candidate
        continue
    try:
        version = known.get(name) or md.version(name)
    except md.PackageNotFoundError:
        version = "0"  # not seen anywhere: fails any lower bound, so the check says so
    dist = re.sub(r"[-.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(os.path.join(out, f"{dist}-{version}-py3-none-any.whl"), "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
PYEOF
    local links=() d
    for d in "${dirs[@]}" "$tmp/node"; do links+=(--find-links "$d"); done
    # the machine's pip configuration (its find-links, constraints) is kept out
    if ! ( unset "${!PIP_@}"; export PIP_CONFIG_FILE=/dev/null
           "$PY" -m pip install --dry-run --quiet --report "$tmp/report.json" --no-index \
             --ignore-installed "${links[@]}" --target "$tmp/x" "${PLAT[@]}" "${reqs[@]}" ); then
        rm -rf "$tmp"; return 1
    fi
    "$PY" - "$name" "$tmp/report.json" "${dirs[@]}" <<'PYEOF'
import glob, json, os, re, sys
name, report, dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
carried = {norm(os.path.basename(w).split("-")[0]) for d in dirs for w in glob.glob(f"{d}/*.whl")}
got = {norm(i["metadata"]["name"]): i["metadata"]["version"]
       for i in json.load(open(report))["install"]}
used = sorted(n for n in got if n in carried)
print(f"{name}: resolved {len(got)} projects, {len(used)} carried, {len(got) - len(used)} "
      "from the machine")
print("  carried: " + " ".join(f"{n}=={got[n]}" for n in used))
unused = sorted(carried - set(got))
if unused:
    sys.exit(f"error: carried but required by nothing: {unused}")
PYEOF
    local rc=$?
    rm -rf "$tmp"
    return $rc
}

# What the core call runs: the project's own requirements (setup.py), DeepSpeed and mlxtend.
CORE_REQS=(deepspeed mlxtend torch torchvision timm pyyaml tensorboard safetensors numpy
           pillow pytest-timeout)

check() {
    [[ -n $(ls "$DIR"/base/deepspeed-*.whl 2>/dev/null) ]] \
        || { echo "error: no $DIR/base/deepspeed-*.whl (fetch first)" >&2; return 1; }
    resolve core "$DIR/base" -- "${CORE_REQS[@]}"
    if [[ ! -f $DIR/dali/SHA256SUMS ]]; then
        echo "dali: not fetched (bash scripts/fetch_device_wheels.sh fetches it)"
        echo "dependency check passed"
        return 0
    fi
    local tmp
    tmp=$(mktemp -d)
    # the DALI wheels re-joined from the parts, exactly as device_check.sh does there
    (cd "$DIR/dali" && grep ' part-' SHA256SUMS | sha256sum --quiet -c -)
    cat "$DIR"/dali/part-* | tar -x -C "$tmp"
    (grep '\.whl$' "$DIR/dali/SHA256SUMS" | sed "s|  |  $tmp/|" | sha256sum --quiet -c -)
    resolve dali "$DIR/base" "$DIR/dali_base" "$tmp" -- "${CORE_REQS[@]}" nvidia-dali-cuda130 \
        || { rm -rf "$tmp"; return 1; }
    rm -rf "$tmp"
    echo "dependency check passed"
}

sizes() {  # each carried file and its size, and the total of each set
    local set f total
    for set in base dali_base dali; do
        [[ -d $DIR/$set ]] || continue
        total=0
        for f in "$DIR/$set"/*; do
            [[ -f $f ]] || continue
            printf '  %10d  %s\n' "$(stat -c %s "$f")" "$f"
            total=$((total + $(stat -c %s "$f")))
        done
        printf '  %10d  %s (total, %.1f MiB)\n' "$total" "$DIR/$set" "$(awk "BEGIN{print $total/1048576}")"
    done
}

if [[ $MODE == check ]]; then
    check
    exit
fi

fetch_base() {
    mkdir -p "$DIR/base"
    rm -f "$DIR"/base/*.whl
    # DeepSpeed is an sdist: build the wheel here. DS_BUILD_OPS=0: no op is compiled into it
    # (any op is JIT-built on first use with the machine's ninja and nvcc); no build
    # isolation, so its setup.py sees .venv's torch rather than downloading one.
    local ds_version ds
    ds_version=$("$PY" -c "import importlib.metadata as m; print(m.version('deepspeed'))")
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation \
        --no-binary deepspeed -w "$DIR/base" "deepspeed==$ds_version"
    ds=$(ls "$DIR"/base/deepspeed-*.whl)
    [[ $ds == *-py3-none-any.whl ]] || { echo "error: $ds is not a pure wheel" >&2; exit 1; }
    if unzip -l "$ds" | grep -qE '\.(so|o)$'; then
        echo "error: $ds contains compiled ops" >&2; exit 1
    fi
    unzip -p "$ds" deepspeed/git_version_info_installed.py | grep -q "'fused_adam': False" \
        || { echo "error: $ds records prebuilt ops" >&2; exit 1; }
    "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$DIR/base" "${BASE[@]}"
}

fetch_dali() {
    mkdir -p "$DIR/dali_base" "$DIR/dali"
    rm -f "$DIR"/dali_base/*.whl "$DIR"/dali/part-* "$DIR/dali/SHA256SUMS"
    "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$DIR/dali_base" "${DALI_BASE[@]}"
    # DALI and its CUDA codec libraries in one tar, split: the parts are what travels.
    local tmp
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$tmp" "${DALI[@]}"
    # a reproducible tar (sorted, fixed times and owners): fetching again gives the same parts,
    # so parts already carried to a warm machine stay valid
    (cd "$tmp" && tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - *.whl) \
        | split -b 60m - "$DIR/dali/part-"
    (cd "$DIR/dali" && sha256sum part-*; cd "$tmp" && sha256sum *.whl) > "$DIR/dali/SHA256SUMS.tmp"
    mv "$DIR/dali/SHA256SUMS.tmp" "$DIR/dali/SHA256SUMS"
    rm -rf "$tmp"
}

fetch_base
[[ $MODE == core ]] || fetch_dali
echo "== $DIR"
sizes
check
