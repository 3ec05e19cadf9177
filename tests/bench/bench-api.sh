#!/bin/bash
# SPDX-License-Identifier: MIT
# By-hand service API benchmark (issue 4): registry GET and twin PATCH over keep-alive HTTPS
# against fieldhubd (release build), with the two ceilings in the same run: nginx serving a
# static device document over TLS (the HTTP layer) and a bare SQLite loop doing the same
# transactions (the store, tests/bench/sqlite-ceiling.c); then query latency. See README.md.
#
#   tests/bench/bench-api.sh [BUILD_DIR]          (default: build-bench beside this tree)
#
# Environment (defaults in brackets):
#   RUNS [3]        runs per figure (median)  DURATION [10]   seconds per wrk / SQLite run
#   CONNS [50]      wrk connections           NDEV [10000]    devices (bulk, 100 per request)
#   SITES [10]      distinct tags.site values QUERIES [20]    query repetitions
#   SERVER_CPU [0]  core of every server      GEN_CPU [1]     core of wrk and the clients
#   KEEP [0]        1: keep the work directory (logs)
#   RT [0]          1: run every server, the SQLite loop and wrk SCHED_FIFO (as root; the same for
#                   every contender), which keeps parallel builds on the machine off their cores
#   PERF [0]        1: profile one extra fieldhub GET and PATCH run with perf (DWARF call graphs:
#                   the release build has no frame pointers); flat and inclusive reports in OUT
#   OUT [$BUILD_DIR/bench-api]  results.jsonl and summary.md
#
# Every process it starts is stopped by pid on exit; everything listens on 127.0.0.1 only; every
# wrk and SQLite run is bounded (-d / its own clock, under `timeout`).
set -euo pipefail

SRC=$(cd "$(dirname "$0")/../.." && pwd)
BENCH_NAME=bench-api
. "$SRC/tests/bench/bench-lib.sh"
BUILD=${1:-$SRC/build-bench}
FIELDHUBD=$BUILD/gateway/fieldhubd
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-50}
NDEV=${NDEV:-10000}
SITES=${SITES:-10}
QUERIES=${QUERIES:-20}
SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
KEEP=${KEEP:-0}
PERF=${PERF:-0}
OUT=${OUT:-$BUILD/bench-api}
RT=${RT:-0}
PRIO=
[ "$RT" = 1 ] && [ "$(id -u)" -eq 0 ] && PRIO="chrt -f 10"
HUB=gw.bench.local
HERE=$SRC/tests/bench

[ -x "$FIELDHUBD" ] || { echo "bench-api: $FIELDHUBD is missing: meson setup $BUILD --buildtype=release && ninja -C $BUILD" >&2; exit 2; }
for t in wrk nginx openssl cc python3 taskset; do
        command -v $t >/dev/null || { echo "bench-api: $t is not installed (apt-get install -y wrk nginx-light)" >&2; exit 2; }
done

# On disk (not tmpfs): fieldhub and the SQLite ceiling fsync.
WORK=$(mktemp -d /var/tmp/bench-api.XXXXXX)
export WORK
chmod 755 "$WORK"
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: > "$RESULTS"
FH_PID=
NG_PID=

cleanup() {
        stop_pid "$FH_PID"; FH_PID=
        stop_pid "$NG_PID"; NG_PID=
        if [ "$KEEP" = 1 ]; then echo "bench-api: work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM


# ---- fieldhubd: service API over TLS with its generated CA -----------------------------------
head -c 32 /dev/urandom | base64 > "$WORK/owner.key"
chmod 600 "$WORK/owner.key"
FH_PORT=$(free_port)
cat > "$WORK/fieldhub.yaml" <<EOC
hub:
  host_name: $HUB
  policies:
    - name: iothubowner
      key_file: $WORK/owner.key
state_dir: $WORK/state
log:
  level: warning
  target: stderr
admin:
  socket: $WORK/admin.sock
service_api:
  listen: ["127.0.0.1:$FH_PORT"]
  limits:
    max_connections: 1000
    max_connections_per_address: 1000
EOC
$PRIO taskset -c "$SERVER_CPU" "$FIELDHUBD" --config "$WORK/fieldhub.yaml" 2>>"$WORK/fieldhubd.log" &
FH_PID=$!
for i in $(seq 200); do
        [ -s "$WORK/state/ca.crt" ] && python3 -c "import socket; socket.create_connection(('127.0.0.1',$FH_PORT),1)" 2>/dev/null && break
        kill -0 "$FH_PID" 2>/dev/null || { tail -20 "$WORK/fieldhubd.log" >&2; echo "bench-api: fieldhubd did not start" >&2; exit 1; }
        [ "$i" = 200 ] && { echo "bench-api: fieldhubd does not listen" >&2; exit 1; }
        sleep 0.1
done

# A long-lived (1 day) iothubowner token, computed here (reference §5: sr, sig, se, skn).
TOKEN=$(python3 - "$HUB" "$(cat "$WORK/owner.key")" <<'EOP'
import base64, hashlib, hmac, sys, time, urllib.parse
sr = urllib.parse.quote(sys.argv[1], safe=""); se = int(time.time()) + 86400
sig = base64.b64encode(hmac.new(base64.b64decode(sys.argv[2]), f"{sr}\n{se}".encode(), hashlib.sha256).digest()).decode()
print(f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={se}&skn=iothubowner")
EOP
)
export TOKEN

# A python client (pinned like wrk) for setup and the query latency.
api_py() { taskset -c "$GEN_CPU" python3 - "$FH_PORT" "$WORK/state/ca.crt" "$HUB" "$@"; }
API_LIB='
import http.client, json, os, socket, ssl, sys, time
port, ca, hub = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
ctx.check_hostname = False  # we connect to 127.0.0.1; the chain is still verified
conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=60)
def req(method, path, body=None, headers=None):
    h = {"Authorization": os.environ["TOKEN"]}
    h.update(headers or {})
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        h["Content-Type"] = "application/json"
    sep = "&" if "?" in path else "?"
    conn.request(method, path + sep + "api-version=2021-04-12", body=data, headers=h)
    r = conn.getresponse()
    payload = r.read()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, payload
'

echo "bench-api: creating $NDEV devices (bulk, 100 per request) with tags.site over $SITES values" >&2
t0=$(date +%s.%N)
api_py "$NDEV" "$SITES" <<EOP
$API_LIB
n, sites = int(sys.argv[4]), int(sys.argv[5])
for start in range(0, n, 100):
    entries = [{"id": f"bench-{i:06d}", "importMode": "create"} for i in range(start, min(n, start + 100))]
    st, _, p = req("POST", "/devices", entries)
    if st != 200 or (p and json.loads(p).get("errors")):
        sys.exit(f"bench-api: bulk create failed: {st} {p[:300]!r}")
# The bulk route ignores tags (IoT Hub sets them through the twin): one PATCH per twin.
for i in range(n):
    st, _, p = req("PATCH", f"/twins/bench-{i:06d}", {"tags": {"site": f"site-{i % sites}"}}, {"If-Match": "*"})
    if st != 200:
        sys.exit(f"bench-api: tag patch failed: {st} {p[:300]!r}")
# The device document nginx serves: the same bytes fieldhub answers GET /devices/{id} with.
st, _, p = req("GET", "/devices/bench-000000")
assert st == 200, st
open(os.environ["WORK"] + "/device.json", "wb").write(p)
EOP
t1=$(date +%s.%N)
echo "bench-api: setup took $(python3 -c "print(round($t1-$t0,1))") s" >&2

# ---- nginx: the HTTP-layer ceiling (TLS on loopback, static device document) ---------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -keyout "$WORK/nginx.key" -out "$WORK/nginx.crt" -subj "/CN=127.0.0.1" \
        -addext "subjectAltName=IP:127.0.0.1,DNS:$HUB" 2>/dev/null
mkdir -p "$WORK/www/devices" "$WORK/nginx-tmp"
NG_PORT=$(free_port)
cat > "$WORK/nginx.conf" <<EOC
daemon off;
master_process on;
worker_processes 1;
worker_cpu_affinity 1;
user root;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx-tmp/body;
    proxy_temp_path $WORK/nginx-tmp/proxy;
    fastcgi_temp_path $WORK/nginx-tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx-tmp/uwsgi;
    scgi_temp_path $WORK/nginx-tmp/scgi;
    keepalive_timeout 120s;
    keepalive_requests 100000000;
    tcp_nodelay on;
    server {
        listen 127.0.0.1:$NG_PORT ssl;
        ssl_certificate $WORK/nginx.crt;
        ssl_certificate_key $WORK/nginx.key;
        ssl_protocols TLSv1.2;
        ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256; # the suite fieldhub negotiates with OpenSSL
        location /devices/ {
            default_type application/json;
            try_files /devices/device.json =404;
            root $WORK/www;
        }
    }
}
EOC
cp "$WORK/device.json" "$WORK/www/devices/device.json"
$PRIO taskset -c "$SERVER_CPU" nginx -c "$WORK/nginx.conf" -p "$WORK/nginx-tmp" 2>>"$WORK/nginx-error.log" &
NG_PID=$!
for i in $(seq 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1',$NG_PORT),1)" 2>/dev/null && break
        kill -0 "$NG_PID" 2>/dev/null || { cat "$WORK/nginx-error.log" >&2; echo "bench-api: nginx did not start" >&2; exit 1; }
        [ "$i" = 100 ] && { echo "bench-api: nginx does not listen" >&2; exit 1; }
        sleep 0.1
done
NG_WORKER=$(pgrep -P "$NG_PID" | head -1)
[ -n "$NG_WORKER" ] || { echo "bench-api: no nginx worker" >&2; exit 1; }

# Which TLS suite each server negotiates with OpenSSL (wrk's library): noted in the summary.
suite() { echo | timeout 5 openssl s_client -connect "127.0.0.1:$1" -tls1_2 2>/dev/null | sed -n 's/^ *Cipher *: *//p' | head -1; }
FH_SUITE=$(suite "$FH_PORT"); NG_SUITE=$(suite "$NG_PORT")

# ---- SQLite ceiling ---------------------------------------------------------------------------
cc -O2 -Wall -Wextra -o "$WORK/sqlite-ceiling" "$HERE/sqlite-ceiling.c" -lsqlite3
taskset -c "$SERVER_CPU" "$WORK/sqlite-ceiling" "$WORK/ceiling.db" read 0.2 "$NDEV" >/dev/null # seed

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
# core_busy CPU: busy and total ticks of one core ("busy total"), from /proc/stat
core_busy() { awk -v c="cpu$1" '$1 == c {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t}' /proc/stat; }

# wrk_run SERVER TEST RUN PORT SCRIPT PID: one wrk run, one JSON line into results.jsonl.
wrk_run() {
        local server=$1 test=$2 run=$3 port=$4 script=$5 pid=$6 c0 c1 g0 g1 out
        out=$WORK/wrk-$server-$test-$run.txt
        c0=$(cpu_ticks "$pid")
        g0=$(core_busy "$GEN_CPU")
        NDEV=$NDEV timeout $((DURATION + 30)) $PRIO taskset -c "$GEN_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency \
                -s "$HERE/$script" -H "Authorization: $TOKEN" "https://127.0.0.1:$port" > "$out" 2>&1
        c1=$(cpu_ticks "$pid")
        g1=$(core_busy "$GEN_CPU")
        python3 - "$out" "$server" "$test" "$run" "$((c1 - c0))" "$(getconf CLK_TCK)" "$DURATION" "$(hwm_kib "$pid")" \
                "$g0" "$g1" >> "$RESULTS" <<'EOP'
import json, re, sys
path, server, test, run, ticks, hz, dur, hwm, g0, g1 = sys.argv[1:]
(gb0, gt0), (gb1, gt1) = map(int, g0.split()), map(int, g1.split())
t = open(path).read()
def lat(p):
    m = re.search(rf"^\s*{p}%\s+([\d.]+)(us|ms|s)\s*$", t, re.M)
    return float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)] if m else None
rps = re.search(r"Requests/sec:\s+([\d.]+)", t)
bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", t)
err = re.search(r"Socket errors: (.*)", t)
if not rps:
    sys.exit(f"bench-api: wrk failed:\n{t}")
print(json.dumps({"server": server, "test": test, "run": int(run), "rps": float(rps.group(1)),
                  "p50_ms": lat(50), "p99_ms": lat(99), "cpu_cores": int(ticks) / int(hz) / float(dur),
                  "gen_core_busy": (gb1 - gb0) / max(1, gt1 - gt0),
                  "vmhwm_kib": int(hwm), "non2xx": int(bad.group(1)) if bad else 0,
                  "socket_errors": err.group(1) if err else None}))
EOP
        tail -1 "$RESULTS" >&2
}

sqlite_run() { # MODE RUN [BATCH]: TEST is MODE, or MODE-BATCH when BATCH > 1
        local r test=$1
        [ "${3:-1}" -gt 1 ] && test=$1-$3
        r=$(timeout $((DURATION + 30)) $PRIO taskset -c "$SERVER_CPU" "$WORK/sqlite-ceiling" "$WORK/ceiling.db" "$1" "$DURATION" "$NDEV" "${3:-1}")
        python3 -c 'import json,sys; d=json.loads(sys.argv[1].split(" ",1)[1]); print(json.dumps({"server":"sqlite","test":sys.argv[2],"run":int(sys.argv[3]),"rps":d["ops_per_s"]}))' \
                "$r" "$test" "$2" >> "$RESULTS"
        tail -1 "$RESULTS" >&2
}

# ---- the runs, contenders interleaved -------------------------------------------------------
for run in $(seq "$RUNS"); do
        wrk_run fieldhub get "$run" "$FH_PORT" wrk-get.lua "$FH_PID"
        GET_PATH=/devices/device.json wrk_run nginx get "$run" "$NG_PORT" wrk-get.lua "$NG_WORKER"
        sqlite_run read "$run"
        wrk_run fieldhub patch "$run" "$FH_PORT" wrk-patch.lua "$FH_PID"
        sqlite_run update "$run"
        sqlite_run update "$run" "$CONNS"
done

# ---- query latency -----------------------------------------------------------------------------
api_py "$QUERIES" "$RUNS" <<EOP >> "$RESULTS"
$API_LIB
runs = int(sys.argv[4])
q = {"query": "SELECT * FROM devices WHERE tags.site = 'site-3'"}
times, rows = [], 0
for _ in range(runs):
    t0 = time.perf_counter()
    rows, cont, pages = 0, None, 0
    while True:
        h = {"x-ms-max-item-count": "1000"}
        if cont:
            h["x-ms-continuation"] = cont
        st, hh, p = req("POST", "/devices/query", q, h)
        if st != 200:
            sys.exit(f"bench-api: query failed: {st} {p[:300]!r}")
        rows += len(json.loads(p)); pages += 1
        cont = hh.get("x-ms-continuation")
        if not cont:
            break
    times.append((time.perf_counter() - t0) * 1000)
times.sort()
print(json.dumps({"server": "fieldhub", "test": "query", "runs": runs, "rows": rows, "pages": pages,
                  "p50_ms": times[len(times) // 2], "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))],
                  "min_ms": times[0], "max_ms": times[-1]}))
EOP
tail -1 "$RESULTS" >&2

# ---- optional profile of fieldhubd -------------------------------------------------------------
if [ "$PERF" = 1 ] && command -v perf >/dev/null; then
        for test in get patch; do
                perf record --call-graph dwarf,16384 -F 499 -p "$FH_PID" -o "$WORK/perf-$test.data" -- sleep "$DURATION" 2>/dev/null &
                PERF_PID=$!
                NDEV=$NDEV timeout $((DURATION + 30)) $PRIO taskset -c "$GEN_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" \
                        -s "$HERE/wrk-$test.lua" -H "Authorization: $TOKEN" "https://127.0.0.1:$FH_PORT" >/dev/null 2>&1
                wait "$PERF_PID" || true
                perf report -i "$WORK/perf-$test.data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null \
                        | grep '%' | head -50 > "$OUT/perf-$test.txt" || true
                perf report -i "$WORK/perf-$test.data" --children --sort symbol --stdio -g none 2>/dev/null \
                        | grep '%' | grep -v ' 0x0000' | head -100 > "$OUT/perf-$test-children.txt" || true
        done
fi
FH_HWM=$(hwm_kib "$FH_PID")

# ---- summary ------------------------------------------------------------------------------------
python3 - "$RESULTS" "$OUT/summary.md" "$FH_SUITE" "$NG_SUITE" "$FH_HWM" "$CONNS" "$DURATION" "$RUNS" "$NDEV" <<'EOP'
import json, statistics, sys
res = [json.loads(l) for l in open(sys.argv[1])]
fh_suite, ng_suite, hwm, conns, dur, runs, ndev = sys.argv[3:10]
def med(server, test, key="rps"):
    v = [r[key] for r in res if r["server"] == server and r["test"] == test and r.get(key) is not None]
    return statistics.median(v) if v else float("nan")
q = next(r for r in res if r["test"] == "query")
L = []
L.append(f"medians of {runs} runs (interleaved), {conns} keep-alive HTTPS connections, {dur} s each; "
         f"TLS 1.2 {fh_suite} (fieldhub) / {ng_suite} (nginx)\n")
L.append("| figure | fieldhub | ceiling | fieldhub / ceiling |")
L.append("|---|---|---|---|")
fg, ng, sr = med("fieldhub", "get"), med("nginx", "get"), med("sqlite", "read")
fp, su = med("fieldhub", "patch"), med("sqlite", "update")
L.append(f"| GET /devices/{{id}} req/s (ceiling: nginx static file) | {fg:,.0f} | {ng:,.0f} | {fg/ng:.2f}x |")
L.append(f"| GET p50 / p99 latency | {med('fieldhub','get','p50_ms'):.2f} / {med('fieldhub','get','p99_ms'):.2f} ms | "
         f"{med('nginx','get','p50_ms'):.2f} / {med('nginx','get','p99_ms'):.2f} ms | |")
L.append(f"| GET server CPU (cores) | {med('fieldhub','get','cpu_cores'):.2f} | {med('nginx','get','cpu_cores'):.2f} | |")
L.append(f"| GET load-generator core busy (wrk) | {med('fieldhub','get','gen_core_busy'):.2f} | {med('nginx','get','gen_core_busy'):.2f} | |")
L.append(f"| GET vs SQLite point reads ops/s | {fg:,.0f} | {sr:,.0f} | {fg/sr:.3f}x |")
L.append(f"| PATCH /twins/{{id}} req/s (ceiling: SQLite UPDATE txn, synchronous=FULL) | {fp:,.0f} | {su:,.0f} | {fp/su:.2f}x |")
sb = med("sqlite", f"update-{conns}")
L.append(f"| PATCH vs SQLite UPDATEs grouped {conns} per transaction (group commit) | {fp:,.0f} | {sb:,.0f} | {fp/sb:.2f}x |")
L.append(f"| PATCH p50 / p99 latency | {med('fieldhub','patch','p50_ms'):.2f} / {med('fieldhub','patch','p99_ms'):.2f} ms | | |")
L.append(f"| PATCH server CPU (cores) / wrk core busy | {med('fieldhub','patch','cpu_cores'):.2f} / {med('fieldhub','patch','gen_core_busy'):.2f} | | |")
L.append(f"| fieldhubd peak RSS (VmHWM) | {int(hwm)/1024:.1f} MiB | nginx worker {max(r.get('vmhwm_kib',0) for r in res if r['server']=='nginx')/1024:.1f} MiB | |")
L.append(f"| query `{'SELECT * FROM devices WHERE tags.site = ...'}` ({q['rows']} of {ndev} twins, {q['pages']} page(s)) p50 / p99 of {q['runs']} | "
         f"{q['p50_ms']:.1f} / {q['p99_ms']:.1f} ms | | |")
bad = [r for r in res if r.get("non2xx") or r.get("socket_errors")]
if bad:
    L.append("\nWARNING: runs with non-2xx answers or socket errors: " + json.dumps(bad))
open(sys.argv[2], "w").write("\n".join(L) + "\n")
print("\n".join(L))
EOP
