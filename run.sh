#!/usr/bin/env bash
# The project's two commands (see README.md):
#   ./run.sh up     install into .venv from the lock, train the default model if none exists, export it, serve it
#   ./run.sh test   install into .venv from the lock and run the whole test suite
#   ./run.sh container   build the serving image (docker if an engine answers, else podman)
#   ./run.sh lock        re-lock after a change to pyproject.toml's dependencies (keeps every other pin)
#   ./run.sh upgrade     re-lock to the newest versions the ranges allow, reinstall, run the suite
# Extra arguments go to `cnnserve up`, pytest or `cnnserve container`.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-$(command -v python3.11 || command -v python3 || true)}
if [ -z "$python" ] || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "run.sh: needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi

LOCK=lock/requirements.txt

install() {
  # One virtual environment at the repository root, so .venv/bin/cnnserve and .venv/bin/bentoml are
  # where users, tests and tools look. Everything comes from the lock: exact versions, every file's hash
  # checked, no dependency resolved at install time (--no-deps), then the project itself, editable, with
  # the locked setuptools (no build isolation, which would resolve one). A changed lock makes a new venv,
  # so .venv holds exactly the lock (tests/test_lock.py checks it).
  local stamp=.venv/.cnnserve-lock
  if [ -x .venv/bin/python ] && cmp -s "$LOCK" "$stamp"; then venv_hook; return; fi
  echo "run.sh: installing cnnserve and its locked dependencies into a new .venv ..."
  rm -rf .venv
  "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --require-hashes --no-deps -r "$LOCK"
  .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
  .venv/bin/python -m pip check
  venv_hook
  cp "$LOCK" "$stamp"
}

venv_hook() {
  # The lock's torch is a CPU build and PyPI's torchvision a CUDA one, whose compiled operators cannot load
  # beside it: without this hook `import torchvision` and `import timm` stop with "operator torchvision::nms
  # does not exist" (cnnserve/venvhook.py says how; docs/troubleshooting.md what else to do).
  local site
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo 'import cnnserve.venvhook as hook; hook.install()' > "$site/cnnserve-venvhook.pth"
}

relock() {
  # pip-compile resolves with pip itself and this machine's pip configuration (its package indexes,
  # and where there is one, the local wheel set that holds the CPU build of torch). The serving locks
  # are resolved under the main lock's pins, so the image carries the very versions the suite tested.
  [ -x .venv/bin/pip-compile ] || install
  local compile=(.venv/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras
                 --no-emit-index-url --no-emit-find-links --no-emit-trusted-host "$@")
  echo "run.sh: resolving $LOCK ..."
  CUSTOM_COMPILE_COMMAND="./run.sh lock" "${compile[@]}" --extra train --extra scale --extra test \
    --output-file "$LOCK" pyproject.toml lock/tools.in
  local pins; pins=$(mktemp)
  grep -E '^[A-Za-z0-9._-]+==' "$LOCK" | sed 's/ .*//' > "$pins"
  local out
  for out in lock/requirements-serving.txt lock/requirements-serving-gpu.txt; do
    echo "run.sh: resolving $out under the pins of $LOCK ..."
    { echo "# The serving image's Python packages (bentofile$([ "$out" = lock/requirements-serving-gpu.txt ] && echo -gpu).yaml), no torch: the"
      echo "# dependencies of pyproject.toml's [project] at the versions of $LOCK. Made by ./run.sh lock."
      .venv/bin/pip-compile --quiet --generate-hashes --no-header --no-annotate --strip-extras --no-emit-index-url \
        --no-emit-find-links --no-emit-trusted-host --constraint "$pins" --output-file - pyproject.toml 2>/dev/null
    } > "$out.new"
    mv "$out.new" "$out"
  done
  rm -f "$pins"
  git --no-pager diff --stat -- lock/ 2>/dev/null || true
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  up)   install; exec .venv/bin/cnnserve up "$@" ;;
  # Two test processes, whole files to each (their module fixtures, such as servers, stay in one):
  # most of the suite waits on servers and subprocesses, so two share even a 2-core machine well.
  test) install; exec .venv/bin/python -m pytest -n "${CNNSERVE_TEST_WORKERS:-2}" --dist loadfile "$@" ;;
  container) install; exec .venv/bin/cnnserve container "$@" ;;
  lock) relock "$@" ;;
  # Newest versions the ranges allow; review `git diff lock/`, and commit it alone once the suite passes.
  upgrade) relock --upgrade; install; exec .venv/bin/python -m pytest -n "${CNNSERVE_TEST_WORKERS:-2}" --dist loadfile "$@" ;;
  *)    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
