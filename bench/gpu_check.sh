#!/usr/bin/env bash
# The prepared GPU check in one command (what it measures: bench/gpu_check.py's docstring).
# The wheels of bench/gpu_wheels.txt, fetched by `make gpu-check-data` into
# bench/work/gpu_check/wheels for the GPU machine's Python and this one, are installed from
# there (no package index) into a temporary folder, then the check runs with the arguments
# given, on $PYTHON (default python3):
#   bench/gpu_check.sh [--device cuda|cpu] [--iterations 20] [--models unet nnunet:fp16] [--out FILE]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
folder="$here/work/gpu_check"
python="${PYTHON:-python3}"
if [ ! -d "$folder/wheels" ] || [ ! -d "$folder/data" ]; then
  echo "bench/gpu_check.sh: $folder has no wheels or data; run 'make gpu-check-data' first" >&2
  exit 2
fi
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
"$python" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
  --find-links "$folder/wheels" --target "$site" -r "$here/gpu_wheels.txt"
PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 "$python" "$here/gpu_check.py" "$@"
