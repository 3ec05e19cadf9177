#!/bin/bash
# SPDX-License-Identifier: MIT
# By-hand end-to-end benchmark of issue 7: Modbus TCP -> fieldhubd (adapter, store, route) ->
# MQTT QoS 1 to mosquitto. Goal: 100,000 point values per second end to end, fieldhubd on at
# most one core, its RSS <= 3x mosquitto's idle RSS. See tests/bench/README.md.
#
#   tests/bench/bench-modbus-e2e.sh [BUILD_DIR]      (default: build-bench beside this tree;
#                                                     a --buildtype=release -Dtests=true build)
#
# Environment (defaults in brackets):
#   DEVICES [55]     Modbus devices (unit ids 1..DEVICES)
#   F32 [50]         float32 points per device (holding registers 0..2*F32-1)
#   U16 [50]         uint16 points per device (the registers after them)
#   INTERVAL [50]    poll interval in ms           PEERS [DEVICES]  Modbus TCP servers (one
#                                                  connection each; devices spread round-robin)
#   DURATION [30]    measured seconds              WARMUP [5]   seconds before measuring
#   GW_CPU [0]       core of fieldhubd             PEER_CPU [1] core of the peers, mosquitto and
#                                                               the subscriber
#   PERF [0]         1: after the window, `perf record -g` fieldhubd for PERF_SECONDS [10]
#   KEEP [0]         1: keep the work directory (logs, config, perf data)
#   WRAP []          a command fieldhubd is started under, for diagnosis only (figures are then
#                    the wrapped process's), e.g. WRAP="heaptrack -o /var/tmp/fh.heaptrack"
#
# Offered load: DEVICES x (F32 + U16) point values every INTERVAL ms (default 55 x 100 / 50 ms
# = 110,000/s: 10 % above the goal, so that the goal is not judged at the edge), in coalesced reads (at most 125 registers each; 150 registers = 2 requests).
# Peers: tests/bench/bench-modbus-peer.c (libmodbus, every unit id, holding registers 0..999,
# one register changes per request), one server process per PEERS. mosquitto 2.x from Debian on
# plain TCP on loopback (no TLS on either side of the broker; persistence off). fieldhubd
# routes DeviceMessages of the adapter (`adapterType = 'modbus'`) to an `mqtt` endpoint (QoS 1,
# the cursor moves on PUBACK), state on disk (/var/tmp). The subscriber (python3-paho, QoS 1)
# counts messages and point values (the keys of `values` in each JSON body).
#
# Figures (steady state over DURATION after WARMUP):
#   polled    = peer requests/s / requests per device cycle x points per device
#   stored    = messages appended for the endpoint (its delivered + backlog) per s x points
#   delivered = point values/s counted by the subscriber; PUBACKed msg/s from the endpoint
#   fieldhubd CPU in cores (/proc/PID/stat utime+stime, all threads), VmHWM and VmRSS at the
#   end, mosquitto's VmRSS right after its start (idle, no client) in the same run, the ratio,
#   the endpoint backlog at the start and the end of the window, RSS growth per stored message.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/../.." && pwd)
BENCH_NAME=bench-modbus-e2e
. "$SRC/tests/bench/bench-lib.sh"
BUILD=$(cd "${1:-$SRC/build-bench}" && pwd)
FIELDHUBD=$BUILD/gateway/fieldhubd
FIELDHUBCTL=$BUILD/gateway/fieldhubctl
PEER=$BUILD/tests/bench-modbus-peer
PY=/usr/bin/python3
DEVICES=${DEVICES:-55}
F32=${F32:-50}
U16=${U16:-50}
INTERVAL=${INTERVAL:-50}
PEERS=${PEERS:-$DEVICES}
DURATION=${DURATION:-30}
WARMUP=${WARMUP:-5}
GW_CPU=${GW_CPU:-0}
PEER_CPU=${PEER_CPU:-1}
PERF=${PERF:-0}
PERF_SECONDS=${PERF_SECONDS:-10}
KEEP=${KEEP:-0}
WRAP=${WRAP:-}

for f in "$FIELDHUBD" "$FIELDHUBCTL" "$PEER"; do
        [ -x "$f" ] || { echo "bench-modbus-e2e: $f is missing: meson setup $BUILD --buildtype=release -Dtests=true && ninja -C $BUILD" >&2; exit 2; }
done
command -v mosquitto >/dev/null || { echo "bench-modbus-e2e: mosquitto is not installed" >&2; exit 2; }
$PY -c 'import paho.mqtt.client' 2>/dev/null || { echo "bench-modbus-e2e: python3-paho-mqtt is not installed" >&2; exit 2; }
[ "$PEERS" -ge 1 ] && [ "$PEERS" -le "$DEVICES" ] || { echo "bench-modbus-e2e: PEERS must be 1..DEVICES" >&2; exit 2; }

WORK=$(mktemp -d /var/tmp/bench-modbus-e2e.XXXXXX)
PIDS=()        # every process started here, stopped by pid
FH_PID= GW_PID= MQ_PID= SUB_PID= MEAS_PID=
cleanup() {
        stop_pid "$MEAS_PID"; MEAS_PID=
        stop_pid "$GW_PID"; GW_PID=
        stop_pid "$FH_PID"; FH_PID=
        for p in "${PIDS[@]}"; do stop_pid "$p"; done
        PIDS=()
        if [ "$KEEP" = 1 ]; then echo "bench-modbus-e2e: work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "bench-modbus-e2e: $DEVICES devices x ($F32 float32 + $U16 uint16) points every $INTERVAL ms over $PEERS" \
     "Modbus TCP connections; fieldhubd on CPU $GW_CPU, peers/mosquitto/subscriber on CPU $PEER_CPU; work dir $WORK" >&2
uptime >&2

# ---- the Modbus TCP peers ------------------------------------------------------------------
PEER_PORTS=()
for i in $(seq "$PEERS"); do
        port=$(free_port)
        taskset -c "$PEER_CPU" "$PEER" server "$port" > "$WORK/peer-$i.out" 2> "$WORK/peer-$i.err" & PIDS+=($!)
        echo "$!" >> "$WORK/peer.pids"
        wait_port "$port" "$!" "bench-modbus-peer $i"
        PEER_PORTS+=("$port")
done
# (wait_port's probe connection is counted by no one: it sends no request)

# ---- mosquitto: plain TCP on loopback, persistence off; idle RSS before any client ---------
MQ_PORT=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\nmax_queued_messages 0\n' \
        "$MQ_PORT" > "$WORK/mosquitto.conf"
taskset -c "$PEER_CPU" mosquitto -c "$WORK/mosquitto.conf" 2> "$WORK/mosquitto.log" & MQ_PID=$!; PIDS+=($MQ_PID)
sleep 1
MQ_IDLE_KIB=$(awk '/^VmRSS:/ {print $2}' "/proc/$MQ_PID/status")
wait_port "$MQ_PORT" "$MQ_PID" mosquitto

# ---- the subscriber: counts messages and point values, one JSON line a second --------------
cat > "$WORK/sub.py" <<'EOF'
import json, sys, threading, time
import paho.mqtt.client as mqtt
port, out = int(sys.argv[1]), sys.argv[2]
n = {"msgs": 0, "values": 0, "bad": 0}
lock = threading.Lock()
def on_connect(c, u, f, rc):
    c.subscribe("fh/#", qos=1)
def on_subscribe(c, u, mid, q):
    with open(out + ".ready", "w") as f:
        f.write("ok\n")
def on_message(c, u, m):
    try:
        v = len(json.loads(m.payload)["values"])
    except Exception:
        v, n["bad"] = 0, n["bad"] + 1
    with lock:
        n["msgs"] += 1
        n["values"] += v
c = mqtt.Client(client_id="bench-sub", clean_session=True)
c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
c.max_inflight_messages_set(1000)
c.connect("127.0.0.1", port, 60)
c.loop_start()
with open(out, "a", buffering=1) as f:
    while True:
        time.sleep(0.5)
        with lock:
            f.write(json.dumps(dict(n, t=time.monotonic())) + "\n")
EOF
taskset -c "$PEER_CPU" $PY "$WORK/sub.py" "$MQ_PORT" "$WORK/sub.jsonl" 2> "$WORK/sub.err" & SUB_PID=$!; PIDS+=($SUB_PID)
for _ in $(seq 100); do [ -e "$WORK/sub.jsonl.ready" ] && break; kill -0 "$SUB_PID" || { cat "$WORK/sub.err" >&2; exit 1; }; sleep 0.1; done
[ -e "$WORK/sub.jsonl.ready" ] || { echo "bench-modbus-e2e: the subscriber did not subscribe" >&2; exit 1; }

# ---- fieldhubd -------------------------------------------------------------------------------
$PY - "$WORK" "$MQ_PORT" "$DEVICES" "$F32" "$U16" "$INTERVAL" "${PEER_PORTS[@]}" <<'EOF'
import sys
work, mq, devices, f32, u16, interval = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
ports = sys.argv[7:]
pts = [f"          - {{name: f{i}, table: holding_register, address: {2 * i}, type: float32}}" for i in range(f32)]
pts += [f"          - {{name: u{i}, table: holding_register, address: {2 * f32 + i}}}" for i in range(u16)]
devs = [f"      - {{name: dev-{u:03d}, tcp: {{host: 127.0.0.1, port: {ports[(u - 1) % len(ports)]}}}, unit: {u}, "
        f"profile: meter, poll_interval: {interval}ms}}" for u in range(1, devices + 1)]
nl = "\n"
open(f"{work}/fieldhub.yaml", "w").write(f"""hub:
  host_name: gw.bench.local
state_dir: {work}/state
log: {{level: info, target: stderr}}
admin: {{socket: {work}/admin.sock}}
endpoints:
  - name: broker
    type: mqtt
    address: tcp://127.0.0.1:{mq}
    topic: "fh/{{deviceId}}"
    qos: 1
routes:
  - {{name: modbus-to-mqtt, source: DeviceMessages, condition: "adapterType = 'modbus'", endpoint: broker}}
adapters:
  - type: modbus
    name: bench
    profiles:
      meter:
        points:
{nl.join(pts)}
    devices:
{nl.join(devs)}
""")
EOF
"$FIELDHUBD" --check-config --config "$WORK/fieldhub.yaml" >/dev/null
# shellcheck disable=SC2086
taskset -c "$GW_CPU" $WRAP "$FIELDHUBD" --config "$WORK/fieldhub.yaml" 2> "$WORK/fieldhubd.log" & FH_PID=$!
for _ in $(seq 600); do
        [ "$(grep -c ' is online' "$WORK/fieldhubd.log" || true)" -ge "$DEVICES" ] && grep -q "Endpoint broker connected" "$WORK/fieldhubd.log" && break
        kill -0 "$FH_PID" 2>/dev/null || { tail -20 "$WORK/fieldhubd.log" >&2; echo "bench-modbus-e2e: fieldhubd did not start" >&2; exit 1; }
        sleep 0.1
done
grep -q "Endpoint broker connected" "$WORK/fieldhubd.log" || { echo "bench-modbus-e2e: the endpoint did not connect" >&2; exit 1; }
# fieldhubd's own pid (not WRAP's), from the daemon itself
GW_PID=$("$FIELDHUBCTL" --socket "$WORK/admin.sock" --json status | $PY -c 'import json,sys; print(json.load(sys.stdin)["pid"])')

# ---- the measurement ------------------------------------------------------------------------
$PY - "$WORK" "$GW_PID" "$FIELDHUBCTL" "$WARMUP" "$DURATION" "$DEVICES" "$F32" "$U16" "$INTERVAL" "$MQ_PID" "$MQ_IDLE_KIB" "$PEERS" > "$WORK/summary.txt" <<'EOF' &
import glob, json, math, os, re, signal, subprocess, sys, time
work, pid, ctl = sys.argv[1], int(sys.argv[2]), sys.argv[3]
warmup, duration = float(sys.argv[4]), float(sys.argv[5])
devices, f32, u16, interval, mq_pid, mq_idle, peers = map(int, sys.argv[6:13])
points = f32 + u16
regs = 2 * f32 + u16
reqs_per_cycle = math.ceil(regs / 125)
hz = os.sysconf("SC_CLK_TCK")

def status(p, key):
    for line in open(f"/proc/{p}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0

def cpu(p):
    f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / hz

def peer_requests():
    # A peer prints its request count when it gets SIGUSR1 (bench-modbus-peer.c).
    for line in open(f"{work}/peer.pids"):
        try:
            os.kill(int(line), signal.SIGUSR1)
        except (ValueError, ProcessLookupError):
            pass
    time.sleep(0.05)
    total = 0
    for path in glob.glob(f"{work}/peer-*.out"):
        last = 0
        for line in open(path):
            m = re.match(r"requests (\d+)", line)
            if m:
                last = int(m.group(1))
        total += last
    return total

def sub():
    lines = open(f"{work}/sub.jsonl").read().splitlines()
    return json.loads(lines[-1]) if lines else {"msgs": 0, "values": 0, "bad": 0, "t": time.monotonic()}

def endpoint():
    out = subprocess.run([ctl, "--socket", f"{work}/admin.sock", "--json", "endpoints"], capture_output=True,
                         text=True, timeout=30).stdout
    e = {x["name"]: x for x in json.loads(out)}["broker"]
    return e

def others():
    """CPU (cores) used by everything but fieldhubd, from /proc/stat."""
    f = open("/proc/stat").readline().split()[1:]
    return sum(int(x) for x in f[:3] + f[5:8]) / hz

def sample():
    e = endpoint()
    return {"t": time.monotonic(), "cpu": cpu(pid), "req": peer_requests(), "sub": sub(), "delivered": e["delivered"],
            "backlog": e["backlog"]["count"], "rss": status(pid, "VmRSS"), "all": others()}

def mappings():
    """{start address: (name, Rss KiB)} of fieldhubd's mappings (a glibc thread arena's heap
    grows in place, so its start address identifies it)."""
    out, cur = {}, None
    for line in open(f"/proc/{pid}/smaps"):
        f = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            cur = f[0].split("-")[0]
            out[cur] = [f[5] if len(f) > 5 else "anonymous", 0]
        elif f[0] == "Rss:":
            out[cur][1] = int(f[1])
    return out

rss_online = status(pid, "VmRSS")
time.sleep(warmup)
maps0 = mappings()
s0 = sample()
trend = [s0]
end = s0["t"] + duration
while time.monotonic() < end:
    time.sleep(min(1.0, max(0.0, end - time.monotonic())))
    trend.append(sample())
s1 = trend[-1]
dt = s1["t"] - s0["t"]

def slope(key):
    """Least-squares rate of a counter over the window's samples: the peers print their count
    once a second and the subscriber twice, so a single pair of samples is up to 1 s stale."""
    xs = [x["t"] for x in trend]
    ys = [key(x) for x in trend]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)

req_rate = slope(lambda x: x["req"])
polled = req_rate / reqs_per_cycle * points
stored_msgs = ((s1["delivered"] + s1["backlog"]) - (s0["delivered"] + s0["backlog"])) / dt
acked = (s1["delivered"] - s0["delivered"]) / dt
sub_msgs = slope(lambda x: x["sub"]["msgs"])
sub_vals = slope(lambda x: x["sub"]["values"])
cores = (s1["cpu"] - s0["cpu"]) / dt
other_cores = (s1["all"] - s0["all"]) / dt - cores
hwm, rss = status(pid, "VmHWM"), status(pid, "VmRSS")
growth = (s1["rss"] - s0["rss"]) * 1024 / max(1, stored_msgs * dt)
offered = devices * points * 1000 / interval
print(f"offered            : {offered:10.0f} point values/s ({devices} devices x {points} points / {interval} ms; "
      f"{reqs_per_cycle} reads of <= 125 registers per device cycle; {peers} Modbus TCP connections)")
print(f"polled             : {polled:10.0f} point values/s ({req_rate:.0f} requests/s seen by the peers)")
print(f"stored (outbox)    : {stored_msgs * points:10.0f} point values/s ({stored_msgs:.0f} messages/s)")
print(f"delivered (broker) : {sub_vals:10.0f} point values/s ({sub_msgs:.0f} messages/s at the subscriber, "
      f"{acked:.0f} msg/s PUBACKed to fieldhubd; {s1['sub']['bad']} unparsable)")
print(f"fieldhubd CPU      : {cores:10.2f} cores (pinned to one core); everything else on the machine: {other_cores:.2f} cores")
print(f"fieldhubd RSS      : {rss_online / 1024:.1f} MiB once every device was online, {s0['rss'] / 1024:.1f} MiB after "
      f"the warm-up, peak (VmHWM) {hwm / 1024:.1f} MiB, at the end {rss / 1024:.1f} MiB; growth over the window "
      f"{(s1['rss'] - s0['rss']) / 1024:+.1f} MiB = {growth:.0f} B per stored message")
print(f"mosquitto idle RSS : {mq_idle / 1024:.1f} MiB (VmRSS 1 s after start, no client); at the end "
      f"{status(mq_pid, 'VmRSS') / 1024:.1f} MiB")
print(f"ratio              : peak {hwm / mq_idle:.2f}x, end {rss / mq_idle:.2f}x mosquitto's idle RSS (goal <= 3x)")
print(f"endpoint backlog   : {s0['backlog']} messages at the start of the window, {s1['backlog']} at the end "
      f"(max {max(x['backlog'] for x in trend)}); per-second backlog: {[x['backlog'] for x in trend]}")
# Where the resident memory is (/proc/PID/smaps at the end of the window), by kind of mapping,
# and which mappings grew during the window.
kinds, cur, maps1 = {}, None, mappings()
grew = sorted(((maps1[k][1] - maps0.get(k, (0, 0))[1], k, maps1[k]) for k in maps1), reverse=True)[:3]

def growth_kind(addr, name):
    if name == "[heap]":
        return "main arena ([heap])"
    if name != "anonymous":
        return "file-backed (" + os.path.basename(name) + ")"
    return "thread arenas" if int(addr, 16) % (64 << 20) == 0 else "large malloc blocks (mmap'ed, e.g. arrays)"
by_kind = {}
for k in set(maps0) | set(maps1):
    name = (maps1.get(k) or maps0.get(k))[0]
    kind = growth_kind(k, name)
    by_kind[kind] = by_kind.get(kind, 0) + (maps1.get(k, (0, 0))[1] - maps0.get(k, (0, 0))[1])
for line in open(f"/proc/{pid}/smaps"):
    f = line.split()
    if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
        name = f[5] if len(f) > 5 else ""
        if name == "[heap]":
            cur = "[heap] (main arena)"
        elif name.endswith(".db-shm"):
            cur = "store WAL index (-shm)"
        elif name.startswith("/"):
            cur = "file: " + os.path.basename(name).split(".so")[0] + (".so" if ".so" in name else "")
        elif name.startswith("["):
            cur = name
        else:
            # an 8 MiB anonymous read-write mapping is a thread stack (glibc's default size)
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            cur = "thread stacks" if hi - lo == 8 << 20 and f[1].startswith("rw") else \
                "other anonymous (malloc arenas of threads, large blocks)"
    elif f[0] == "Rss:" and cur:
        kinds[cur] = kinds.get(cur, 0) + int(f[1])
top = sorted(kinds.items(), key=lambda kv: -kv[1])
libs = sum(v for k, v in kinds.items() if k.startswith("file: "))
print(f"RSS by mapping     : " + ", ".join(f"{k} {v / 1024:.1f} MiB" for k, v in top[:6])
      + f"; all shared libraries and the binary together {libs / 1024:.1f} MiB; threads "
      + str(status(pid, "Threads")))
print("RSS every 5 s (MiB): " + " ".join(f"{x['rss'] / 1024:.1f}" for x in trend[::5]))
print("RSS growth by map  : " + ", ".join(f"{m[0]} at 0x{k} {d / 1024:+.1f} MiB (now {m[1] / 1024:.1f})" for d, k, m in grew)
      + " (an anonymous mapping at a 64 MiB boundary is a glibc thread arena)")
print("RSS growth by kind : " + ", ".join(f"{k} {v / 1024:+.1f} MiB" for k, v in sorted(by_kind.items(), key=lambda kv: -abs(kv[1]))
                                        if abs(v) >= 64))
ok_rate = sub_vals >= 100000
ok_cpu = cores <= 1.0
ok_rss = hwm <= 3 * mq_idle
ok_backlog = s1["backlog"] <= max(1000, 2 * s0["backlog"])
print(f"goal               : >= 100,000 values/s delivered {'met' if ok_rate else 'MISSED'}; <= 1 core "
      f"{'met' if ok_cpu else 'MISSED'}; RSS <= 3x {'met' if ok_rss else 'MISSED'}; backlog not growing "
      f"{'yes' if ok_backlog else 'NO'}")
json.dump({"offered": offered, "polled": polled, "stored": stored_msgs * points, "delivered": sub_vals,
           "sub_msgs": sub_msgs, "acked_msgs": acked, "cores": cores, "other_cores": other_cores, "vmhwm_kib": hwm,
           "rss_end_kib": rss, "mq_idle_kib": mq_idle, "backlog_start": s0["backlog"], "backlog_end": s1["backlog"],
           "rss_growth_b_per_msg": growth}, open(f"{work}/result.json", "w"))
EOF
MEAS_PID=$!
wait "$MEAS_PID"    # (in the background so that a signal interrupts the wait at once)
MEAS_PID=
cat "$WORK/summary.txt"

if [ "$PERF" = 1 ]; then
        echo "bench-modbus-e2e: perf record -g of fieldhubd for $PERF_SECONDS s" >&2
        perf record -g -F 499 -p "$GW_PID" -o "$WORK/perf.data" -- sleep "$PERF_SECONDS" 2> "$WORK/perf.err" >/dev/null || true
        perf report -i "$WORK/perf.data" --no-children --stdio --percent-limit 1.5 2>/dev/null > "$WORK/perf.txt" || true
        perf report -i "$WORK/perf.data" --children --stdio --percent-limit 3 -g none 2>/dev/null > "$WORK/perf-children.txt" || true
        echo "--- perf (self, top):"; grep -E '^ +[0-9.]+%' "$WORK/perf.txt" | head -25
        echo "--- perf (children, top):"; grep -E '^ +[0-9.]+%' "$WORK/perf-children.txt" | head -30
fi

stop_pid "$GW_PID"; GW_PID=
stop_pid "$FH_PID"; FH_PID=
$PY - "$WORK/fieldhubd.log" <<'EOF'
import json, re, sys
m = re.search(r"Adapter bench stopped: (\d+) messages stored, (\d+) dropped; (.*)", open(sys.argv[1]).read())
if not m:
    sys.exit("bench-modbus-e2e: no 'Adapter bench stopped' line in the log")
# (the log truncates a long line: take the per-line objects that arrived whole)
lines = [json.loads(x) for x in re.findall(r'\{"line":[^{}]*\}', m.group(3))]
tot = lambda k: sum(l[k] for l in lines)
print(f"adapter at stop    : {m.group(1)} messages stored, {m.group(2)} dropped; {len(lines)} lines logged whole: {tot('transactions')} "
      f"transactions, {tot('timeouts')} timeouts, {tot('overruns')} overruns (cycles skipped), {tot('heldBack')} polls "
      f"held back for the store, utilisation max {max(l['utilisation'] for l in lines) * 100:.0f}% per line")
EOF
if grep -qiE "sanitizer|runtime error" "$WORK/fieldhubd.log"; then
        echo "bench-modbus-e2e: fieldhubd reported errors:" >&2; grep -iE "sanitizer|runtime error" "$WORK/fieldhubd.log" | head >&2
fi
