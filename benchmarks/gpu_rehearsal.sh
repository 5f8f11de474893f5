#!/usr/bin/env bash
# The GPU check rehearsed on the CPU (`make gpu-rehearsal`; not part of `make test`): a fresh virtual
# environment in .rehearsal/ (git-ignored) that matches the GPU machine's image, the kit's wheels
# installed the device way (--target + PYTHONPATH, the project not installed), then the very command
# that benchmarks/gpu_kit.sh prints for the device, with --cpu-smoke. A packaging or version problem
# between the project and the image's versions shows up here, not in the 15 minutes of device time.
#
#   bash benchmarks/gpu_rehearsal.sh            # results in .rehearsal/out/ (BUDGET=900 s for gpu_check)
#   REUSE=1 bash benchmarks/gpu_rehearsal.sh    # keep the venv of an earlier run (only the kit is redone)
#
# The image (/work/.library/device/KINDS.md): CPython 3.12; torch 2.11.0+cu130 (PyPI's linux wheel, the
# CUDA build: no CPU-only 2.11 is reachable here, and `import torch` needs its nvidia-* libraries even on
# a CPU, so they come too, about 3 GB; CUDA_VISIBLE_DEVICES="" keeps it on the CPU); the versions the
# image's pip list shows (IMAGE_PINS); peft, whose version there is not listed, at 0.21.2 (the newest
# release, and pyproject's pin); the image's other packages that the project uses at what pip resolves.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=$ROOT/.rehearsal
VENV=$DIR/venv
SITE=$DIR/site
OUTDIR=$DIR/out
TREE=$DIR/tree
IMAGE_PINS=(torch==2.11.0 transformers==5.17.0 accelerate==1.15.0 huggingface-hub==1.33.0 safetensors==0.8.0
            tokenizers==0.23.2 numpy==2.5.2 triton==3.6.0 peft==0.21.2)
IMAGE_OTHERS=(click rich pyyaml matplotlib scipy pyarrow pandas tensorboard psutil fsspec xxhash tqdm jinja2
              packaging filelock einops msgpack ninja py-cpuinfo nvidia-ml-py "setuptools<82" wheel pillow)

T0=$SECONDS
PYTHON312=""
# python3.12 on PATH may be a pyenv shim that refuses to run: try each candidate.
for c in python3.12 $(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12; do
  if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then PYTHON312=$c; break; fi
done
if [ -z "$PYTHON312" ]; then
  PYTHON312=python3
  echo "gpu_rehearsal: no python3.12 here (the image has 3.12): using $(python3 --version)" >&2
fi
echo "gpu_rehearsal: $("$PYTHON312" --version) ($PYTHON312)"

bash benchmarks/gpu_kit.sh | sed -n '/^gpu_kit: kit /p'

if [ "${REUSE:-0}" = 1 ] && [ -f "$VENV/.image-installed" ]; then
  echo "gpu_rehearsal: reusing $VENV"
else
  rm -rf "$VENV"
  "$PYTHON312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip==25.3
  t=$SECONDS
  "$VENV/bin/python" -m pip install -q "${IMAGE_PINS[@]}" "${IMAGE_OTHERS[@]}"
  echo "gpu_rehearsal: the image's packages installed in $((SECONDS - t)) s ($(du -sh "$VENV" | cut -f1))"
  touch "$VENV/.image-installed"
fi
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
names = ["torch", "transformers", "peft", "accelerate", "huggingface-hub", "tokenizers", "numpy", "pyarrow",
         "fsspec", "pandas", "typing-extensions"]
print("gpu_rehearsal: image versions:", ", ".join(f"{n} {md.version(n)}" for n in names))
EOF

# The device command, word for word, in a copy of what a device call carries (the tracked and
# untracked-not-ignored files, and .whl/), with python3 = the venv's and its own site and results paths.
rm -rf "$SITE" "$OUTDIR" "$TREE"
mkdir -p "$OUTDIR" "$TREE"
git ls-files -z --cached --others --exclude-standard --deduplicate \
  | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$TREE"
cp -r .whl "$TREE/.whl"
CMD=$(bash benchmarks/gpu_kit.sh --command --cpu-smoke --site "$SITE" --results "$OUTDIR/gpu-check.json")
echo "gpu_rehearsal: in $TREE: $CMD"
t=$SECONDS
set +e
(cd "$TREE" && env -u PYTHONPATH PATH="$VENV/bin:$PATH" OUT="$OUTDIR" BUDGET="${BUDGET:-900}" bash -c "$CMD") 2>&1 \
  | tee "$OUTDIR/log.txt"
RC=${PIPESTATUS[0]}
set -e
echo "gpu_rehearsal: device command rc=$RC in $((SECONDS - t)) s; the whole rehearsal $((SECONDS - T0)) s;" \
     "results $OUTDIR/gpu-check.json, log $OUTDIR/log.txt"
exit "$RC"
