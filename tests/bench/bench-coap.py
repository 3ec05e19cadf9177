#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""CoAP benchmark (by hand): the same libcoap load generator (tests/bench/coap-load.c) against
fieldhubd (telemetry made durable in the outbox before each 2.04) and against libcoap's
coap-server-openssl, in one run, pinned (servers on one core, generator on another):

  requests/s  N plain-UDP endpoints, CON POST of the same 43-byte JSON body to d/bench-<i>/telemetry,
              WINDOW in flight each. fieldhubd: empty ACK + separate CON 2.04 once durable (4
              datagrams). coap-server-openssl -d: its dynamic resource (2.01 Created on the first POST
              of an endpoint, then 2.04 Changed piggy-backed on the ACK: 2 datagrams), nothing stored.
  sessions/s  new DTLS-PSK sessions (handshake + one GET + close), PARALLEL at a time

Both servers run for the whole benchmark; ROUNDS rounds alternate which one goes first, and the
medians are compared. Each run also reports the CPU time the server (all its threads) and the
generator used, per request: the generator must stay well below one core.

Usage: bench-coap.py BUILD_DIR [--endpoints 16] [--window 1] [--seconds 5] [--rounds 3] [--parallel 8]
                      [--server-cpu 0] [--client-cpu 1]
Goal (issue 8): both ratios >= 0.7."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("build")
ap.add_argument("--endpoints", type=int, default=16)
ap.add_argument("--window", type=int, default=1)
ap.add_argument("--seconds", type=float, default=5)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--parallel", type=int, default=8)
ap.add_argument("--server-cpu", default="0")
ap.add_argument("--client-cpu", default="1")
args = ap.parse_args()

B = os.path.abspath(args.build)
FIELDHUBD = f"{B}/gateway/fieldhubd"
CTL = f"{B}/gateway/fieldhubctl"
LOAD = f"{B}/tests/coap-load"
SERVER = shutil.which("coap-server-openssl")
d = tempfile.mkdtemp(prefix="fieldhub-bench-coap-")
procs = []


def pinned(cpu, argv):
    return ["taskset", "-c", cpu] + argv if shutil.which("taskset") else argv


def cpu_seconds(pid):
    """utime + stime of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(server, *a):
    c0 = cpu_seconds(server.pid)
    p = subprocess.run(pinned(args.client_cpu, [LOAD, *map(str, a)]), capture_output=True, text=True, timeout=args.seconds + 60)
    if p.returncode != 0:
        sys.exit(f"coap-load failed: {p.stderr}")
    r = json.loads(p.stdout)
    r["server_cpu_seconds"] = round(cpu_seconds(server.pid) - c0, 2)
    done = r.get("ok", r.get("sessions", 0))
    if done:
        r["server_cpu_us_per_op"] = round(r["server_cpu_seconds"] / done * 1e6, 1)
    return r


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


try:
    n = args.endpoints
    devs = ", ".join(f"bench-{i}" for i in range(n))
    with open(f"{d}/fieldhub.yaml", "w") as f:
        f.write(f"""hub:
  host_name: bench.local
state_dir: {d}/state
log:
  level: warning
  target: stderr
admin:
  socket: {d}/admin.sock
coap:
  listen: ["127.0.0.1:0"]
  dtls_listen: ["127.0.0.1:0"]
  plaintext_devices: [{devs}]
  limits:
    max_requests_per_second: 0
    max_handshakes: 1000
""")
    logf = open(f"{d}/fieldhubd.log", "w")
    fh = subprocess.Popen(pinned(args.server_cpu, [FIELDHUBD, "--config", f"{d}/fieldhub.yaml", "--log-level", "info"]),
                          stderr=logf)
    procs.append(fh)
    for _ in range(100):
        log = open(f"{d}/fieldhubd.log").read()
        if "Admin socket listening" in log:
            break
        time.sleep(0.1)
    udp = int(re.search(r"port (\d+), UDP", log).group(1))
    dtls = int(re.search(r"port (\d+), DTLS", log).group(1))
    for i in range(n):
        subprocess.run([CTL, "--socket", f"{d}/admin.sock", "device", "create", f"bench-{i}"], check=True,
                       capture_output=True)
    psks = []
    for i in range(args.parallel):  # one identity per parallel loop: a second session of one device takes over
        subprocess.run([CTL, "--socket", f"{d}/admin.sock", "device", "create", f"hs-{i}"], check=True,
                       capture_output=True)
        psks.append(json.loads(subprocess.run([CTL, "--socket", f"{d}/admin.sock", "--json", "device", "show-coap-psk",
                                               f"hs-{i}"], check=True, capture_output=True, text=True).stdout)["pskHex"])

    port = 40000 + os.getpid() % 10000 // 2 * 2
    srv = subprocess.Popen(pinned(args.server_cpu, [SERVER, "-A", "127.0.0.1", "-p", str(port), "-d", str(n + 10),
                                                    "-k", "benchkey", "-v", "0"]),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(srv)
    time.sleep(0.5)

    def run_fieldhub():
        return (load(fh, "requests", f"coap://127.0.0.1:{udp}/d/bench-%d/telemetry", n, args.window, args.seconds, "post"),
                load(fh, "handshakes", f"coaps://127.0.0.1:{dtls}/d/hs-%d/twin", "hs-%d", ",".join(psks), args.parallel,
                     args.seconds))

    def run_libcoap():
        return (load(srv, "requests", f"coap://127.0.0.1:{port}/d/bench-%d/telemetry", n, args.window, args.seconds, "post"),
                load(srv, "handshakes", f"coaps://127.0.0.1:{port + 1}/time", "bench", "62656e63686b6579",
                     args.parallel, args.seconds))

    runs = {"fieldhub": [], "libcoap": []}
    for i in range(args.rounds):
        order = [("fieldhub", run_fieldhub), ("libcoap", run_libcoap)]
        for name, fn in order if i % 2 == 0 else reversed(order):
            runs[name].append(fn())
    res = {"runs": runs}
    for name in runs:
        res[f"{name}_requests_per_second"] = median([r[0]["requests_per_second"] for r in runs[name]])
        res[f"{name}_sessions_per_second"] = median([r[1]["sessions_per_second"] for r in runs[name]])
        res[f"{name}_server_cpu_us_per_request"] = median([r[0].get("server_cpu_us_per_op", 0) for r in runs[name]])
        res[f"{name}_generator_cpu_share"] = round(median([r[0]["generator_cpu_seconds"] / r[0]["seconds"]
                                                           for r in runs[name]]), 2)
    res["ratio_requests"] = round(res["fieldhub_requests_per_second"] /
                                  max(res["libcoap_requests_per_second"], 1e-9), 3)
    res["ratio_sessions"] = round(res["fieldhub_sessions_per_second"] /
                                  max(res["libcoap_sessions_per_second"], 1e-9), 3)
    res["ratio_cpu_per_request"] = round(res["fieldhub_server_cpu_us_per_request"] /
                                         max(res["libcoap_server_cpu_us_per_request"], 1e-9), 2)
    res["config"] = vars(args)
    print(json.dumps(res, indent=2))
finally:
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait()
    shutil.rmtree(d, ignore_errors=True)
