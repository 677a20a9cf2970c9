# Sourced by run.sh and test.sh: make .venv (Python 3.10+) and install a requirements file.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "error: Python 3.10+ is needed ($("$PY" --version 2>&1) found)" >&2; exit 2; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check -r "$1"
