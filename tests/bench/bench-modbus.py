#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""Modbus adapter benchmark (by hand, not in CI):

  python3 tests/bench/bench-modbus.py BUILD_DIR [--units 200] [--registers 100] [--seconds 10]

1. TCP: a libmodbus server (bench-modbus-peer server) pinned to the last CPU; against it, pinned
   to CPU 0 in turn: the bare libmodbus loop executing the request plan (UNITS units x one read
   of REGISTERS holding registers, back to back), then fieldhubd polling UNITS devices with the
   same plan (REGISTERS/2 float32 points per device, coalesced into one read, every 10 ms so the
   line is always busy) through the whole gateway into the outbox; the pymodbus client's figure
   when python3-pymodbus is installed. Requests/s and registers/s are counted by the server.
2. RTU: the pacing slave (modbus-sim --rtu --pace) with 30 units on one socat pty pair, at 9600
   and 115200 baud: transactions/s against the line's theoretical ceiling, and the smallest
   inter-frame silence the slave saw against the 3.5-character rule."""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("build")
ap.add_argument("--units", type=int, default=200)
ap.add_argument("--registers", type=int, default=100)
ap.add_argument("--seconds", type=float, default=10)
ap.add_argument("--port", type=int, default=15502)
args = ap.parse_args()
B = os.path.abspath(args.build)
PEER = f"{B}/tests/bench-modbus-peer"
SIM = f"{B}/tests/modbus-sim"
FIELDHUBD = f"{B}/gateway/fieldhubd"
ncpu = os.cpu_count() or 1
GW_CPU, PEER_CPU = "0", str(ncpu - 1)
procs = []


def spawn(cmd, cpu, **kw):
    p = subprocess.Popen(["taskset", "-c", cpu, *cmd], **kw)
    procs.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Server:
    def __init__(self):
        self.p = spawn([PEER, "server", str(args.port)], PEER_CPU, stdout=subprocess.PIPE, text=True)
        self.last = 0
        time.sleep(0.3)

    def count(self):
        """The server's latest request count (it prints one line a second)."""
        import select
        while select.select([self.p.stdout], [], [], 0)[0]:
            line = self.p.stdout.readline()
            m = re.match(r"requests (\d+)", line)
            if m:
                self.last = int(m.group(1))
            if not line:
                break
        return self.last


def window(server, seconds):
    time.sleep(1.2)
    c0, t0 = server.count(), time.monotonic()
    time.sleep(seconds)
    time.sleep(1.1)
    c1, t1 = server.count(), time.monotonic() - 1.1
    return (c1 - c0) / (t1 - t0)


def bench_tcp():
    server = Server()
    out = subprocess.run(["taskset", "-c", GW_CPU, PEER, "client", str(args.port), str(args.units), str(args.registers),
                          str(args.seconds)], capture_output=True, text=True).stdout
    m = re.match(r"requests (\d+) registers (\d+) seconds ([\d.]+)", out)
    bare = int(m.group(1)) / float(m.group(3))
    print(f"bare libmodbus loop : {bare:10.0f} requests/s {bare * args.registers:12.0f} registers/s")

    d = tempfile.mkdtemp(prefix="fieldhub-bench-")
    pts = "\n".join(f"          - {{name: p{i}, table: holding_register, address: {2 * i}, type: float32}}"
                    for i in range(args.registers // 2))
    cfg = f"""hub:
  host_name: gw.bench.local
state_dir: {d}/state
log:
  level: info
  target: stderr
admin:
  socket: {d}/admin.sock
adapters:
  - type: modbus
    name: bench
    profiles:
      p:
        points:
{pts}
    devices:
""" + "".join(f"""      - {{name: dev-{u}, tcp: {{host: 127.0.0.1, port: {args.port}}}, unit: {u}, profile: p, poll_interval: 10ms}}
""" for u in range(1, args.units + 1))
    open(f"{d}/fieldhub.yaml", "w").write(cfg)
    gw = spawn([FIELDHUBD, "--config", f"{d}/fieldhub.yaml"], GW_CPU, stderr=open(f"{d}/log", "w"))
    # Every device online (its identity created on first start) before measuring.
    end = time.monotonic() + 120
    while open(f"{d}/log").read().count(" is online") < args.units and time.monotonic() < end:
        time.sleep(0.2)
    cpu0, t0 = cpu_seconds(gw.pid), time.monotonic()
    time.sleep(args.seconds)
    cpu = (cpu_seconds(gw.pid) - cpu0) / (time.monotonic() - t0)
    rss = rss_kib(gw.pid)
    stop(gw)
    # The adapter's own figures at stop: transactions (one per poll cycle here: one coalesced
    # read per device) and telemetry messages stored in the outbox.
    log = open(f"{d}/log").read()
    m = re.search(r"Adapter bench stopped: (\d+) messages stored, (\d+) dropped; (\{.*\})", log)
    import json
    line = json.loads(m.group(3))["lines"][0]
    rate = line["transactionsPerSecond"]
    print(f"fieldhubd -> outbox : {rate:10.0f} requests/s {rate * args.registers:12.0f} registers/s "
          f"({rate / bare:.2f}x bare; {rate * args.registers // 2:.0f} point values/s; CPU {cpu * 100:.0f}% "
          f"of one core; RSS {rss // 1024} MiB)")
    print(f"  {line['transactions']} transactions, {m.group(1)} telemetry messages stored, {m.group(2)} dropped, "
          f"line utilisation {line['utilisation'] * 100:.0f}%, polls held back for the store {line['heldBack']}")
    try:
        from pymodbus.client import ModbusTcpClient  # noqa
        c = ModbusTcpClient("127.0.0.1", port=args.port)
        c.connect()
        n, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            for u in range(1, args.units + 1):
                c.read_holding_registers(0, args.registers, slave=u)
                n += 1
        print(f"pymodbus client     : {n / (time.monotonic() - t0):10.0f} requests/s")
    except ImportError:
        print("pymodbus client     : not installed (python3-pymodbus), skipped")
    stop(server.p)
    shutil.rmtree(d, ignore_errors=True)


def bench_rtu(baud):
    d = tempfile.mkdtemp(prefix="fieldhub-bench-")
    a, b = f"{d}/gw", f"{d}/slave"
    socat = subprocess.Popen(["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"])
    procs.append(socat)
    while not (os.path.exists(a) and os.path.exists(b)):
        time.sleep(0.02)
    units = 30
    sim = spawn([SIM, "--rtu", b, "--baud", str(baud), "--parity", "even", "--units",
                 ",".join(str(u) for u in range(1, units + 1)), "--pace", "--log", f"{d}/req.log"], PEER_CPU)
    cfg = f"""hub:
  host_name: gw.bench.local
state_dir: {d}/state
log:
  level: notice
  target: stderr
admin:
  socket: {d}/admin.sock
adapters:
  - type: modbus
    name: bus
    devices:
""" + "".join(f"""      - {{name: s{u}, rtu: {{device: {a}, baud: {baud}, parity: even}}, unit: {u}, poll_interval: 10ms,
          timeout: 200ms, points: [{{name: x, table: holding_register, address: 0}}]}}
""" for u in range(1, units + 1))
    open(f"{d}/fieldhub.yaml", "w").write(cfg)
    gw = spawn([FIELDHUBD, "--config", f"{d}/fieldhub.yaml"], GW_CPU, stderr=open(f"{d}/log", "w"))
    time.sleep(2 + args.seconds)
    stop(gw)
    stop(sim)
    stop(socat)
    reqs = [tuple(int(x) for x in l.split()[1:]) for l in open(f"{d}/req.log") if l.startswith("REQ")]
    reqs = reqs[len(reqs) // 5:]   # skip the start
    span = (reqs[-1][0] - reqs[0][0]) / 1e6
    rate = (len(reqs) - 1) / span
    char = (1 + 8 + 1 + 1) * 1e6 / baud
    silence = 1750 if baud > 19200 else 3.5 * char
    # One FC3 of one register: 8 request + 7 response characters, and a silence after each frame.
    ceiling = 1e6 / (15 * char + 2 * silence)
    gaps = [r[5] for r in reqs if r[5] > 0]
    print(f"RTU {baud:6d} baud, 30 slaves: {rate:7.1f} transactions/s = {rate / ceiling * 100:5.1f}% of the "
          f"ceiling ({ceiling:.1f}/s); smallest silence seen {min(gaps) / 1000:.2f} ms (rule {silence / 1000:.2f} ms)")
    shutil.rmtree(d, ignore_errors=True)


try:
    bench_tcp()
    for baud in (9600, 115200):
        bench_rtu(baud)
finally:
    for p in procs:
        stop(p)
