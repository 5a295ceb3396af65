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
  if [ -x .venv/bin/python ] && cmp -s "$LOCK" "$stamp"; then
    # the editable install maps the folders to their cnnserve.* names as pyproject.toml said when it was made
    cmp -s pyproject.toml .venv/.cnnserve-pyproject || {
      quietly .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
      cp pyproject.toml .venv/.cnnserve-pyproject; }
    venv_hook; return
  fi
  echo "run.sh: installing cnnserve and its locked dependencies into a new .venv ..."
  rm -rf .venv
  "$python" -m venv .venv
  quietly .venv/bin/python -m pip install --quiet --require-hashes --no-deps -r "$LOCK"
  quietly .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
  quietly .venv/bin/python -m pip check
  venv_hook
  cp pyproject.toml .venv/.cnnserve-pyproject
  cp "$LOCK" "$stamp"
  echo "run.sh: .venv holds $LOCK"
}

quietly() {  # a command's output only when it fails (pip and setuptools warn a lot on success)
  local out
  out=$("$@" 2>&1) || { echo "$out" | grep -v "is ignored: it is neither a file nor a directory" >&2; return 1; }
}

serving_lock() {  # EXTRA OUT BENTOFILE PINS: pyproject's serving set with one runtime, at the pinned versions
  echo "run.sh: resolving $2 under the pins of $LOCK ..."
  { echo "# The $1 image's Python packages ($3), no torch: pyproject.toml's [project] dependencies and its"
    echo "# '$1' extra, at the versions of $LOCK. Made by ./run.sh lock."
    # what it was resolved from, so that a change of those requirements rewrites it (tests/test_lock.py compares)
    echo "# Resolved from these requirements of pyproject.toml:"
    .venv/bin/python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join("#   " + r for r in p["dependencies"] + p["optional-dependencies"][sys.argv[1]]))' "$1"
    .venv/bin/pip-compile --quiet --generate-hashes --no-header --no-annotate --strip-extras --no-emit-index-url \
      --no-emit-find-links --no-emit-trusted-host --constraint "$4" --extra "$1" --output-file - pyproject.toml 2>/dev/null
  } > "$2.new"
  mv "$2.new" "$2"
}

venv_hook() {
  # The lock's torch is a CPU build and PyPI's torchvision a CUDA one, whose compiled operators cannot load
  # beside it: without this hook `import torchvision` and `import timm` stop with "operator torchvision::nms
  # does not exist" (command/venvhook.py says how; docs/troubleshooting.md what else to do).
  local site
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo 'import cnnserve.command.venvhook as hook; hook.install()' > "$site/cnnserve-venvhook.pth"
}

relock() {
  # pip-compile resolves with pip itself and this machine's pip configuration (its package indexes,
  # and where there is one, the local wheel set that holds the CPU build of torch). The serving locks
  # are resolved under the main lock's pins, so the image carries the very versions the suite tested.
  [ -x .venv/bin/pip-compile ] || install
  local compile=(.venv/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras
                 --no-emit-index-url --no-emit-find-links --no-emit-trusted-host "$@")
  echo "run.sh: resolving $LOCK ..."
  CUSTOM_COMPILE_COMMAND="./run.sh lock" "${compile[@]}" --extra gpu --extra train --extra score --extra scale --extra test \
    --output-file "$LOCK" pyproject.toml lock/tools.in
  # the same versions for the images; the CPU image's onnxruntime at onnxruntime-gpu's version
  local pins; pins=$(mktemp)
  grep -E '^[A-Za-z0-9._-]+==' "$LOCK" | sed 's/ .*//' > "$pins"
  grep -E '^onnxruntime-gpu==' "$pins" | sed 's/^onnxruntime-gpu/onnxruntime/' >> "$pins"
  serving_lock cpu lock/requirements-serving.txt bentofile.yaml "$pins"
  serving_lock gpu lock/requirements-serving-gpu.txt bentofile-gpu.yaml "$pins"
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
