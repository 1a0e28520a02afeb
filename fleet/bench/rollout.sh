#!/usr/bin/env bash
# Fleet controller bench (issue 24). Starts its own mosquitto and, for the
# PostgreSQL half, a throwaway cluster; prints
#  1. heartbeat ingest rate and p99 (publish -> ack at the device) with
#     STORE_DEVICES registered devices in the store and SIM_DEVICES simulated
#     over MQTT, SQLite and PostgreSQL side by side;
#  2. a 4-wave rollout of SIM_DEVICES simulated devices with FAIL_PCT %
#     injected install failures: the wave where it halted, failed devices
#     against budget + in-flight cap;
#  3. a clean 4-wave rollout of CLEAN_DEVICES: wall time against its soak floor.
# Knobs (env): STORE_DEVICES=50000 SIM_DEVICES=5000 HB_RATE=1700 (offered
# heartbeats/s in part 1) HB_SECONDS=60 CLEAN_DEVICES=1000 FAIL_PCT=3
# BUDGET=10 BUDGET_PCT=2 CAP=100 SOAK_MS=30000 (heartbeats every SOAK_MS/3 in
# parts 2 and 3) STORES="sqlite postgres"
# PROFILE=release|dev (or BIN=path, no build). Needs mosquitto, postgresql (scripts/install-deps.sh),
# python3 (free ports, JSON).
set -euo pipefail
cd "$(dirname "$0")/../.."
STORE_DEVICES="${STORE_DEVICES:-50000}"
SIM_DEVICES="${SIM_DEVICES:-5000}"
HB_RATE="${HB_RATE:-1700}"
HB_SECONDS="${HB_SECONDS:-60}"
CLEAN_DEVICES="${CLEAN_DEVICES:-1000}"
FAIL_PCT="${FAIL_PCT:-3}"
BUDGET="${BUDGET:-10}"
BUDGET_PCT="${BUDGET_PCT:-2}"
CAP="${CAP:-100}"
SOAK_MS="${SOAK_MS:-30000}"
STORES="${STORES:-sqlite postgres}"
PROFILE="${PROFILE:-release}"

if [ -n "${BIN:-}" ]; then
    : # a binary given: no build
elif [ "$PROFILE" = release ]; then
    cargo build -q --release -p dualroot-fleet --bin dualroot-fleet
    BIN="$PWD/target/release/dualroot-fleet"
else
    cargo build -q -p dualroot-fleet --bin dualroot-fleet
    BIN="$PWD/target/debug/dualroot-fleet"
fi
WORK="$(mktemp -d /tmp/fleet-bench.XXXXXX)"
PIDS=()
PGDATA=""
cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "$PGDATA" ]; then as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1 || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
json() { python3 -c "import json,sys;d=json.load(sys.stdin);print($1)"; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

MQTT_PORT="$(free_port)"
cat >"$WORK/mosquitto.conf" <<EOF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 10000
EOF
/usr/sbin/mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
PIDS+=($!)

start_pg() {
    PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
    mkdir -p "$WORK/pg"
    if [ "$(id -u)" = 0 ]; then chown postgres "$WORK/pg"; chmod 755 "$WORK"; fi
    PGDATA="$WORK/pg/data"
    PG_PORT="$(free_port)"
    (cd "$WORK/pg" && as_pg "$PGBIN/initdb" -U fleet -A trust -E UTF8 --no-sync -D "$PGDATA" >/dev/null)
    (cd "$WORK/pg" && as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/pg/log" -w \
        -o "-p $PG_PORT -k $WORK/pg -c listen_addresses=127.0.0.1 -c max_connections=50" start >/dev/null)
}

# serve DB CONFIG -> sets API, SERVE_PID
serve() {
    local port; port="$(free_port)"
    API="http://127.0.0.1:$port"
    DUALROOT_FLEET_LOG=warn "$BIN" serve --db "$1" --config "$2" --listen "127.0.0.1:$port" \
        --mqtt-port "$MQTT_PORT" --mqtt-client-id "bench-$port" --tick-ms 500 >"$WORK/serve-$port.log" 2>&1 &
    SERVE_PID=$!
    PIDS+=("$SERVE_PID")
    for _ in $(seq 100); do
        curl -sf "$API/api/v1/rollouts" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "the controller did not start: $(tail -5 "$WORK/serve-$port.log")" >&2
    exit 1
}

config() { # heartbeat interval ms
    cat <<EOF
topic_prefix = "bench"
heartbeat_interval_ms = $1
retry_backoff_ms = 500
penalty_ms = 500
resend_interval_ms = 60000
[register_tokens.bench]
fleet = "sim"
EOF
}

echo "== 1. heartbeat ingest: $STORE_DEVICES devices in the store, $SIM_DEVICES simulated, ~$HB_RATE heartbeats/s offered, ${HB_SECONDS} s"
every_ms=$(( SIM_DEVICES * 1000 / HB_RATE ))
printf '%-10s %12s %10s %10s %10s\n' store "acked/s" "p50 ms" "p99 ms" acked
for store in $STORES; do
    case "$store" in
        sqlite) DB="$WORK/hb.sqlite" ;;
        postgres)
            [ -z "$PGDATA" ] && start_pg
            as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U fleet -d postgres -qc "CREATE DATABASE hb" >/dev/null
            DB="postgres://fleet@127.0.0.1:$PG_PORT/hb" ;;
        *) echo "unknown store $store" >&2; exit 1 ;;
    esac
    config 300000 >"$WORK/hb.toml"
    "$BIN" seed --db "$DB" --config "$WORK/hb.toml" --devices "$STORE_DEVICES" --label fleet=seed >/dev/null
    serve "$DB" "$WORK/hb.toml"
    DUALROOT_FLEET_LOG=warn "$BIN" --api "$API" simulate --register-token bench --mqtt-port "$MQTT_PORT" --prefix bench \
        --devices "$SIM_DEVICES" --heartbeat-every-ms "$every_ms" --seconds "$HB_SECONDS" \
        --outbox-retry-ms 10000 --report "$WORK/hb-$store.json" >/dev/null
    python3 - "$WORK/hb-$store.json" "$store" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("%-10s %12.0f %10d %10d %10d" % (sys.argv[2], r["heartbeatsPerS"], r["heartbeatP50Ms"], r["heartbeatP99Ms"], r["heartbeatsAcked"]))
EOF
    kill "$SERVE_PID"; wait "$SERVE_PID" 2>/dev/null || true
done
echo "(floor 170/s: 50,000 devices every 5 min; aim 1,700/s)"

echo "== 2. rollout with ${FAIL_PCT}% install failures: $SIM_DEVICES devices, waves 1/10/50/100 %, budget $BUDGET or ${BUDGET_PCT}%, cap $CAP"
# heartbeats every soak/3: the soak is the floor of 3 intervals
config $(( SOAK_MS / 3 )) >"$WORK/ro.toml"
serve "$WORK/ro.sqlite" "$WORK/ro.toml"
sim_bg() { # group devices fail_pct
    DUALROOT_FLEET_LOG=warn "$BIN" --api "$API" simulate --register-token bench --mqtt-port "$MQTT_PORT" --prefix bench \
        --devices "$2" --label "group=$1" --canaries 5 --install-fail-pct "$3" \
        --download-ms 500 --reboot-ms 1000 --outbox-retry-ms 5000 >"$WORK/sim-$1.json" 2>"$WORK/sim-$1.log" &
    PIDS+=($!)
}
wait_online() { # group count
    for _ in $(seq 600); do
        n=$("$BIN" --api "$API" --json devices list | json "sum(1 for x in d if x['online'] and x['labels'].get('group')=='$1')")
        [ "$n" -ge "$2" ] && return 0
        sleep 1
    done
    echo "only $n of $2 devices of group $1 online" >&2; exit 1
}
spec() { # id group
    cat <<EOF
{"id": "$1", "kind": "image", "version": "2.0", "url": "https://files.example/b", "sha256": "00",
 "selector": {"labels": {"group": "$2"}},
 "waves": [{"percent": 1}, {"percent": 10}, {"percent": 50}, {"percent": 100}],
 "soakMs": $SOAK_MS, "maxFailures": $BUDGET, "maxFailurePct": $BUDGET_PCT, "inFlightCap": $CAP}
EOF
}
sim_bg faulty "$SIM_DEVICES" "$FAIL_PCT"
wait_online faulty "$SIM_DEVICES"
spec faulty faulty >"$WORK/faulty.json"
"$BIN" --api "$API" rollout create "$WORK/faulty.json" >/dev/null
"$BIN" --api "$API" rollout start faulty >/dev/null
t0=$(date +%s)
while :; do
    "$BIN" --api "$API" --json rollout status faulty >"$WORK/st.json"
    state=$(json "d['state']" <"$WORK/st.json")
    [ "$state" = halted ] || [ "$state" = completed ] && break
    [ $(( $(date +%s) - t0 )) -gt 1800 ] && { echo "no end after 30 min"; break; }
    sleep 1
done
python3 - "$WORK/st.json" "$CAP" "$BUDGET" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1])); cap, budget = int(sys.argv[2]), int(sys.argv[3])
b = d["budget"]
print("state %s at wave %d of %d: %s" % (d["state"], d["wave"] + 1, d["waveCount"], d.get("reason")))
allowed = max(b["maxFailures"], b["maxFailurePct"] * b["acked"] // 100)
print("failed %d (acknowledged %d); budget %d + in-flight cap %d = %d: %s" % (
    b["failed"], b["acked"], allowed, cap, allowed + cap, "within" if b["failed"] <= allowed + cap else "EXCEEDED"))
for w in d["waves"]:
    print("  wave %d: %d members, %d succeeded, %d failed, %d in flight, %d not started" % (
        w["index"] + 1, w["members"], w["succeeded"], w["failed"], w["inFlight"], w["notStarted"]))
EOF

echo "== 3. clean rollout: $CLEAN_DEVICES devices, 4 waves, soak $SOAK_MS ms each"
sim_bg clean "$CLEAN_DEVICES" 0
wait_online clean "$CLEAN_DEVICES"
spec clean clean >"$WORK/clean.json"
"$BIN" --api "$API" rollout create "$WORK/clean.json" >/dev/null
t0=$(date +%s.%N)
"$BIN" --api "$API" rollout start clean >/dev/null
while :; do
    state=$("$BIN" --api "$API" --json rollout status clean | json "d['state']")
    [ "$state" = completed ] || [ "$state" = halted ] && break
    sleep 0.5
done
t1=$(date +%s.%N)
python3 -c "print('clean rollout %s in %.1f s; soak floor 4 x %.1f s = %.1f s' % ('$state', $t1 - $t0, $SOAK_MS/1000, 4*$SOAK_MS/1000))"
