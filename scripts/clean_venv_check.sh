#!/usr/bin/env bash
# The book as a new reader gets it: bnlib's wheel installed into a clean virtual environment with only its
# declared dependencies and the extras the README names (bnlib[data,widgets]: no requirements.txt, no Triton),
# then the unit tests and every notebook's asserts (outputs not compared: other versions print other digits).
#
#   bash scripts/clean_venv_check.sh                  # newest releases the package's ranges admit
#   EXTRA_PINS="numpy==1.26.4 matplotlib==3.8.4 scikit-learn==1.5.2" bash scripts/clean_venv_check.sh
#
# torch is the exception: it is installed first at the CPU build that lies on the project's machines
# (torch==2.13.0 from /opt/wheels); any other torch would be a multi-GB CUDA download here, so this check does
# not exercise other torch versions. The tests run from a copy of tests/ outside the source tree, so that
# `import bnlib` is the installed wheel. Writes _build/clean-venv/{freeze.txt,unit.log,notebooks.log}.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
OUT=_build/clean-venv${SUFFIX:-}
LINKS=$([ -d /opt/wheels ] && echo "--find-links /opt/wheels" || true)
rm -rf "$OUT"
mkdir -p "$OUT/wheel" "$OUT/run"
.venv/bin/python -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT/wheel" .
"$PYTHON" -m venv "$OUT/venv"
V="$OUT/venv/bin"
"$V/python" -m pip install --quiet --upgrade pip
"$V/python" -m pip install --quiet $LINKS "torch==2.13.0"
WHEEL=$(ls "$OUT"/wheel/bnlib-*.whl)
# shellcheck disable=SC2086
"$V/python" -m pip install --quiet $LINKS "${WHEEL}[data,widgets]" pytest hypothesis nbval ipykernel expecttest ${EXTRA_PINS:-}
"$V/python" -m pip freeze > "$OUT/freeze.txt"
if "$V/python" -c "import triton" 2>/dev/null; then echo "clean venv: triton is installed, expected it absent"; exit 1; fi
cp -r tests tools scripts benchmarks conftest.py intro.ipynb chapters "$OUT/run/"
cp pyproject.toml "$OUT/run/"   # pytest's settings; the run folder has no bnlib/, so `import bnlib` is the wheel
cd "$OUT/run"
"../venv/bin/python" -c "import bnlib, sys; assert 'site-packages' in bnlib.__file__, bnlib.__file__; print('bnlib', bnlib.__version__, 'from', bnlib.__file__)"
status=0
BNLIB_OFFLINE=1 PYTHONHASHSEED=0 OMP_NUM_THREADS=1 "../venv/bin/python" -m pytest tests --ignore=tests/browser \
    -q -p no:cacheprovider > ../unit.log 2>&1 || status=1
tail -1 ../unit.log
BNLIB_OFFLINE=1 PYTHONHASHSEED=0 OMP_NUM_THREADS=1 "../venv/bin/python" -m pytest --nbval-lax --nbval-current-env \
    --nbval-cell-timeout=600 -q -p no:cacheprovider intro.ipynb chapters/*.ipynb > ../notebooks.log 2>&1 || status=1
tail -1 ../notebooks.log
exit $status
