#!/bin/bash
# SPDX-License-Identifier: MIT
# By-hand MQTT ingest benchmark (issue 5): fieldhubd (release build, durable PUBACKs) against
# mosquitto from Debian, in the same run, both over TLS on loopback with the same certificate,
# driven by the same generator (tests/bench/mqtt-load.c). See tests/bench/README.md.
#
#   tests/bench/bench-mqtt.sh [BUILD_DIR]          (default: build-bench beside this tree)
#
# Environment (defaults in brackets):
#   CONNS ["100 1000"]  connection counts     RUNS [3]        runs per figure (median reported)
#   DURATION [10]       measured seconds      WARMUP [2]      seconds before measuring
#   PAYLOAD [256]       bytes per message     WINDOW [16]     in-flight PUBLISHes per connection
#   IDLE [10000]        idle TLS connections  IDLE_PROCS [2]  generator processes for them
#   SERVER_CPU [0]      core of the servers   GEN_CPU [1]     core of the generator
#   RATE_FRACTION [0.5] fixed rate = this x mosquitto's median saturation rate (per CONNS)
#   RATE []             a fixed offered rate (msg/s) instead, for every CONNS
#   RATES [20000]       more fixed offered rates run for both, for every CONNS (CPU per message
#                       compared where both servers keep up; "" for none)
#   CIPHERS [ECDHE-ECDSA-AES128-GCM-SHA256]  the TLS 1.2 suite both servers must use
#   NICE [-10]          priority of both servers and the generator (when run as root)
#   RT [0]              1: SCHED_FIFO for both servers and the generator instead (as root)
#   ONLY ["sat rate idle"]  which tests       KEEP [0]        1: keep the work directory
#   OUT [$BUILD_DIR/bench-mqtt]  where results.jsonl and summary.md are written
#
# Every process it starts is stopped by pid on exit; everything listens on 127.0.0.1 only; each
# generator run is bounded by `timeout`.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/../.." && pwd)
BENCH_NAME=bench-mqtt
. "$SRC/tests/bench/bench-lib.sh"
BUILD=${1:-$SRC/build-bench}
FIELDHUBD=$BUILD/gateway/fieldhubd
LOAD=$BUILD/tests/mqtt-load
CONNS=${CONNS:-"100 1000"}
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
PAYLOAD=${PAYLOAD:-256}
WINDOW=${WINDOW:-16}
IDLE=${IDLE:-10000}
IDLE_PROCS=${IDLE_PROCS:-2}
SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
RATE_FRACTION=${RATE_FRACTION:-0.5}
RATES=${RATES-20000}
CIPHERS=${CIPHERS:-ECDHE-ECDSA-AES128-GCM-SHA256}
NICE=${NICE:--10}
RT=${RT:-0}
# Both servers and the generator run at the same raised priority (as root), so that builds
# on the same machine disturb the contenders less; it changes nothing between them. RT=1
# makes it SCHED_FIFO (the kernel's RT throttling still leaves 5 % to everything else).
PRIO="nice -n $NICE"
[ "$RT" = 1 ] && PRIO="chrt -f 10"
[ "$(id -u)" -eq 0 ] || PRIO=""
ONLY=${ONLY:-"sat rate idle"}
KEEP=${KEEP:-0}
OUT=${OUT:-$BUILD/bench-mqtt}
HUB=gw.bench.local

for f in "$FIELDHUBD" "$LOAD"; do
        [ -x "$f" ] || { echo "bench-mqtt: $f is missing: meson setup $BUILD --buildtype=release && ninja -C $BUILD" >&2; exit 2; }
done
command -v mosquitto >/dev/null || { echo "bench-mqtt: mosquitto is not installed" >&2; exit 2; }
command -v openssl >/dev/null || { echo "bench-mqtt: openssl is not installed" >&2; exit 2; }
NDEV=$IDLE
for n in $CONNS; do [ "$n" -gt "$NDEV" ] && NDEV=$n; done

# On disk (not tmpfs): fieldhub's PUBACKs wait for fsync.
WORK=$(mktemp -d /var/tmp/bench-mqtt.XXXXXX)
chmod 755 "$WORK" # mosquitto reads its certificate as user mosquitto
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: > "$RESULTS"
FH_PID=
MQ_PID=

cleanup() {
        stop_pid "$FH_PID"; FH_PID=
        stop_pid "$MQ_PID"; MQ_PID=
        if [ "$KEEP" = 1 ]; then echo "bench-mqtt: work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM


# ---- shared TLS material: one EC P-256 certificate for both servers -------------------------
make_server_cert "$WORK" "$HUB"
# mosquitto drops root for its own user before reading its key: it gets a readable copy.
cp "$WORK/server.key" "$WORK/mosquitto.key"
chmod 644 "$WORK/mosquitto.key"
KEY=$(head -c 32 /dev/urandom | base64)

# ---- fieldhubd -----------------------------------------------------------------------------
FH_PORT=$(free_port)
write_mqtt_config "$WORK" "$HUB" "$FH_PORT" "127.0.0.1:0" "$WINDOW"

start_fieldhub() {
        $PRIO taskset -c "$SERVER_CPU" "$FIELDHUBD" --config "$WORK/fieldhub.yaml" 2>>"$WORK/fieldhubd.log" &
        FH_PID=$!
        # A restart reads the events stream's index back: ~0.3 s per million retained messages,
        # and the saturation runs leave tens of millions behind.
        for _ in $(seq 1800); do
                [ -S "$WORK/admin.sock" ] && python3 - "$WORK/admin.sock" <<'EOF' 2>/dev/null && return 0
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b'{"cmd":"status","args":{}}\n'); assert json.loads(s.makefile().readline())["ok"]
EOF
                kill -0 "$FH_PID" 2>/dev/null || { tail -20 "$WORK/fieldhubd.log" >&2; echo "bench-mqtt: fieldhubd did not start" >&2; exit 1; }
                sleep 0.1
        done
        echo "bench-mqtt: fieldhubd did not answer on its admin socket" >&2
        exit 1
}
stop_fieldhub() { stop_pid "$FH_PID"; FH_PID=; rm -f "$WORK/admin.sock"; }

create_devices() { # N devices bench-000000.. with KEY, through the admin socket's service API
        python3 - "$WORK/admin.sock" "$1" "$KEY" <<'EOF'
import json, socket, sys
path, n, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_UNIX); s.connect(path); f = s.makefile()
for start in range(0, n, 100):
    entries = [{"id": f"bench-{i:06d}", "importMode": "createOrUpdate",
                "authentication": {"type": "sas", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}}
               for i in range(start, min(n, start + 100))]
    req = {"cmd": "api", "args": {"method": "POST", "target": "/devices?api-version=2021-04-12",
                                  "headers": {"Content-Type": "application/json"}, "body": json.dumps(entries)}}
    s.sendall((json.dumps(req) + "\n").encode())
    r = json.loads(f.readline())
    body = json.loads(r["result"]["body"]) if r.get("ok") and r["result"]["body"] else None
    if not r.get("ok") or r["result"]["status"] != 200 or (body and body.get("errors")):
        sys.exit(f"bench-mqtt: creating devices failed: {r}")
EOF
}

# ---- mosquitto -----------------------------------------------------------------------------
MQ_PORT=$(free_port)
cat > "$WORK/mosquitto.conf" <<EOF
per_listener_settings false
allow_anonymous true
persistence false
log_dest stderr
log_type error
log_type warning
set_tcp_nodelay true
max_inflight_messages $WINDOW
listener $MQ_PORT 127.0.0.1
certfile $WORK/server.crt
keyfile $WORK/mosquitto.key
EOF
start_mosquitto() {
        $PRIO taskset -c "$SERVER_CPU" mosquitto -c "$WORK/mosquitto.conf" 2>>"$WORK/mosquitto.log" &
        MQ_PID=$!
        for _ in $(seq 100); do
                python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$MQ_PORT),1)" 2>/dev/null && return 0
                kill -0 "$MQ_PID" 2>/dev/null || { cat "$WORK/mosquitto.log" >&2; echo "bench-mqtt: mosquitto did not start" >&2; exit 1; }
                sleep 0.1
        done
        echo "bench-mqtt: mosquitto does not listen" >&2
        exit 1
}
stop_mosquitto() { stop_pid "$MQ_PID"; MQ_PID=; }

# ---- one generator run ----------------------------------------------------------------------
# run SERVER TEST CONNS RUN [mqtt-load options...]: appends one JSON line to results.jsonl.
# Both servers get byte-identical traffic: the same client ids, IoT Hub user names, SAS tokens
# and topics (mosquitto, with allow_anonymous and no password file, does not check them).
run() {
        local server=$1 test=$2 conns=$3 runno=$4 pid port line
        shift 4
        if [ "$server" = fieldhub ]; then pid=$FH_PID; port=$FH_PORT; else pid=$MQ_PID; port=$MQ_PORT; fi
        line=$(timeout 400 $PRIO taskset -c "$GEN_CPU" "$LOAD" --port "$port" --cafile "$WORK/server.crt" \
                --hub "$HUB" --key "$KEY" --connections "$conns" --window "$WINDOW" --payload "$PAYLOAD" \
                --ciphers "$CIPHERS" --server-pid "$pid" "$@" 2>>"$WORK/mqtt-load.log" | sed -n 's/^RESULT //p') || true
        if [ -z "$line" ]; then
                echo "bench-mqtt: $server $test $conns run $runno: no result (see $WORK/mqtt-load.log)" >&2
                KEEP=1
                line='{}'
        fi
        echo "{\"server\":\"$server\",\"test\":\"$test\",\"conns\":$conns,\"run\":$runno,\"r\":$line}" >> "$RESULTS"
        python3 - "$(tail -1 "$RESULTS")" >&2 <<'EOF'
import json, sys
d = json.loads(sys.argv[1])
r = d["r"]
if r:
    print("  %-9s %-5s %6d run %d: %9.0f msg/s  p50 %7.3f ms  p99 %7.3f ms  server %.2f cores %6.2f us/msg  "
          "RSS %d KiB  gen %.2f cores  others %.2f cores  connected %d/%d in %.1f s, closed %d"
          % (d["server"], d["test"], d["conns"], d["run"], r["msgs_per_sec"], r["p50_ms"], r["p99_ms"],
             r["server_cores"], r["server_us_per_msg"], r["server_rss_kb"], r["gen_cores"], r.get("other_cores", 0), r["connected"],
             r["connections"], r["connect_sec"], r["closed"]), flush=True)
EOF
}

median_rate() { # SERVER TEST CONNS -> median msgs/s
        python3 - "$RESULTS" "$@" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
v = [d["r"]["msgs_per_sec"] for d in rows if d["server"] == sys.argv[2] and d["test"] == sys.argv[3]
     and d["conns"] == int(sys.argv[4]) and d["r"]]
print(int(statistics.median(v)) if v else 0)
EOF
}

echo "bench-mqtt: work directory $WORK, results in $RESULTS" >&2
echo "bench-mqtt: servers on CPU $SERVER_CPU, generator on CPU $GEN_CPU; $PAYLOAD B QoS 1, window $WINDOW, ${DURATION}s measured after ${WARMUP}s" >&2
start_fieldhub
create_devices "$NDEV"
start_mosquitto
echo "bench-mqtt: fieldhubd pid $FH_PID (port $FH_PORT), mosquitto pid $MQ_PID (port $MQ_PORT), $NDEV devices" >&2

for conns in $CONNS; do
        if [[ " $ONLY " == *" sat "* ]]; then
                for i in $(seq "$RUNS"); do
                        run fieldhub sat "$conns" "$i" --duration "$DURATION" --warmup "$WARMUP"
                        run mosquitto sat "$conns" "$i" --duration "$DURATION" --warmup "$WARMUP"
                done
        fi
        if [[ " $ONLY " == *" rate "* ]]; then
                msat=$(median_rate mosquitto sat "$conns")
                if [ "$msat" -le 0 ]; then
                        msat=$(median_rate fieldhub sat "$conns")
                fi
                rate=$(python3 -c "print(int($msat * $RATE_FRACTION))")
                [ -n "${RATE:-}" ] && rate=$RATE
                for r in $rate $RATES; do
                        [ "$r" -gt 0 ] || continue
                        echo "bench-mqtt: fixed offered rate for $conns connections: $r msg/s" >&2
                        for i in $(seq "$RUNS"); do
                                run fieldhub rate "$conns" "$i" --duration "$DURATION" --warmup "$WARMUP" --rate "$r"
                                run mosquitto rate "$conns" "$i" --duration "$DURATION" --warmup "$WARMUP" --rate "$r"
                        done
                done
        fi
done

if [[ " $ONLY " == *" idle "* ]]; then
        # A fresh server for each run, so that the RSS growth is the connections' alone.
        for i in $(seq "$RUNS"); do
                stop_fieldhub; start_fieldhub
                run fieldhub idle "$IDLE" "$i" --idle --duration 5 --warmup 0 --procs "$IDLE_PROCS"
                stop_mosquitto; start_mosquitto
                run mosquitto idle "$IDLE" "$i" --idle --duration 5 --warmup 0 --procs "$IDLE_PROCS"
        done
fi

stop_fieldhub
stop_mosquitto
if grep -qiE "error|sanitizer" "$WORK/fieldhubd.log"; then
        echo "bench-mqtt: fieldhubd logged errors:" >&2
        grep -iE "error|sanitizer" "$WORK/fieldhubd.log" | head -5 >&2
fi

# ---- summary: medians and ratios -----------------------------------------------------------
python3 - "$RESULTS" "$OUT/summary.md" "$PAYLOAD" "$WINDOW" "$DURATION" "$RUNS" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
payload, window, duration, runs = sys.argv[3:7]
def med(server, test, conns, key, offered=None):
    v = [d["r"][key] for d in rows if d["server"] == server and d["test"] == test and d["conns"] == conns and d["r"]
         and (offered is None or d["r"].get("offered") == offered)]
    return statistics.median(v) if v else None
def idle_kib(server, conns):
    v = [(d["r"]["server_rss_kb_connected"] - d["r"]["server_rss_kb_start"]) / max(1, d["r"]["connected"])
         for d in rows if d["server"] == server and d["test"] == "idle" and d["conns"] == conns and d["r"]]
    return statistics.median(v) if v else None
def ratio(a, b):
    return f"{a / b:.2f}x" if a is not None and b else "-"
def fmt(v, f):
    return f.format(v) if v is not None else "-"
cipher = next((d["r"]["cipher"] for d in rows if d["r"].get("cipher")), "?")
out = [f"Medians of {runs} runs, {payload} B QoS 1 PUBLISHes, window {window}, {duration} s measured, "
       f"TLS ({cipher}), servers and generator pinned to one core each.", "",
       "| connections | figure | fieldhub | mosquitto | fieldhub / mosquitto | goal |",
       "|---|---|---|---|---|---|"]
for conns in sorted({d["conns"] for d in rows if d["test"] != "idle"}):
    fs, ms = med("fieldhub", "sat", conns, "msgs_per_sec"), med("mosquitto", "sat", conns, "msgs_per_sec")
    if fs is not None or ms is not None:
        out.append(f"| {conns} | saturation msg/s (durable PUBACK for fieldhub) | {fmt(fs, '{:,.0f}')} | {fmt(ms, '{:,.0f}')} | {ratio(fs, ms)} | >= 1.0x |")
        out.append(f"| {conns} | generator CPU at saturation (cores) | {fmt(med('fieldhub', 'sat', conns, 'gen_cores'), '{:.2f}')} | {fmt(med('mosquitto', 'sat', conns, 'gen_cores'), '{:.2f}')} | | < 1.0 (headroom) |")
        out.append(f"| {conns} | server CPU at saturation (cores) | {fmt(med('fieldhub', 'sat', conns, 'server_cores'), '{:.2f}')} | {fmt(med('mosquitto', 'sat', conns, 'server_cores'), '{:.2f}')} | | |")
    rates = sorted({d["r"]["offered"] for d in rows if d["test"] == "rate" and d["conns"] == conns and d["r"]})
    for rate in rates:
        fr, mr = med("fieldhub", "rate", conns, "msgs_per_sec", rate), med("mosquitto", "rate", conns, "msgs_per_sec", rate)
        fc, mc = med("fieldhub", "rate", conns, "server_us_per_msg", rate), med("mosquitto", "rate", conns, "server_us_per_msg", rate)
        # CPU per message falls as the rate rises: it compares only where both achieved the offered rate.
        kept = fr is not None and mr is not None and fr >= 0.97 * rate and mr >= 0.97 * rate
        out.append(f"| {conns} | achieved msg/s at {rate:,.0f} offered | {fmt(fr, '{:,.0f}')} | {fmt(mr, '{:,.0f}')} | {ratio(fr, mr)} | {'' if kept else 'one server did not keep up: CPU/msg not comparable'} |")
        out.append(f"| {conns} | server CPU us/msg at {rate:,.0f} msg/s | {fmt(fc, '{:.2f}')} | {fmt(mc, '{:.2f}')} | {ratio(fc, mc)} | <= 1.0x{'' if kept else ' (n/a)'} |")
        for k, name in (("p50_ms", "p50"), ("p99_ms", "p99")):
            f_, m_ = med("fieldhub", "rate", conns, k, rate), med("mosquitto", "rate", conns, k, rate)
            out.append(f"| {conns} | {name} publish->PUBACK ms at {rate:,.0f} msg/s | {fmt(f_, '{:.2f}')} | {fmt(m_, '{:.2f}')} | {ratio(f_, m_)} | {'p99 <= 10 ms' if name == 'p99' else ''} |")
        fh, mh = med("fieldhub", "rate", conns, "server_hwm_kb", rate), med("mosquitto", "rate", conns, "server_hwm_kb", rate)
        out.append(f"| {conns} | server peak RSS (VmHWM) MiB at {rate:,.0f} msg/s | {fmt(fh and fh / 1024, '{:.0f}')} | {fmt(mh and mh / 1024, '{:.0f}')} | | |")
for conns in sorted({d["conns"] for d in rows if d["test"] == "idle"}):
    fi, mi = idle_kib("fieldhub", conns), idle_kib("mosquitto", conns)
    fc = med("fieldhub", "idle", conns, "connected")
    mc = med("mosquitto", "idle", conns, "connected")
    out.append(f"| {conns} idle | RSS KiB per idle TLS connection (connected: {fmt(fc, '{:.0f}')} / {fmt(mc, '{:.0f}')}) | {fmt(fi, '{:.1f}')} | {fmt(mi, '{:.1f}')} | {ratio(fi, mi)} | <= 64 KiB |")
    out.append(f"| {conns} idle | seconds to connect all (TLS handshake + CONNECT) | {fmt(med('fieldhub', 'idle', conns, 'connect_sec'), '{:.1f}')} | {fmt(med('mosquitto', 'idle', conns, 'connect_sec'), '{:.1f}')} | | |")
oth = [d["r"].get("other_cores", 0) for d in rows if d["r"] and d["test"] != "idle"]
if oth:
    out += ["", f"CPU used by other processes and the kernel outside both contenders during the measurements: "
            f"median {statistics.median(oth):.2f} cores, max {max(oth):.2f} cores (of {__import__('os').cpu_count()})."]
bad = [d for d in rows if not d["r"] or d["r"]["failed"] or d["r"]["closed"]]
if bad:
    out += ["", "Runs with failed or closed connections: " + ", ".join(
        f"{d['server']} {d['test']} {d['conns']} run {d['run']}" for d in bad)]
open(sys.argv[2], "w").write("\n".join(out) + "\n")
print("\n".join(out))
EOF
echo "bench-mqtt: summary in $OUT/summary.md" >&2
