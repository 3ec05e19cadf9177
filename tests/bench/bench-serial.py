#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Serial adapter benchmark (by hand): run from a build directory's parent, e.g.

    python3 tests/bench/bench-serial.py build [N_FRAMES]

1. Decoding throughput: N NMEA GGA sentences (xor8 hex check + PCRE2 regex with named groups,
   every frame emitted as telemetry) written to a socat pty as fast as possible; fieldhubd's
   frames/s and CPU per 1,000 frames (utime+stime of the daemon), against a minimal C line
   splitter (bench-serial-split) reading the same bytes through the same kind of pty in the
   same run. A pseudo-terminal ignores baud rates: this measures the decoder, not the line.
2. Line rate: the same sentences paced at 115,200 baud 8N1 (11,520 bytes/s) for ~10 s; every
   frame must arrive, none merged (a merged frame would fail its check or regex)."""

import json
import os
import subprocess
import sys
import tempfile
import time
import tty

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))

BUILD = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "build")
N = int(sys.argv[2]) if len(sys.argv) > 2 else 100000
os.environ.setdefault("FIELDHUBD", os.path.join(BUILD, "gateway", "fieldhubd"))
os.environ.setdefault("FIELDHUBCTL", os.path.join(BUILD, "gateway", "fieldhubctl"))
from fhlib import Daemon, config_text, ctl, write  # noqa: E402


def nmea(body):
    x = 0
    for ch in body.encode():
        x ^= ch
    return f"${body}*{x:02X}\r\n".encode()


def sentences(n):
    out = []
    for i in range(n):
        out.append(nmea(f"GPGGA,{i % 240000:06d}.00,5321.{i % 10000:04d},N,00630.3372,W,1,{i % 12:02d},1.03,61.7,M,55.2,M,,"))
    return out


def pty_pair(d, name):
    a, b = os.path.join(d, name + "-a"), os.path.join(d, name + "-b")
    p = subprocess.Popen(["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
                         stderr=subprocess.DEVNULL)
    while not (os.path.exists(a) and os.path.exists(b)):
        time.sleep(0.02)
    return p, a, b


def writer(path):
    fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
    tty.setraw(fd)
    return fd


def cpu_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serial_state(d):
    return json.loads(ctl(d, "--json", "twin", "show", "gps")
                      .stdout)["properties"]["reported"].get("serial", {})


def main():
    data = sentences(N)
    blob = b"".join(data)
    d = tempfile.mkdtemp(prefix="fieldhub-bench-serial-")

    # --- baseline: the minimal C line splitter -----------------------------------------------
    sp, a, b = pty_pair(d, "base")
    split = subprocess.Popen([os.path.join(BUILD, "tests", "bench-serial-split"), a, str(N)], stdout=subprocess.PIPE,
                             text=True)
    split.stdout.readline()
    fd = writer(b)
    os.write(fd, blob)
    lines, secs, cpu = split.stdout.readline().split()
    split.wait()
    os.close(fd)
    sp.terminate()
    base_fps = int(lines) / float(secs)
    print(f"baseline line splitter: {lines} lines in {float(secs):.3f}s = {base_fps:,.0f} lines/s, "
          f"CPU {float(cpu) * 1000 / int(lines) * 1000:.1f} ms per 1,000 lines")

    # --- fieldhubd ------------------------------------------------------------------------------
    sp, a, b = pty_pair(d, "gw")
    cfg = write(os.path.join(d, "fieldhub.yaml"), config_text(d, level="notice", extra=f"""adapters:
  - type: serial
    name: bench
    devices:
      - name: gps
        port: {{device: {a}, baud: 115200}}
        report_interval: 100ms
        framing: {{type: line, delimiter: '\\r\\n', max_length: 100}}
        check: {{type: xor8, encoding: hex, position: -2, from: 1, to: -3}}
        messages:
          - name: gga
            match: {{prefix: '$GPGGA'}}
            decode: regex
            regex: '^\\$GPGGA,(?<utc>[0-9.]*),(?<lat>[0-9.]*),(?<ns>[NS]?),(?<lon>[0-9.]*),(?<ew>[EW]?),(?<fix>\\d*),(?<sats>\\d*),(?<hdop>[0-9.]*),(?<alt>-?[0-9.]*),'
            types: {{utc: string}}
"""))
    daemon = Daemon(cfg)
    daemon.wait_log(r"fieldhubd .* started")
    while serial_state(d).get("state") != "online":
        time.sleep(0.1)
    fd = writer(b)
    cpu0 = cpu_of(daemon.pid)
    t0 = time.monotonic()
    os.write(fd, blob)
    last = -1
    while True:
        st = serial_state(d)
        if st.get("frames", 0) >= N or (st.get("frames") == last and time.monotonic() - t0 > 60):
            break
        last = st.get("frames")
        time.sleep(0.05)
    el = time.monotonic() - t0
    cpu = cpu_of(daemon.pid) - cpu0
    st = serial_state(d)
    fps = st["frames"] / el
    print(f"fieldhubd serial adapter: {st['frames']} frames decoded ({st['telemetry']} emitted, "
          f"{st['checkErrors']} check errors) in {el:.3f}s = {fps:,.0f} frames/s "
          f"(upper bound on the time: the twin is polled every 50 ms), "
          f"CPU {cpu * 1000 / max(st['frames'], 1) * 1000:.1f} ms per 1,000 frames "
          f"(decode + telemetry into the outbox); ratio to the splitter: {fps / base_fps:.2f}")

    # --- line rate: 115,200 baud 8N1 pacing -------------------------------------------------------
    n0 = st["frames"]
    e0 = st["checkErrors"]
    bps = 115200 / 10
    k = int(bps * 10 / len(data[0]))
    paced = data[:k]
    t0 = time.monotonic()
    sent = 0
    for s in paced:
        for i in range(0, len(s), 12):          # ~1 ms worth of characters at a time
            os.write(fd, s[i:i + 12])
            sent += len(s[i:i + 12])
            delay = t0 + sent / bps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    el = time.monotonic() - t0
    time.sleep(0.5)
    st = serial_state(d)
    got = st["frames"] - n0
    print(f"line rate: {len(paced)} sentences paced at 115200 baud ({sent / el * 10:,.0f} baud achieved, "
          f"{el:.1f}s): {got} decoded, {st['checkErrors'] - e0} check errors, {st['unmatched']} unmatched -> "
          f"{'no frame lost or merged' if got == len(paced) and st['checkErrors'] == e0 else 'LOSS'}")
    os.close(fd)
    daemon.stop()
    sp.terminate()
    subprocess.run(["rm", "-rf", d])


if __name__ == "__main__":
    main()
