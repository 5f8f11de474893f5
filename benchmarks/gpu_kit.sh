#!/usr/bin/env bash
# The GPU kit (`make gpu-kit`): the Python packages that the lent GPU machine's image lacks, downloaded
# HERE into .whl/ (git-ignored) for CPython 3.12 manylinux x86_64, one by one with --no-deps, since that
# machine reaches no package index. The image already holds torch 2.11, transformers 5.17, peft,
# accelerate and the rest of IMAGE_PACKAGES below; nothing in the kit replaces any of them, and the
# project itself is not installed there (it runs from the working tree on PYTHONPATH), so pip never
# touches the image's torch.
#
#   bash benchmarks/gpu_kit.sh                   # download into .whl/, measure, print the device call
#   bash benchmarks/gpu_kit.sh --command [--cpu-smoke] [--site DIR] [--results FILE]
#                                                # print only the device command (the rehearsal runs it)
#
# The kit and the working tree that travels with it (tracked + untracked-not-ignored files) must stay
# under 60 MiB together (the device call takes 64 MiB): the script measures both and fails if over.
# DeepSpeed has no wheel: its source archive (2 MB) travels and is built there with --no-build-isolation
# against the image's torch, with no ops compiled ahead (DeepSpeed compiles an op with the machine's nvcc
# when it is first used). If that build fails, the device command goes on and gpu_check.sh records the
# zero3 section as skipped. The package alphadpo_cli.presets exists only in an install (pyproject maps
# the repository's presets/ onto it): the command links alphadpo_cli/presets -> ../presets first, in
# the throwaway copy of the tree that the device gets.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.whl
LIMIT_MIB=60
PY=${PYTHON:-python3}

# The GPU image's Python packages, as /work/.library/device/KINDS.md lists them ("Python packages already
# there", read 2026-11-17). tests/test_gpu_kit.py checks that every package the project imports is either
# here or in the kit.
IMAGE_PACKAGES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox
etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py
hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels
sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp"

# What the image lacks, pinned: pyproject.toml's pins where it pins them (tests/test_gpu_kit.py checks),
# else the versions pip resolves for the project here (.venv). Their own dependencies that the image
# lacks are named one by one (read off each wheel's Requires-Dist).
KIT_WHEELS=(
  datasets==5.2.0          # data loading (alphadpo_cli.data, the trainer)
  dill==0.4.1              #   datasets' (< 0.4.2)
  multiprocess==0.70.19    #   datasets' (< 0.70.20)
  trl==1.16.0              # the benchmark's TRL rows
  bitsandbytes==0.50.2     # QLoRA (NF4) and its merge; 43 MB of the kit
  hjson==3.1.0             #   deepspeed's
  pydantic==2.14.4         #   deepspeed's (its config)
  pydantic-core==2.50.5    #   pydantic's (its exact pin)
  annotated-types==0.8.0   #   pydantic's
  typing-inspection==0.4.5 #   pydantic's
)
KIT_SDISTS=(
  deepspeed==0.19.8        # ZeRO-3 (pyproject's [deepspeed] extra); built there, see above
)

# device_command [--cpu-smoke] [--site DIR] [--results FILE]: the one command for the device machine
device_command() {
  local smoke="" site=/tmp/site results='$OUT/gpu-check.json'
  while [ $# -gt 0 ]; do
    case $1 in
      --cpu-smoke) smoke=" --cpu-smoke" ;;
      --site) site=$2; shift ;;
      --results) results=$2; shift ;;
      *) echo "gpu_kit.sh --command: unknown argument '$1' (allowed: --cpu-smoke, --site DIR, --results FILE)" >&2
         return 2 ;;
    esac
    shift
  done
  local pipi="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $site"
  # alphadpo_cli.presets is the repository's presets/ (mapped there by an install): a link stands in
  printf '%s' "{ [ -e alphadpo_cli/presets ] || ln -s ../presets alphadpo_cli/presets; } && " \
    "$pipi $KIT/*.whl && export PYTHONPATH=$site:\$PWD && " \
    "{ $pipi --no-build-isolation $KIT/deepspeed-*.tar.gz || echo 'deepspeed did not build: zero3 is skipped'; } && " \
    "BUDGET=\${BUDGET:-420} PYTHON=python3 bash benchmarks/gpu_check.sh$smoke $results"
  echo
}

if [ "${1:-}" = "--command" ]; then
  shift
  device_command "$@"
  exit
fi

# Keep the kit out of git, so that it travels only when a call carries it.
if ! git check-ignore -q "$KIT/x.whl"; then
  echo "gpu_kit.sh: $KIT/ is not git-ignored; add /$KIT/ to .gitignore" >&2
  exit 1
fi

T0=$SECONDS
NEW="$KIT.new"
rm -rf "$NEW"
mkdir -p "$NEW"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
echo "gpu_kit: downloading ${#KIT_WHEELS[@]} wheels and ${#KIT_SDISTS[@]} source archive(s) into $KIT/"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$NEW" "${KIT_WHEELS[@]}"
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$NEW" "${KIT_SDISTS[@]}"
# A fresh folder each time: two versions of one package would stop the whole install there.
rm -rf "$KIT"
mv "$NEW" "$KIT"

mib() { awk '{s += $1} END {printf "%.1f", s / 1048576}'; }
KIT_MIB=$(find "$KIT" -type f -printf '%s\n' | mib)
TREE_MIB=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | mib || true)
TOTAL_MIB=$(awk -v a="$KIT_MIB" -v b="$TREE_MIB" 'BEGIN {printf "%.1f", a + b}')
echo "gpu_kit: $(ls "$KIT" | wc -l) files in $((SECONDS - T0)) s:"
ls -l "$KIT" | awk 'NR > 1 {printf "  %8.1f MiB  %s\n", $5 / 1048576, $9}'
echo "gpu_kit: kit $KIT_MIB MiB + working tree $TREE_MIB MiB = $TOTAL_MIB MiB (limit $LIMIT_MIB MiB)"
if awk -v t="$TOTAL_MIB" -v l="$LIMIT_MIB" 'BEGIN {exit !(t > l)}'; then
  echo "gpu_kit: over $LIMIT_MIB MiB: the device call would not fit; drop a section's wheels or shrink the tree" >&2
  exit 1
fi

CMD=$(device_command)
echo
echo "Device command (runs in the repository root there; the project is not installed, torch is the image's):"
echo "  $CMD"
echo
echo "run tool parameters, to paste:"
"$PY" -c 'import json, sys; print(json.dumps({"command": sys.argv[1], "carry": [".whl"], "timeout_s": 480}))' "$CMD"
