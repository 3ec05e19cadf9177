#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""Modbus adapter benchmark (by hand, not in CI):

  python3 tests/bench/bench-modbus.py BUILD_DIR [--units 200] [--registers 100] [--seconds 10]
      [--rounds 3] [--fieldhubd BIN ...] [--perf FILE | --callgrind] [--only tcp|rtu] [--bauds 9600,115200]

1. TCP: a libmodbus server (bench-modbus-peer server; 500 float32 values that change with
   every request) pinned to the last CPU; against it, pinned to CPU 0 (every thread of each
   contender) and interleaved for --rounds rounds: the bare libmodbus loop executing the request
   plan (UNITS units x one read of REGISTERS holding registers, back to back), then each
   fieldhubd (--fieldhubd, repeatable to compare builds in one run; default BUILD/gateway/
   fieldhubd) polling UNITS devices with the same plan (REGISTERS/2 float32 points per device,
   coalesced into one read, every 10 ms so the line is always busy) through the whole gateway
   into the outbox. Every contender is counted by the server over the same window (SIGUSR1
   makes it print its count with a CLOCK_MONOTONIC time stamp); the daemon starts on a state dir
   whose identities exist already (after round 1) and is measured once every device is online.
   Medians over the rounds; the pymodbus client's figure when python3-pymodbus is installed.
   --perf FILE records fieldhubd's window (perf record -g, DWARF); --callgrind runs fieldhubd
   under callgrind, zeroes its counters once every device is online and prints instructions per
   poll over the window (all threads; the profile is kept in /tmp/callgrind.bench-modbus.N.out).
2. RTU: the pacing slave (modbus-sim --rtu-pty --pace: it makes the pseudo-terminal pair
   itself; --socat relays through a socat pty pair instead, socat on the gateway's CPU) with 30
   units on one line, at 9600 and 115200 baud: transactions/s against the line's
   theoretical ceiling, the silences the slave saw against the 3.5-character rule (smallest,
   mean, how many were short) and the gateway's own view of its silence."""

import argparse
import glob
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
ap.add_argument("--rounds", type=int, default=3, help="TCP: interleaved rounds (bare loop, then each fieldhubd)")
ap.add_argument("--port", type=int, default=15502)
ap.add_argument("--fieldhubd", action="append", default=[],
                help="TCP: fieldhubd binary to measure (repeat to compare builds in the same run; "
                     "default BUILD/gateway/fieldhubd)")
ap.add_argument("--perf", metavar="FILE", help="TCP: perf record -g (DWARF) fieldhubd's window into FILE")
ap.add_argument("--callgrind", action="store_true",
                help="TCP: run fieldhubd under callgrind instead, counting instructions per poll "
                     "(all threads, counters zeroed once every device is online)")
ap.add_argument("--rt", action="store_true",
                help="run every contender, the server and the RTU slave SCHED_FIFO 50 (root; identical for all), "
                     "which keeps other work on a shared machine off their cores")
ap.add_argument("--only", choices=["tcp", "rtu"], help="run one part only")
ap.add_argument("--bauds", default="9600,115200", help="RTU: baud rates to run")
ap.add_argument("--socat", action="store_true",
                help="RTU: relay through a socat pty pair (as the integration tests do) instead of the slave's own pty")
ap.add_argument("--keep", action="store_true", help="keep the work directories (logs, the slave's request log)")
ap.add_argument("--rtu-seconds", type=float, default=None, help="RTU measuring time (default --seconds)")
args = ap.parse_args()
B = os.path.abspath(args.build)
PEER = f"{B}/tests/bench-modbus-peer"
SIM = f"{B}/tests/modbus-sim"
FIELDHUBDS = [os.path.abspath(f) for f in args.fieldhubd] or [f"{B}/gateway/fieldhubd"]
ncpu = os.cpu_count() or 1
GW_CPU, PEER_CPU = "0", str(ncpu - 1)
procs = []


def spawn(cmd, cpu, **kw):
    rt = ["chrt", "-f", "50"] if args.rt else []
    p = subprocess.Popen(["taskset", "-c", cpu, *rt, *cmd], **kw)
    procs.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
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


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


class Server:
    """The libmodbus server: every contender is counted here, by the requests it answered."""

    def __init__(self):
        self.p = spawn([PEER, "server", str(args.port)], PEER_CPU, stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)

    def count(self):
        """The server's request count now (it answers "requests N" on SIGUSR1)."""
        self.p.send_signal(signal.SIGUSR1)
        while True:
            line = self.p.stdout.readline()
            m = re.match(r"requests (\d+) at ([\d.]+)", line)
            if m:
                return int(m.group(1)), float(m.group(2))
            if not line:
                raise SystemExit("bench-modbus-peer server died")


def measure(server, seconds):
    """Requests/s the server answered over `seconds`."""
    c0, t0 = server.count()
    time.sleep(seconds)
    c1, t1 = server.count()
    return c1 - c0, (c1 - c0) / (t1 - t0)


def bare_round(server):
    p = spawn([PEER, "client", str(args.port), str(args.units), str(args.registers), str(args.seconds + 1.5)],
              GW_CPU, stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    _, rate = measure(server, args.seconds)
    p.communicate()
    return rate


def gw_config(d):
    pts = "\n".join(f"          - {{name: p{i}, table: holding_register, address: {2 * i}, type: float32}}"
                    for i in range(args.registers // 2))
    return f"""hub:
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


def gw_round(server, binary, d):
    """One fieldhubd run on an existing state dir (identities already created). Returns
    (requests/s counted by the server, CPU share, RSS KiB, adapter figures)."""
    log = f"{d}/log"
    cmd = [binary, "--config", f"{d}/fieldhub.yaml"]
    if args.callgrind:
        for f in glob.glob(f"{d}/callgrind.out*"):
            os.unlink(f)
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={d}/callgrind.out", *cmd]
    gw = spawn(cmd, GW_CPU, stderr=open(log, "w"))
    # Every device online before measuring.
    end = time.monotonic() + (600 if args.callgrind else 120)
    while open(log).read().count(" is online") < args.units and time.monotonic() < end:
        time.sleep(0.2)
    time.sleep(1)
    if args.callgrind:
        subprocess.run(["callgrind_control", "-z", str(gw.pid)], capture_output=True)
    perf = None
    if args.perf:
        perf = subprocess.Popen(["perf", "record", "-g", "--call-graph", "dwarf,16384", "-F", "2000", "-o", args.perf,
                                 "-p", str(gw.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpu0, t0 = cpu_seconds(gw.pid), time.monotonic()
    n, rate = measure(server, args.seconds)
    cpu = (cpu_seconds(gw.pid) - cpu0) / (time.monotonic() - t0)
    if args.callgrind:
        subprocess.run(["callgrind_control", "-d", str(gw.pid)], capture_output=True)
    if perf:
        perf.send_signal(signal.SIGINT)
        perf.wait()
    rss = rss_kib(gw.pid)
    stop(gw)
    text = open(log).read()
    m = re.search(r"Adapter bench stopped: (\d+) messages stored, (\d+) dropped; (\{.*\})", text)
    import json
    line = json.loads(m.group(3))["lines"][0] if m else {}
    extra = ""
    if args.callgrind:
        dumps = sorted(f for f in glob.glob(f"{d}/callgrind.out*") if f != f"{d}/callgrind.out")
        out = subprocess.run(["callgrind_annotate", dumps[0]], capture_output=True, text=True).stdout if dumps else ""
        mm = re.search(r"([\d,]+) \(100.0%\)\s+PROGRAM TOTALS", out) or re.search(r"([\d,]+)\s+PROGRAM TOTALS", out)
        if mm:
            ir = int(mm.group(1).replace(",", ""))
            extra = f"; callgrind {ir / max(n, 1):.0f} instructions per poll ({ir} over {n} polls)"
            keep = f"/tmp/callgrind.bench-modbus.{len(glob.glob('/tmp/callgrind.bench-modbus.*'))}.out"
            shutil.copy(dumps[0], keep)
            extra += f" (profile: {keep})"
    return rate, cpu, rss, line, extra


def bench_tcp():
    server = Server()
    dirs = []
    for b in FIELDHUBDS:
        d = tempfile.mkdtemp(prefix="fieldhub-bench-", dir="/var/tmp")
        open(f"{d}/fieldhub.yaml", "w").write(gw_config(d))
        dirs.append(d)
    bare, gws = [], [[] for _ in FIELDHUBDS]
    for rnd in range(args.rounds):
        if not args.callgrind:
            bare.append(bare_round(server))
            print(f"round {rnd + 1}: bare libmodbus loop {bare[-1]:8.0f} requests/s", flush=True)
        for i, (b, d) in enumerate(zip(FIELDHUBDS, dirs)):
            rate, cpu, rss, line, extra = gw_round(server, b, d)
            gws[i].append(rate)
            ratio = f" = {rate / bare[-1]:.2f}x bare" if bare else ""
            print(f"round {rnd + 1}: {b}: {rate:8.0f} requests/s{ratio}; CPU {cpu * 100:.0f}% of one core; "
                  f"RSS {rss // 1024} MiB; stored {line.get('transactions', '?')} transactions, "
                  f"held back {line.get('heldBack', '?')}; per transaction: {line.get('meanTransactionMs', 0) * 1000:.0f} us in it, "
                  f"{line.get('meanBetweenMs', 0) * 1000:.0f} us in the worker before the next{extra}", flush=True)
    if bare:
        mb = median(bare)
        print(f"bare libmodbus loop : {mb:10.0f} requests/s {mb * args.registers:12.0f} registers/s (median of {len(bare)})")
    for b, rates in zip(FIELDHUBDS, gws):
        r = median(rates)
        ratio = f"{median([x / y for x, y in zip(rates, bare)]):.2f}x bare (median of the rounds' ratios); " if bare else ""
        print(f"fieldhubd -> outbox : {r:10.0f} requests/s {r * args.registers:12.0f} registers/s ({ratio}"
              f"{r * (args.registers // 2):.0f} point values/s) {b}")
    try:
        from pymodbus.client import ModbusTcpClient  # noqa
        os.sched_setaffinity(0, {int(GW_CPU)})
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
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def bench_rtu(baud):
    d = tempfile.mkdtemp(prefix="fieldhub-bench-")
    a, b = f"{d}/gw", f"{d}/slave"
    units = 30
    sim_args = ["--baud", str(baud), "--parity", "even", "--units", ",".join(str(u) for u in range(1, units + 1)),
                "--pace", "--log", f"{d}/req.log"]
    if args.socat:
        # socat is the wire: on the gateway's core (the pacing slave spins on the other one while
        # it times its bytes; an unpinned socat would queue behind it).
        socat = subprocess.Popen(["taskset", "-c", GW_CPU, "socat", f"pty,raw,echo=0,link={a}",
                                  f"pty,raw,echo=0,link={b}"])
        procs.append(socat)
        while not (os.path.exists(a) and os.path.exists(b)):
            time.sleep(0.02)
        sim = spawn([SIM, "--rtu", b, *sim_args], PEER_CPU)
    else:
        # The slave makes the pty pair and serves its master side: one kernel hop per frame.
        socat = None
        sim = spawn([SIM, "--rtu-pty", a, *sim_args], PEER_CPU)
        while not os.path.exists(a):
            time.sleep(0.02)
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
    name: bus
    devices:
""" + "".join(f"""      - {{name: s{u}, rtu: {{device: {a}, baud: {baud}, parity: even}}, unit: {u}, poll_interval: 10ms,
          timeout: 200ms, points: [{{name: x, table: holding_register, address: 0}}]}}
""" for u in range(1, units + 1))
    open(f"{d}/fieldhub.yaml", "w").write(cfg)
    gw = spawn([FIELDHUBDS[-1], "--config", f"{d}/fieldhub.yaml"], GW_CPU, stderr=open(f"{d}/log", "w"))
    time.sleep(2 + (args.rtu_seconds or args.seconds))
    stop(gw)
    stop(sim)
    if socat:
        stop(socat)
    import json
    m = re.search(r"Adapter bus stopped: .*?; (\{.*\})", open(f"{d}/log").read())
    gwline = json.loads(m.group(1))["lines"][0] if m else {}
    reqs = [tuple(int(x) for x in l.split()[1:]) for l in open(f"{d}/req.log") if l.startswith("REQ")]
    reqs = reqs[len(reqs) // 5:]   # skip the start
    span = (reqs[-1][0] - reqs[0][0]) / 1e6
    rate = (len(reqs) - 1) / span
    char = (1 + 8 + 1 + 1) * 1e6 / baud
    silence = 1750 if baud > 19200 else 3.5 * char
    # One FC3 of one register: 8 request + 7 response characters, and a silence after each frame.
    ceiling = 1e6 / (15 * char + 2 * silence)
    gaps = [r[5] for r in reqs if r[5] > 0]
    short = sum(1 for g in gaps if g < silence)
    cycle = span * 1e6 / (len(reqs) - 1)
    mean_gap = sum(gaps) / len(gaps)
    print(f"RTU {baud:6d} baud, 30 slaves: {rate:7.1f} transactions/s = {rate / ceiling * 100:5.1f}% of the "
          f"ceiling ({ceiling:.1f}/s); smallest silence seen {min(gaps) / 1000:.3f} ms (rule {silence / 1000:.3f} ms), "
          f"{short} of {len(gaps)} shorter; mean cycle {cycle:.0f} us (ideal {1e6 / ceiling:.0f}), mean silence left by "
          f"the gateway {mean_gap:.0f} us (the gateway's own view: {gwline.get('meanBetweenMs', 0) * 1000:.0f} us "
          f"from a response to the next request, {gwline.get('meanTransactionMs', 0) * 1000:.0f} us in a transaction; "
          f"timeouts {gwline.get('timeouts')}, CRC errors {gwline.get('crcErrors')})")
    if args.keep:
        print(f"  kept {d}")
    else:
        shutil.rmtree(d, ignore_errors=True)


try:
    if args.only != "rtu":
        bench_tcp()
    if args.only != "tcp":
        for baud in (int(b) for b in args.bauds.split(",")):
            bench_rtu(baud)
finally:
    for p in procs:
        stop(p)
