#!/usr/bin/env bash
# Stop what cluster/start-local.sh started, by the pids it recorded; nothing else on the machine.
# (`ray stop` would also stop every other Ray of this user, so it is not used.)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${DALLE2_LOCAL_DIR:-$REPO/runs/local-cluster}"
STOP_TIMEOUT_S=60  # above the head's drain time on SIGTERM (start-local.sh sets 5 s)

stop_pid_file() {  # $1 pid file, $2 name shown
    local pid_file="$1" name="$2" pid
    [[ -f "$pid_file" ]] || return 0
    pid="$(cat "$pid_file")"
    if kill -0 "$pid" 2>/dev/null; then
        echo "stopping $name (pid $pid)"
        kill -TERM "$pid"
        local deadline=$((SECONDS + STOP_TIMEOUT_S))
        while kill -0 "$pid" 2>/dev/null; do
            if ((SECONDS > deadline)); then
                echo "$name (pid $pid) did not stop in ${STOP_TIMEOUT_S}s; killing it" >&2
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.5
        done
    fi
    rm -f "$pid_file"
}

# Ray first: its workers may still be writing to the object store. SIGTERM to `ray start --block`
# stops the head's processes (GCS, raylet, dashboard, workers) it is the parent of.
stop_pid_file "$STATE/ray.pid" "Ray head"
# `ray start` pointed every address-less `ray.init()` on the machine at our head (the file
# ray_current_cluster); point it back where it was, or remove it, unless another head took it over.
if [[ -f "$STATE/ray-address-file" ]]; then
    address_file="$(cat "$STATE/ray-address-file")"
    if [[ -f "$address_file" && "$(cat "$address_file")" == *":$(cat "$STATE/ray-port")" ]]; then
        if [[ -f "$STATE/ray-address.previous" ]]; then
            cp "$STATE/ray-address.previous" "$address_file"
        else
            rm -f "$address_file"
        fi
    fi
    rm -f "$STATE/ray-address-file" "$STATE/ray-port" "$STATE/ray-address.previous"
fi
stop_pid_file "$STATE/weed.pid" "SeaweedFS"
rm -f "$STATE/env.sh"
echo "stopped (data kept in $STATE/seaweedfs; delete the folder to start empty)"
