#!/usr/bin/env bash
# The project's two commands (see README.md):
#   ./run.sh up     install into .venv, train the default model if none exists, export it, serve it
#   ./run.sh test   install into .venv and run the whole test suite
#   ./run.sh container   build the serving image (docker if an engine answers, else podman)
# Extra arguments go to `cnnserve up`, pytest or `cnnserve container`.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-$(command -v python3.11 || command -v python3 || true)}
if [ -z "$python" ] || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "run.sh: needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi

install() {
  # One virtual environment at the repository root, so .venv/bin/cnnserve and
  # .venv/bin/bentoml are where users, tests and tools look. Reinstalled when pyproject changes.
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  local stamp=.venv/.cnnserve-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "run.sh: installing cnnserve and its dependencies into .venv ..."
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[train,scale,test]'
    touch "$stamp"
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  up)   install; exec .venv/bin/cnnserve up "$@" ;;
  # Two test processes, whole files to each (their module fixtures, such as servers, stay in one):
  # most of the suite waits on servers and subprocesses, so two share even a 2-core machine well.
  test) install; exec .venv/bin/python -m pytest -n "${CNNSERVE_TEST_WORKERS:-2}" --dist loadfile "$@" ;;
  container) install; exec .venv/bin/cnnserve container "$@" ;;
  *)    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
