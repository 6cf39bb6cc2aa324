#!/bin/sh
# Size the study on one GPU: step rates (bf16, paper sizes), the loader against them, the GPU-hours.
# Flags go to bench/gpu.py (see its --help); PYTHON picks the interpreter (default: .venv's, else python3).
here=$(dirname "$0")
python=${PYTHON:-$here/../.venv/bin/python}
[ -x "$python" ] || python=python3
exec "$python" "$here/gpu.py" "$@"
