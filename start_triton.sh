#!/usr/bin/env bash
# Serve model_repository/ with Triton Inference Server + vLLM, in Docker or locally.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: ./start_triton.sh [--mode auto|local|docker] [--tiny] [--name NAME] [--public]
                         [--api-key KEY] [--no-openai] [--openai-api-key KEY]
                         [--dry-run] [--stop]

Sets up what is missing (the .venv environment, the model repository), starts
tritonserver in the background, waits until /v2/health/ready answers, starts the
OpenAI-compatible API in front of it and prints the endpoints. Logs:
logs/tritonserver.log and logs/openai.log.

Options:
  --mode MODE    local:  tritonserver from .venv (no Docker needed; CPU or GPU)
                 docker: the pinned NVIDIA Triton image with vLLM (needs an NVIDIA GPU)
                 auto:   docker when a Docker engine and an NVIDIA GPU are present,
                         local otherwise (default)
  --tiny         if no model is prepared yet, make the small offline test model
                 instead of downloading Qwen2.5-0.5B
  --name NAME    served model name used when preparing (default qwen2.5-0.5b)
  --public       listen on all interfaces instead of 127.0.0.1 only
  --api-key KEY  require header 'x-triton-key: KEY' for the model-control,
                 shared-memory, trace and logging APIs (also TRITON_API_KEY);
                 over gRPC the metadata key is 'triton-grpc-protocol-x-triton-key'
  --no-openai    do not start the OpenAI-compatible API (/v1/... on OPENAI_PORT)
  --openai-api-key KEY
                 require 'Authorization: Bearer KEY' on the OpenAI API's /v1/...
                 (also OPENAI_API_KEY)
  --dry-run      print the commands that would run, change nothing
  --stop         stop the server and the OpenAI API started by this script
  -h, --help     show this help

Environment: HTTP_PORT (8000), GRPC_PORT (8001), METRICS_PORT (8002), OPENAI_PORT (9000),
OPENAI_WORKERS (processes of the OpenAI API; 4 where nvidia-smi lists a GPU, else 1),
TRITON_IMAGE (docker image), TRITON_API_KEY, OPENAI_API_KEY, MODEL_REPOSITORY
(model_repository), LOG_DIR (logs: logs and pid files), BATCH_SCHEDULING (1 runs
the OpenAI API and, in local mode, tritonserver and the engine under Linux's
SCHED_BATCH policy, 0 does not; by default on where nvidia-smi lists no GPU, i.e.
a CPU engine).
Exit codes: 0 serving (or stopped), 1 the server or the OpenAI API failed to start,
2 bad usage.
EOF
}

cd "$(dirname "$0")"
HTTP_PORT=${HTTP_PORT:-8000}
GRPC_PORT=${GRPC_PORT:-8001}
METRICS_PORT=${METRICS_PORT:-8002}
OPENAI_PORT=${OPENAI_PORT:-9000}
TRITON_IMAGE=${TRITON_IMAGE:-nvcr.io/nvidia/tritonserver:26.08-vllm-python-py3}
MODEL_REPOSITORY=${MODEL_REPOSITORY:-model_repository}
API_KEY=${TRITON_API_KEY:-}
OPENAI_KEY=${OPENAI_API_KEY:-}
CONTAINER=triton-vllm-qwen
LOG_DIR=${LOG_DIR:-logs}
LOG=$LOG_DIR/tritonserver.log
PID_FILE=$LOG_DIR/tritonserver.pid
OPENAI_PID_FILE=$LOG_DIR/openai.pid
PY=.venv/bin/python
BATCH_SCHEDULING=${BATCH_SCHEDULING:-}
if [[ ! $BATCH_SCHEDULING =~ ^[01]?$ ]]; then
  echo "start_triton.sh: BATCH_SCHEDULING must be 1 or 0, not '$BATCH_SCHEDULING'" >&2
  exit 2
fi
case $BATCH_SCHEDULING in
  1) batch_scheduling=(--batch-scheduling) ;;
  0) batch_scheduling=(--no-batch-scheduling) ;;
  *) batch_scheduling=() ;;
esac

mode=auto
host=127.0.0.1
dry_run=0
action=start
openai=1
prepare_args=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --mode) mode=${2:?--mode needs local, docker or auto}; shift ;;
    --tiny) prepare_args+=(--tiny) ;;
    --name) prepare_args+=(--name "${2:?--name needs a value}"); shift ;;
    --public) host=0.0.0.0 ;;
    --api-key) API_KEY=${2:?--api-key needs a value}; shift ;;
    --no-openai) openai=0 ;;
    --openai-api-key) OPENAI_KEY=${2:?--openai-api-key needs a value}; shift ;;
    --dry-run) dry_run=1 ;;
    --stop) action=stop ;;
    -h|--help) usage; exit 0 ;;
    *) echo "start_triton.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

run() {
  echo "+ $*"
  if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

have_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

have_docker_gpu() {
  command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 && have_gpu
}

stop_all() {
  if [[ -f "$OPENAI_PID_FILE" ]]; then
    run "$PY" -m serving.openai_api.service stop --pid-file "$OPENAI_PID_FILE"
  fi
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 &&
    [[ -n "$(docker ps -aq --filter "name=^${CONTAINER}$")" ]]; then
    run docker stop --time 40 "$CONTAINER"
  fi
  if [[ -f "$PID_FILE" ]]; then
    run "$PY" -m serving.tritonserver stop --pid-file "$PID_FILE"
  elif [[ $dry_run -eq 0 ]]; then
    echo "No local server recorded in $PID_FILE."
  fi
}

ensure_model() {
  if compgen -G "$MODEL_REPOSITORY/*/config.pbtxt" >/dev/null; then
    return
  fi
  echo "No model in $MODEL_REPOSITORY/: preparing one."
  run "$PY" prepare_qwen_pt.py --repository "$MODEL_REPOSITORY" "$@"
}

wait_ready() {
  local url="http://127.0.0.1:$HTTP_PORT/v2/health/ready" deadline=$((SECONDS + 900))
  echo "Waiting for $url ..."
  until curl -fs "$url" >/dev/null; do
    if [[ -z "$(docker ps -q --filter "name=^${CONTAINER}$")" ]] || ((SECONDS > deadline)); then
      echo "error: the Triton container did not become ready; end of its log:" >&2
      docker logs --tail 40 "$CONTAINER" >&2 || true
      return 1
    fi
    sleep 2
  done
}

# As in serving/tritonserver.py: the model's strings need none of them, and they slowed the engine.
UNUSED_GPU_FEATURES_OFF=(--allow-gpu-metrics=false --pinned-memory-pool-byte-size=0 --cuda-memory-pool-byte-size=0:0)

start_docker() {
  local repo model
  repo=$(cd "$MODEL_REPOSITORY" && pwd)
  local mounts=(-v "$repo:/models")
  # A model served from --local-dir lives outside the repository: mount it at the same path.
  for model in $("$PY" -c 'import json,sys,os
for p in sys.argv[1:]:
    m = json.load(open(p))["model"]
    print(m) if os.path.isabs(m) else None' "$repo"/*/1/model.json 2>/dev/null || true); do
    mounts+=(-v "$model:$model:ro")
  done
  local restricted=()
  if [[ -n "$API_KEY" ]]; then
    local apis="model-repository,shared-memory,trace,logging:x-triton-key=$API_KEY"
    restricted=("--http-restricted-api=$apis" "--grpc-restricted-protocol=$apis")
  fi
  run docker run -d --rm --name "$CONTAINER" --gpus all \
    --shm-size=2g --ulimit memlock=-1 --ulimit stack=67108864 \
    -p "$host:$HTTP_PORT:8000" -p "$host:$GRPC_PORT:8001" -p "$host:$METRICS_PORT:8002" \
    "${mounts[@]}" "$TRITON_IMAGE" \
    tritonserver --model-repository=/models --exit-timeout-secs=30 "${restricted[@]}" "${UNUSED_GPU_FEATURES_OFF[@]}"
  if [[ $dry_run -eq 0 ]]; then
    mkdir -p "$LOG_DIR"
    (docker logs -f "$CONTAINER" >>"$LOG" 2>&1 &)
    wait_ready
  fi
}

start_local() {
  local args=(--model-repository "$MODEL_REPOSITORY" --host "$host" --http-port "$HTTP_PORT"
    --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" --log-file "$LOG" --pid-file "$PID_FILE")
  if [[ -n "$API_KEY" ]]; then args+=(--api-key "$API_KEY"); fi
  run "$PY" -m serving.tritonserver start "${args[@]}" "${batch_scheduling[@]}"
}

start_openai() {
  # One API process keeps pace with an engine on the CPU; beside a GPU engine it is the limit
  # at 64 streams (docs/benchmarks.md, "The OpenAI API").
  local workers=${OPENAI_WORKERS:-1}
  if [[ -z ${OPENAI_WORKERS:-} ]] && have_gpu; then workers=4; fi
  local args=(--triton-url "127.0.0.1:$GRPC_PORT" --host "$host" --port "$OPENAI_PORT"
    --workers "$workers" --log-file "$LOG_DIR/openai.log" --pid-file "$OPENAI_PID_FILE")
  if [[ -n "$API_KEY" ]]; then args+=(--triton-api-key "$API_KEY"); fi
  OPENAI_API_KEY=$OPENAI_KEY run "$PY" -m serving.openai_api.service start "${args[@]}" "${batch_scheduling[@]}"
}

if [[ $action == stop ]]; then
  stop_all
  exit 0
fi

case "$mode" in
  auto) if have_docker_gpu; then mode=docker; else mode=local; fi ;;
  local|docker) ;;
  *) echo "start_triton.sh: --mode must be auto, local or docker, not '$mode'" >&2; exit 2 ;;
esac
echo "Mode: $mode"

if [[ $mode == local ]]; then
  run scripts/setup.sh
else
  [[ -x "$PY" ]] || run scripts/setup.sh --cpu  # prepare_qwen_pt.py runs on the host
fi
ensure_model "${prepare_args[@]}"
if [[ $mode == docker ]]; then start_docker; else start_local || exit 1; fi
if [[ $openai -eq 1 ]]; then start_openai || exit 1; fi

if [[ $dry_run -eq 0 ]]; then
  model=$(basename "$(dirname "$(compgen -G "$MODEL_REPOSITORY/*/config.pbtxt" | head -n 1)")")
  cat <<EOF
Triton is ready ($mode mode). Log: $LOG
  HTTP     http://$host:$HTTP_PORT   (generate: /v2/models/$model/generate)
  gRPC     $host:$GRPC_PORT
  metrics  http://$host:$METRICS_PORT/metrics
EOF
  if [[ $openai -eq 1 ]]; then
    echo "  OpenAI   http://$host:$OPENAI_PORT/v1   (log: $LOG_DIR/openai.log)"
  fi
  cat <<EOF
Try:  curl -X POST localhost:$HTTP_PORT/v2/models/$model/generate -d '{"text_input": "What is Triton?", "parameters": {"max_tokens": 32}}'
EOF
  if [[ $openai -eq 1 ]]; then
    echo "      curl localhost:$OPENAI_PORT/v1/completions -H 'Content-Type: application/json' -d '{\"model\": \"$model\", \"prompt\": \"What is Triton?\", \"max_tokens\": 32}'"
  fi
  cat <<EOF
Stop: ./start_triton.sh --stop
EOF
fi
