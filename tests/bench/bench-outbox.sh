#!/bin/bash
# SPDX-License-Identifier: MIT
# By-hand store-and-forward benchmark (issue 6): outbox ingest with routing to two endpoints
# against the issue's baseline, raw paho -> mosquitto QoS 1 with the same window
# (tests/bench/paho-pub.c), and, for context, our epoll generator (tests/bench/mqtt-load.c)
# straight into mosquitto; all in the same run, interleaved, same window, payload and TLS;
# then the drain of a buffered backlog after the endpoint's broker returns.
# See tests/bench/README.md.
#
#   tests/bench/bench-outbox.sh [BUILD_DIR]        (default: build-bench beside this tree)
#
# Environment (defaults in brackets):
#   CONNS [100]       device connections     WINDOW [16]     in-flight PUBLISHes per connection
#   PAYLOAD [256]     bytes per message      DURATION [10]   measured seconds (ingest)
#   WARMUP [2]        seconds before measuring               RUNS [3]  ingest runs (median)
#   BACKLOG [1000000] messages buffered before the drain (the issue: 1,000,000)      KEEP [0]  1: keep the work dir
#   SERVER_CPU [0]    core of the servers    GEN_CPU [1]     core of the generator
#   PAHO_PROCS [1]    processes of paho-pub (paho runs all its clients on 2 threads per process)
#   EP_WINDOW [1000]  in-flight window of fieldhub's mqtt endpoint (`inflight`), and of the
#                     second paho contender (one client, like the endpoint)
#   RT [0]            1: servers and generators SCHED_FIFO (as root; same for every contender)
#   DRAIN_ONLY [0]    1: skip the ingest runs, only the drain (with e.g. BACKLOG=20000 to iterate
#                     on the drain's start; the live rate then is LIVE_RATE [20000] msg/s)
#   DRAIN_RUNS [1]    drains in a row (sink down, buffer BACKLOG, sink up, measure); the median
#                     of the first-confirmed delays is printed after the runs
#
# Placement (identical for every contender as far as there is a counterpart):
#   SERVER_CPU: fieldhubd | the contender mosquitto (TLS)
#   GEN_CPU:    mqtt-load (devices -> fieldhubd, and the context run -> mosquitto) | paho-pub;
#               the sink mosquitto (fieldhub's mqtt endpoint target; the contenders have none)
#
# fieldhubd routes every message to two endpoints: `sink` (mqtt, QoS 1, window 1000, to a
# second mosquitto on plain TCP) and `archive` (file, JSON lines, fsync per batch), fed by
# mqtt-load (CONNS devices, WINDOW each, TLS). Contenders into mosquitto over TLS (persistence
# off): paho-pub (CONNS paho MQTTAsync clients, QoS 1, maxInflight = WINDOW, the issue's
# baseline: the devices' shape), paho-pub with ONE client and maxInflight = EP_WINDOW (the
# shape of fieldhub's own paho client: what paho alone pushes through one connection), and
# mqtt-load (the same generator as fieldhub's, context only).
# Drain: the sink broker is stopped, BACKLOG messages are published (all acknowledged, durable),
# the broker is started again, and the script measures from the moment its port accepts
# connections (polled every 2 ms) when the first message is confirmed and when the backlog is
# empty (polling `fieldhubctl endpoints` every 20 ms). The sink keeps the default retry
# settings (retry.max 1 s), so the drain start shows what a default configuration does.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/../.." && pwd)
BENCH_NAME=bench-outbox
. "$SRC/tests/bench/bench-lib.sh"
BUILD=${1:-$SRC/build-bench}
FIELDHUBD=$BUILD/gateway/fieldhubd
FIELDHUBCTL=$BUILD/gateway/fieldhubctl
LOAD=$BUILD/tests/mqtt-load
PAHO=$BUILD/tests/paho-pub
CONNS=${CONNS:-100}
WINDOW=${WINDOW:-16}
PAYLOAD=${PAYLOAD:-256}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
RUNS=${RUNS:-3}
BACKLOG=${BACKLOG:-1000000}
KEEP=${KEEP:-0}
SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
PAHO_PROCS=${PAHO_PROCS:-1}
EP_WINDOW=${EP_WINDOW:-1000}
RT=${RT:-0}
DRAIN_ONLY=${DRAIN_ONLY:-0}
DRAIN_RUNS=${DRAIN_RUNS:-1}
LIVE_RATE=${LIVE_RATE:-20000}
PIN_S="taskset -c $SERVER_CPU" PIN_G="taskset -c $GEN_CPU"
if [ "$RT" = 1 ]; then PIN_S="chrt -f 10 $PIN_S" PIN_G="chrt -f 10 $PIN_G"; fi
CIPHERS=ECDHE-ECDSA-AES128-GCM-SHA256
HUB=gw.bench.local

for f in "$FIELDHUBD" "$FIELDHUBCTL" "$LOAD" "$PAHO"; do
        [ -x "$f" ] || { echo "bench-outbox: $f is missing: meson setup $BUILD --buildtype=release && ninja -C $BUILD" >&2; exit 2; }
done
WORK=$(mktemp -d /var/tmp/bench-outbox.XXXXXX)
chmod 755 "$WORK"
FH_PID= MQ_PID= SINK_PID=
cleanup() {
        stop_pid "$FH_PID"; stop_pid "$MQ_PID"; stop_pid "$SINK_PID"
        if [ "$KEEP" = 1 ]; then echo "bench-outbox: work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -keyout "$WORK/server.key" -out "$WORK/server.crt" -subj "/CN=127.0.0.1" \
        -addext "subjectAltName=IP:127.0.0.1,DNS:$HUB" 2>/dev/null
chmod 600 "$WORK/server.key"
cp "$WORK/server.key" "$WORK/mosquitto.key"; chmod 644 "$WORK/mosquitto.key"
KEY=$(head -c 32 /dev/urandom | base64)
head -c 32 /dev/urandom | base64 > "$WORK/owner.key"; chmod 600 "$WORK/owner.key"

# ---- the contender: mosquitto over TLS, QoS 1, no persistence ------------------------------
MQ_PORT=$(free_port)
cat > "$WORK/mosquitto.conf" <<EOF
per_listener_settings false
allow_anonymous true
persistence false
set_tcp_nodelay true
max_inflight_messages $WINDOW
listener $MQ_PORT 127.0.0.1
certfile $WORK/server.crt
keyfile $WORK/mosquitto.key
EOF
# ---- the endpoint's broker: plain TCP on loopback ------------------------------------------
SINK_PORT=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\nmax_queued_messages 0\n' \
        "$SINK_PORT" > "$WORK/sink.conf"
start_sink() { $PIN_G mosquitto -c "$WORK/sink.conf" 2>>"$WORK/sink.log" & SINK_PID=$!; wait_port "$SINK_PORT" "$SINK_PID" sink; }

FH_PORT=$(free_port)
mkdir -p "$WORK/logs"
cat > "$WORK/fieldhub.yaml" <<EOF
hub:
  host_name: $HUB
  policies:
    - name: iothubowner
      key_file: $WORK/owner.key
state_dir: $WORK/state
logs_dir: $WORK/logs
log: {level: warning, target: stderr}
admin: {socket: $WORK/admin.sock}
mqtt:
  listen: ["127.0.0.1:$FH_PORT"]
  tls: {cert_file: $WORK/server.crt, key_file: $WORK/server.key}
  limits: {max_connections: 20000, max_connections_per_address: 20000}
endpoints:
  - name: sink
    type: mqtt
    address: tcp://127.0.0.1:$SINK_PORT
    topic: "sink/{deviceId}"
    inflight: $EP_WINDOW
  - name: archive
    type: file
    file: archive.jsonl
    max_size: 256MiB
    max_files: 2
routes:
  - {name: to-sink, condition: "true", endpoint: sink}
  - {name: to-archive, condition: "true", endpoint: archive}
EOF
$PIN_S "$FIELDHUBD" --config "$WORK/fieldhub.yaml" 2>>"$WORK/fieldhubd.log" & FH_PID=$!
# (wait on the admin socket: see the report of issue 6 — a bare TCP connect + close on the MQTT
# TLS listener crashed fieldhubd at the time of writing)
for _ in $(seq 200); do
        [ -S "$WORK/admin.sock" ] && "$FIELDHUBCTL" --socket "$WORK/admin.sock" status >/dev/null 2>&1 && break
        kill -0 "$FH_PID" 2>/dev/null || { tail -20 "$WORK/fieldhubd.log" >&2; echo "bench-outbox: fieldhubd did not start" >&2; exit 1; }
        sleep 0.1
done
python3 - "$WORK/admin.sock" "$CONNS" "$KEY" <<'EOF'
import json, socket, sys
path, n, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_UNIX); s.connect(path); f = s.makefile()
for start in range(0, n, 100):
    entries = [{"id": f"bench-{i:06d}", "importMode": "createOrUpdate",
                "authentication": {"type": "sas", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}}
               for i in range(start, min(n, start + 100))]
    s.sendall((json.dumps({"cmd": "api", "args": {"method": "POST", "target": "/devices?api-version=2021-04-12",
                                                  "headers": {"Content-Type": "application/json"},
                                                  "body": json.dumps(entries)}}) + "\n").encode())
    r = json.loads(f.readline())
    assert r.get("ok") and r["result"]["status"] == 200, r
EOF
$PIN_S mosquitto -c "$WORK/mosquitto.conf" 2>>"$WORK/mosquitto.log" & MQ_PID=$!
wait_port "$MQ_PORT" "$MQ_PID" mosquitto
start_sink

eps() { "$FIELDHUBCTL" --socket "$WORK/admin.sock" --json endpoints; }
load() { # port pid [options]: prints the RESULT json
        local port=$1 pid=$2
        shift 2
        timeout 600 $PIN_G "$LOAD" --port "$port" --cafile "$WORK/server.crt" --hub "$HUB" --key "$KEY" \
                --connections "$CONNS" --window "$WINDOW" --payload "$PAYLOAD" --ciphers "$CIPHERS" --server-pid "$pid" \
                "$@" 2>>"$WORK/mqtt-load.log" | sed -n 's/^RESULT //p'
}
paho() { # port pid connections window procs: prints the RESULT json
        timeout 600 $PIN_G "$PAHO" --port "$1" --cafile "$WORK/server.crt" --hub "$HUB" --key "$KEY" \
                --connections "$3" --window "$4" --payload "$PAYLOAD" --ciphers "$CIPHERS" --server-pid "$2" \
                --procs "$5" --duration "$DURATION" --warmup "$WARMUP" 2>>"$WORK/paho-pub.log" | sed -n 's/^RESULT //p'
}

echo "bench-outbox: $CONNS connections, window $WINDOW, $PAYLOAD B QoS 1; fieldhubd and mosquitto on CPU $SERVER_CPU;" \
     "mqtt-load, paho-pub and the sink mosquitto on CPU $GEN_CPU${RT:+ (RT=$RT)}" >&2
RES=$WORK/results.jsonl
: > "$RES"
[ "$DRAIN_ONLY" = 1 ] && RUNS=0
for i in $(seq "$RUNS"); do
        r=$(load "$FH_PORT" "$FH_PID" --duration "$DURATION" --warmup "$WARMUP"); echo "{\"s\":\"fieldhub\",\"r\":${r:-null}}" >> "$RES"
        # let both endpoints catch up before the next run
        for _ in $(seq 600); do
                eps | python3 -c 'import json,sys; sys.exit(0 if all(e["backlog"]["count"]==0 for e in json.load(sys.stdin)) else 1)' && break
                sleep 0.1
        done
        r=$(paho "$MQ_PORT" "$MQ_PID" "$CONNS" "$WINDOW" "$PAHO_PROCS"); echo "{\"s\":\"paho\",\"r\":${r:-null}}" >> "$RES"
        r=$(paho "$MQ_PORT" "$MQ_PID" 1 "$EP_WINDOW" 1); echo "{\"s\":\"paho1\",\"r\":${r:-null}}" >> "$RES"
        r=$(load "$MQ_PORT" "$MQ_PID" --duration "$DURATION" --warmup "$WARMUP"); echo "{\"s\":\"mosquitto\",\"r\":$r}" >> "$RES"
done
[ "$DRAIN_ONLY" = 1 ] || python3 - "$RES" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(s, k):
    v = [d["r"][k] for d in rows if d["s"] == s and d["r"]]
    return statistics.median(v) if v else 0
fh, pa, p1, mq = (med(s, "msgs_per_sec") for s in ("fieldhub", "paho", "paho1", "mosquitto"))
label = {"fieldhub": "fieldhub (mqtt-load -> fieldhubd -> sink + archive)",
         "paho": "paho-pub N clients -> mosquitto (issue baseline)",
         "paho1": "paho-pub 1 client, endpoint window -> mosquitto",
         "mosquitto": "mqtt-load -> mosquitto (context)"}
for s in ("fieldhub", "paho", "paho1", "mosquitto"):
    print(f"ingest {label[s]:52s}: median {med(s, 'msgs_per_sec'):7.0f} msg/s  p50 {med(s, 'p50_ms'):.2f} ms  "
          f"p99 {med(s, 'p99_ms'):.2f} ms  server {med(s, 'server_us_per_msg'):.1f} us/msg  generator "
          f"{med(s, 'gen_cores'):.2f} cores  others {med(s, 'other_cores'):.2f} cores  "
          f"runs {[round(d['r']['msgs_per_sec']) for d in rows if d['s'] == s and d['r']]}")
print(f"ingest ratio fieldhub (routing to 2 endpoints, durable) / raw paho -> mosquitto QoS 1 (goal >= 0.8x): "
      f"{fh / pa:.2f}x" if pa else "no paho figure")
print(f"ingest ratio fieldhub / paho-pub with one client and the endpoint's window: {fh / p1:.2f}x"
      if p1 else "no paho1 figure")
print(f"ingest ratio fieldhub / mqtt-load -> mosquitto (context): {fh / mq:.2f}x" if mq else "no mosquitto figure")
EOF

# ---- drain ---------------------------------------------------------------------------------
DRAINS=$WORK/drains.txt
: > "$DRAINS"
for drain_run in $(seq "$DRAIN_RUNS"); do
stop_pid "$SINK_PID"; SINK_PID=
sleep 0.5
start_backlog=$(eps | python3 -c 'import json,sys; print({e["name"]: e for e in json.load(sys.stdin)}["sink"]["backlog"]["count"])')
per_sec=$(python3 - "$RES" "$LIVE_RATE" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
v = [d["r"]["msgs_per_sec"] for d in rows if d["s"] == "fieldhub" and d["r"]]
print(int(statistics.median(v)) if v else int(sys.argv[2]))
EOF
)
secs=$(python3 -c "import math; print(max(2, math.ceil(($BACKLOG - $start_backlog) / max(1, $per_sec) * 1.3)))")
echo "bench-outbox: buffering about $BACKLOG messages (sink down) in ~$secs s" >&2
load "$FH_PORT" "$FH_PID" --duration "$secs" --warmup 1 > /dev/null  # (mqtt-load sends nothing with --warmup 0)
backlog=$(eps | python3 -c 'import json,sys; print({e["name"]: e for e in json.load(sys.stdin)}["sink"]["backlog"]["count"])')
echo "bench-outbox: sink backlog $backlog messages; starting the sink broker" >&2
$PIN_G mosquitto -c "$WORK/sink.conf" 2>>"$WORK/sink.log" & SINK_PID=$!
python3 - "$FIELDHUBCTL" "$WORK/admin.sock" "$backlog" "$SINK_PORT" "$per_sec" "$DRAINS" <<'EOF'
import json, socket, subprocess, sys, time
ctl, sock, backlog, port, live = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
t_start = time.time()
while True:  # the moment the broker accepts connections: the uplink is back
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        break
    except OSError:
        if time.time() - t_start > 30:
            sys.exit("the sink broker did not start")
        time.sleep(0.002)
t0 = time.time()
def sink():
    out = subprocess.run([ctl, "--socket", sock, "--json", "endpoints"], capture_output=True, text=True).stdout
    return {e["name"]: e for e in json.loads(out)}["sink"]
d0 = sink()["delivered"]
first = None
while True:
    e = sink()
    now = time.time()
    if first is None and e["delivered"] > d0:
        first = now - t0
    if e["backlog"]["count"] == 0:
        break
    if now - t0 > 3600:
        sys.exit("drain did not finish within an hour")
    time.sleep(0.02)
total = now - t0
rate = backlog / max(1e-9, total - (first or 0))
print(f"drain of {backlog} messages: first confirmed {first:.3f} s after the broker accepted connections "
      f"(goal <= 1 s), empty after "
      f"{total:.2f} s: {rate:.0f} msg/s ({rate / live:.2f}x the live ingest rate of {live:.0f} msg/s; goal >= 0.5x)")
with open(sys.argv[6], "a") as f:
    f.write(f"{first} {rate}\n")
EOF
done
if [ "$DRAIN_RUNS" -gt 1 ]; then
        python3 - "$DRAINS" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
firsts = sorted(float(r[0]) for r in rows)
print(f"drain start over {len(rows)} runs: median {statistics.median(firsts):.3f} s, min {firsts[0]:.3f} s, "
      f"max {firsts[-1]:.3f} s (first confirmed after the broker accepted connections; goal <= 1 s); "
      f"runs {[round(x, 3) for x in firsts]}; drain rate median {statistics.median(float(r[1]) for r in rows):.0f} msg/s")
EOF
fi
if grep -qiE "sanitizer|runtime error" "$WORK/fieldhubd.log"; then
        echo "bench-outbox: fieldhubd reported errors:" >&2; grep -iE "sanitizer|runtime error" "$WORK/fieldhubd.log" | head >&2
fi
