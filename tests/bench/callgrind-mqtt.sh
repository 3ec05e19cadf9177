#!/bin/bash
# SPDX-License-Identifier: MIT
# Instructions per message of fieldhubd's threads at MQTT saturation, under callgrind (the
# method of tests/bench/README.md, MQTT section): stable on a shared machine, unlike wall time.
#
#   tests/bench/callgrind-mqtt.sh [BUILD_DIR]     (default: build-bench beside this tree)
#
# Environment: CONNS [20] connections (handshakes under callgrind are slow), SETTLE [30]
# seconds from the generator's start to zeroing the counters (all handshakes done), MEASURE
# [25] seconds measured, KEEP [0] 1: keep the work directory. The generator offers saturation
# (window 16, 256 B QoS 1, ECDHE-ECDSA-AES128-GCM-SHA256). Prints, per thread, the
# instructions between zeroing and dumping divided by the messages the hub accepted in between
# (fieldhub_messages_in_total on the metrics listener). Thread 1 is the event loop.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/../.." && pwd)
BENCH_NAME=callgrind-mqtt
. "$SRC/tests/bench/bench-lib.sh"
BUILD=${1:-$SRC/build-bench}
FH=$BUILD/gateway/fieldhubd
LOAD=$BUILD/tests/mqtt-load
CONNS=${CONNS:-20}
SETTLE=${SETTLE:-30}
MEASURE=${MEASURE:-25}
KEEP=${KEEP:-0}
HUB=gw.bench.local
for f in "$FH" "$LOAD"; do [ -x "$f" ] || { echo "callgrind-mqtt: $f is missing" >&2; exit 2; }; done
command -v valgrind >/dev/null || { echo "callgrind-mqtt: valgrind is not installed" >&2; exit 2; }

WORK=$(mktemp -d /var/tmp/callgrind-mqtt.XXXXXX)
VP= LP=
cleanup() {
        for p in $LP $VP; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
        if [ "$KEEP" = 1 ]; then echo "callgrind-mqtt: work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

make_server_cert "$WORK" "$HUB"
KEY=$(head -c 32 /dev/urandom | base64)
PORT=$(free_port)
MPORT=$(free_port)
write_mqtt_config "$WORK" "$HUB" "$PORT" "127.0.0.1:$MPORT" 16

valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$WORK/cg.out" \
        "$FH" --config "$WORK/fieldhub.yaml" 2>"$WORK/fieldhubd.log" &
VP=$!
for _ in $(seq 600); do [ -S "$WORK/admin.sock" ] && break; kill -0 $VP || exit 1; sleep 0.2; done
sleep 2
python3 - "$WORK/admin.sock" "$CONNS" "$KEY" <<'EOF'
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
    if not r.get("ok") or r["result"]["status"] != 200:
        sys.exit(f"callgrind-mqtt: creating devices failed: {r}")
EOF
metric() {
        curl -s "http://127.0.0.1:$MPORT/metrics" | awk '/^fieldhub_messages_in_total/ { s += $2 } END { print s + 0 }'
}
timeout $((SETTLE + MEASURE + 120)) "$LOAD" --port "$PORT" --cafile "$WORK/server.crt" --hub "$HUB" --key "$KEY" \
        --connections "$CONNS" --window 16 --payload 256 --ciphers ECDHE-ECDSA-AES128-GCM-SHA256 \
        --duration $((MEASURE + 20)) --warmup "$SETTLE" >"$WORK/mqtt-load.out" 2>"$WORK/mqtt-load.log" &
LP=$!
sleep "$SETTLE"
callgrind_control -z $VP >/dev/null
m0=$(metric)
sleep "$MEASURE"
m1=$(metric)
callgrind_control -d $VP >/dev/null
n=$((m1 - m0))
echo "callgrind-mqtt: $FH: $CONNS connections, $n messages accepted in ${MEASURE}s under callgrind"
[ "$n" -gt 0 ] || { tail -5 "$WORK/mqtt-load.log" >&2; exit 1; }
for f in "$WORK"/cg.out.1-*; do
        t=$(sed -n 's/^thread: //p' "$f")
        ir=$(sed -n 's/^summary: //p' "$f")
        echo "  thread $t: $ir instructions, $((ir / n)) per message"
done
