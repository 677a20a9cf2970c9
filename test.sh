#!/usr/bin/env bash
# The test suite (CPU only, about five minutes alone on 2 cores; arguments go to pytest): installs what it needs into .venv, then runs pytest.
. "$(dirname "$0")/setup_env.sh" requirements-dev.txt
python -m pytest -q "$@"
