#!/usr/bin/env bash
# Wheels that bench/gpu.sh needs on a GPU machine whose Python (3.12) has torch and timm but not DeepSpeed
# or its pydantic/hjson needs, nor the data pipeline's webdataset and simplejpeg (and scikit-learn, whose
# sample photos the data benchmark cuts its corpus from; only the files are read, so its own needs are not
# fetched). Run here, with network access to PyPI; copy .whl/ next to the project there.
#
#   bash bench/gpu-wheels.sh              # writes .whl/ (ignored by git)
# then, on the GPU machine, in the project root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   bash bench/gpu.sh
#
# DeepSpeed ships as source only: `pip wheel` builds its pure-Python wheel (ops compile on first use, and
# the ZeRO-1 step with torch's AdamW needs none). The versions are the ones this project's venv runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WHL=${WHL:-.whl}
TARGET_PY=${TARGET_PY:-3.12}

version() { "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

mkdir -p "$WHL"
rm -f "$WHL"/deepspeed-*.whl
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$(version deepspeed)" -w "$WHL"
pins=()
for name in hjson pydantic pydantic_core annotated-types typing-inspection webdataset braceexpand simplejpeg \
  scikit-learn; do
  pins+=("$name==$(version "$name")")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$WHL" "${pins[@]}"
ls -1 "$WHL"
