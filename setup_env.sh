# Sourced by run.sh and test.sh: make .venv (Python 3.10+) and install a requirements file into it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "error: Python 3.10+ is needed ($("$PY" --version 2>&1) found)" >&2; exit 2; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Not .venv/bin/activate: it names the folder the venv was made in, so in a moved project it would
# leave the system Python first on PATH. The venv's own python works wherever the folder is.
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"
python -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' \
  || { echo "error: .venv is not a working virtual environment (delete it and run again)" >&2; exit 2; }
pip() { python -m pip -q --disable-pip-version-check "$@"; }
# Linux without an NVIDIA GPU: take the small CPU build of torch, not the multi-GB CUDA one.
if ! python -c 'import torch' 2>/dev/null && [ "$(uname)" = Linux ] && ! command -v nvidia-smi >/dev/null; then
  pip install --retries 0 --timeout 20 torch --index-url https://download.pytorch.org/whl/cpu || true
fi
pip install -r "$1"
