#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The serial adapter against instruments played by this test over socat pty pairs: the test
holds one end, fieldhubd owns the other. Every framing and checksum, decoding of every type,
resync after noise, a frame one byte at a time and three frames in one write, commands with
and without replies and a reply timeout, polling, C2D, the port vanishing and coming back,
a port claimed twice, RS-485 on a pty, the example plugin, and the shipped examples.
Checked from outside only: telemetry (fieldhubctl monitor-events), the twin's reported
properties, method responses and the log."""

import json
import re
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import termios
import tty
import fcntl
import zlib

sys.path.insert(0, os.path.dirname(__file__))
from fhlib import (FIELDHUBD, SRCDIR, Daemon, Skip, at_exit, config_text, ctl, main,  # noqa: E402
                   tmpdir, write)
from fhlib import monitor_args, reported, telemetry_of, wait_for  # noqa: E402

BUILDDIR = os.path.dirname(os.path.dirname(FIELDHUBD))
PLUGIN = os.path.join(BUILDDIR, "adapters", "serial", "fieldhub-serial-example.so")


# ---- checks, as an instrument computes them -------------------------------------------------

def crc16_modbus(b):
    c = 0xFFFF
    for x in b:
        c ^= x
        for _ in range(8):
            c = (c >> 1) ^ 0xA001 if c & 1 else c >> 1
    return c


def crc16_msb(b, init):
    c = init
    for x in b:
        c ^= x << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) & 0xFFFF if c & 0x8000 else (c << 1) & 0xFFFF
    return c


def nmea(body):
    x = 0
    for ch in body.encode():
        x ^= ch
    return f"${body}*{x:02X}\r\n".encode()


def slip(p):
    return b"\xC0" + p.replace(b"\xDB", b"\xDB\xDD").replace(b"\xC0", b"\xDB\xDC") + b"\xC0"


def cobs(p):
    out, block = bytearray(), bytearray()
    for x in p + b"\x00":
        if x == 0:
            out.append(len(block) + 1)
            out += block
            block = bytearray()
        else:
            block.append(x)
            if len(block) == 254:
                out.append(255)
                out += block
                block = bytearray()
    return bytes(out[:-1]) + b"\x00" if False else bytes(out) + b"\x00"


# ---- pty pairs and the daemon -----------------------------------------------------------------

class Pty:
    """A socat pseudo-terminal pair: gw (fieldhubd's end) and inst (ours)."""

    def __init__(self, d, name):
        if not shutil.which("socat"):
            raise Skip("socat is not installed")
        self.gw, self.inst = os.path.join(d, name + "-gw"), os.path.join(d, name + "-inst")
        self.proc = None
        self.fd = None
        self.start()
        at_exit(self.stop)

    def start(self):
        self.proc = subprocess.Popen(["socat", f"pty,raw,echo=0,link={self.gw}", f"pty,raw,echo=0,link={self.inst}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 5
        while not (os.path.exists(self.gw) and os.path.exists(self.inst)):
            assert time.monotonic() < end, "socat did not create the pty pair"
            time.sleep(0.02)
        self.fd = os.open(self.inst, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)

    def stop(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=3)

    def send(self, data, bytewise=False):
        if bytewise:
            for i in range(len(data)):
                os.write(self.fd, data[i:i + 1])
                time.sleep(0.002)
        else:
            os.write(self.fd, data)

    def read(self, timeout=2.0, until=None):
        """Reads what fieldhubd wrote, up to timeout (or until bytes `until` arrived)."""
        buf = b""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                chunk = os.read(self.fd, 4096)
                buf += chunk
                if until is not None and until in buf:
                    return buf
            except BlockingIOError:
                time.sleep(0.01)
        return buf


def start(d, adapters_yaml, level="info"):
    cfg = write(os.path.join(d, "fieldhub.yaml"), config_text(d, extra="adapters:\n" + adapters_yaml, level=level))
    daemon = Daemon(cfg)
    daemon.wait_log(r"fieldhubd .* started")
    return daemon


class Monitor:
    """fieldhubctl monitor-events for one device, started before the instrument speaks."""

    def __init__(self, d, device, seconds):
        self.p = subprocess.Popen(monitor_args(d, device, seconds), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        at_exit(lambda: self.p.poll() is None and self.p.kill())
        time.sleep(0.7)  # let it subscribe

    def events(self):
        out, _ = self.p.communicate(timeout=60)
        return [(payload, props["application"]) for payload, props in telemetry_of(out)]


def method(d, device, name, payload=None):
    args = ["--json", "method", "invoke", device, name]
    if payload is not None:
        args += ["--payload", json.dumps(payload)]
    return json.loads(ctl(d, *args).stdout)


def dev_yaml(name, port, body):
    return f"""      - name: {name}
        port: {{device: {port}, baud: 115200}}
        report_interval: 200ms
""" + body


# ---- tests ------------------------------------------------------------------------------------

def test_nmea_lines_regex_csv_resync():
    d = tmpdir()
    gps = Pty(d, "gps")
    _dev0 = dev_yaml("gps-1", gps.gw, '''        framing: {type: line, delimiter: '\\r\\n', max_length: 100}
        check: {type: xor8, encoding: hex, position: -2, from: 1, to: -3}
        messages:
          - name: gga
            match: {prefix: '$GPGGA'}
            decode: regex
            regex: '^\\$GPGGA,(?<utc>[0-9.]*),(?<lat>[0-9.]*),(?<ns>[NS]?),(?<lon>[0-9.]*),(?<ew>[EW]?),(?<fix>\\d*),(?<sats>\\d*),'
            types: {utc: string}
          - name: rmc
            match: {prefix: '$GPRMC'}
            decode: csv
            columns: [null, utc, status, lat, ns, lon, ew, speed, course, date]
            types: {utc: string, date: string}
''')
    daemon = start(d, f"""  - type: serial
    name: gps
    devices:
{_dev0}""")
    wait_for(lambda: reported(d, "gps-1")["serial"]["state"] == "online", what="gps-1 online")
    mon = Monitor(d, "gps-1", 4)
    gga = nmea("GPGGA,092750.000,5321.6802,N,00630.3372,W,1,8,1.03,61.7,M,55.2,M,,")
    rmc = nmea("GPRMC,092751.000,A,5321.6802,N,00630.3372,W,0.06,31.66,280511,,,A")
    bad = bytearray(gga)
    bad[10] ^= 1                                           # checksum now wrong
    gps.send(gga, bytewise=True)                           # one byte at a time
    gps.send(b"\x00\xff garbage without end " * 3 + b"\r\n" + bytes(bad) + b"$GPGSV,ignored*00\r\n")
    gps.send(gga + rmc + gga)                               # three frames in one write
    time.sleep(0.5)
    evs = mon.events()
    kinds = [e[0]["kind"] for e in evs]
    assert kinds == ["gga", "gga", "rmc", "gga"], evs
    v = evs[0][0]["values"]
    assert v == {"utc": "092750.000", "lat": 5321.6802, "ns": "N", "lon": 630.3372, "ew": "W", "fix": 1, "sats": 8}, v
    assert evs[0][1]["adapterType"] == "serial" and evs[0][1]["messageKind"] == "gga", evs[0][1]
    r = evs[2][0]["values"]
    assert r["status"] == "A" and r["speed"] == 0.06 and r["date"] == "280511" and r["utc"] == "092751.000", r
    assert evs[3][0]["values"] == v, evs[3]
    rep = wait_for(lambda: (lambda s: s if s["checkErrors"] >= 2 and s["frames"] >= 4 else None)(
        reported(d, "gps-1")["serial"]), what="counters in the twin")
    assert rep["telemetry"] == 4, rep
    daemon.wait_log(r"xor8 check failed")
    assert daemon.alive()
    rc, _ = daemon.stop()
    assert rc == 0


BINARY_FIELDS = """            decode: binary
            fields:
              - {name: temp, offset: OFF0, type: i16, byte_order: little, scale: 0.01}
              - {name: count, offset: OFF2, type: u32}
              - {name: ratio, offset: OFF6, type: f32, byte_order: little}
              - {name: alarm, offset: OFF10, type: u8, bit: 0}
              - {name: mode, offset: OFF10, type: u8, bit: 4, bits: 3}
"""


def binary_fields(base):
    s = BINARY_FIELDS
    for k in (10, 6, 2, 0):
        s = s.replace(f"OFF{k}", str(base + k))
    return s


def payload(temp, count, ratio, alarm, mode):
    return struct.pack("<h", int(round(temp * 100))) + struct.pack(">I", count) + struct.pack("<f", ratio) + \
        bytes([(alarm & 1) | (mode << 4)])


def test_every_framing_and_check():
    d = tmpdir()
    ptys = {n: Pty(d, n) for n in ("len", "fix", "mark", "slip", "cobs", "idle")}
    devs = ""
    # length prefixed, CRC-16/MODBUS (LE) over everything before it; the length counts the
    # payload after the 2-byte length field plus the CRC.
    devs += dev_yaml("len", ptys["len"].gw, """        framing: {type: length, sync: '\\xAA\\x55', length_offset: 2, length_size: 2, length_byte_order: big, length_adjust: 2, max_length: 64}
        check: {type: crc16-modbus}
        messages:
          - name: m
""" + binary_fields(4))
    # fixed length, sum8
    devs += dev_yaml("fix", ptys["fix"].gw, """        framing: {type: fixed, length: 13, sync: '\\x7E'}
        check: {type: sum8, from: 0}
        messages:
          - name: m
""" + binary_fields(1))
    # STX/ETX with DLE escaping, CRC-16/CCITT-FALSE (BE) over the payload
    devs += dev_yaml("mark", ptys["mark"].gw, """        framing: {type: markers, start: '\\x02', end: '\\x03', escape: '\\x10', escape_xor: 0x20, max_length: 64}
        check: {type: crc16-ccitt-false}
        messages:
          - name: m
""" + binary_fields(0))
    # SLIP, CRC-32 little endian at the start, covering what follows
    devs += dev_yaml("slip", ptys["slip"].gw, """        framing: {type: slip, max_length: 64}
        check: {type: crc32, position: 0, from: 4, to: -0, byte_order: little}
        messages:
          - name: m
""".replace("to: -0, ", "to: 15, ") + binary_fields(4))
    # COBS, CRC-16/XMODEM
    devs += dev_yaml("cobs", ptys["cobs"].gw, """        framing: {type: cobs, max_length: 64}
        check: {type: crc16-xmodem}
        messages:
          - name: m
""" + binary_fields(0))
    # inter-character timeout ends a frame, LRC; two kinds selected by a type byte
    devs += dev_yaml("idle", ptys["idle"].gw, """        framing: {type: idle, idle_timeout: 30ms, max_length: 64}
        check: {type: lrc}
        messages:
          - name: other
            match: {offset: 0, byte: 0x02}
            decode: binary
            fields: [{name: s, offset: 1, type: string, length: 3}, {name: b, offset: 4, type: bcd, length: 2}, {name: h, offset: 6, type: hex, length: 2}]
          - name: m
            match: {offset: 0, byte: 0x01}
""" + binary_fields(1))
    daemon = start(d, "  - type: serial\n    name: bin\n    devices:\n" + devs)
    for n in ptys:
        wait_for(lambda: reported(d, n)["serial"]["state"] == "online", what=f"{n} online")

    p1 = payload(-12.34, 3000000000, 0.5, 1, 5)
    p2 = payload(99.99, 7, -2.25, 0, 2)
    want1 = {"temp": -12.34, "count": 3000000000, "ratio": 0.5, "alarm": True, "mode": 5}
    want2 = {"temp": 99.99, "count": 7, "ratio": -2.25, "alarm": False, "mode": 2}

    def f_len(p):
        b = b"\xAA\x55" + struct.pack(">H", len(p)) + p
        return b + struct.pack("<H", crc16_modbus(b))

    def f_fix(p):
        b = b"\x7E" + p
        return b + bytes([sum(b) & 0xFF])

    def f_mark(p):
        body = p + struct.pack(">H", crc16_msb(p, 0xFFFF))
        esc = bytearray()
        for x in body:
            if x in (0x02, 0x03, 0x10):
                esc += bytes([0x10, x ^ 0x20])
            else:
                esc.append(x)
        return b"\x02" + bytes(esc) + b"\x03"

    def f_slip(p):
        body = p
        return slip(struct.pack("<I", zlib.crc32(body)) + body)

    def f_cobs(p):
        return cobs(p + struct.pack(">H", crc16_msb(p, 0)))

    def f_idle(p):
        b = b"\x01" + p
        return b + bytes([(-sum(b)) & 0xFF])

    makers = {"len": f_len, "fix": f_fix, "mark": f_mark, "slip": f_slip, "cobs": f_cobs, "idle": f_idle}
    for n, mk in makers.items():
        mon = Monitor(d, n, 3 if n != "idle" else 4)
        inst = ptys[n]
        good1, good2 = mk(p1), mk(p2)
        broken = bytearray(good1)
        broken[len(broken) // 2] ^= 0x40                 # fails its check
        if n == "idle":
            inst.send(good1, bytewise=True)              # bytes 2 ms apart: one frame
            time.sleep(0.1)
            inst.send(bytes(broken))
            time.sleep(0.1)
            other = b"\x02ABC\x12\x34\xbe\xef"
            inst.send(other + bytes([(-sum(other)) & 0xFF]))
            time.sleep(0.1)
            inst.send(good2)
        else:
            noise = b"\x7E\xAA\x55\x02\x00\xC0\x03\x10" if n != "cobs" else b"\x05\x01"
            inst.send(good1, bytewise=True)
            inst.send(noise + bytes(broken) + good2 + good1 + good2)   # noise, a bad frame, three in one write
        time.sleep(0.3)
        evs = [e[0] for e in mon.events()]
        vals = [e["values"] for e in evs if e["kind"] == "m"]

        def close(a, b):
            return all(abs(a[k] - b[k]) < 1e-6 if isinstance(b[k], float) else a[k] == b[k] for k in b)
        if n == "idle":
            assert len(vals) == 2 and close(vals[0], want1) and close(vals[1], want2), (n, evs)
            o = [e["values"] for e in evs if e["kind"] == "other"]
            assert o == [{"s": "ABC", "b": 1234, "h": "beef"}], (n, evs)
        else:
            assert len(vals) == 4, (n, evs)
            assert close(vals[0], want1) and close(vals[1], want2) and close(vals[2], want1) and close(vals[3], want2), \
                (n, vals)
        rep = wait_for(lambda: (lambda s: s if s["checkErrors"] + s["framingErrors"] >= 1 else None)(
            reported(d, n)["serial"]), what=f"{n}: the broken frame counted")
        assert rep["telemetry"] == (3 if n == "idle" else 4), (n, rep)
    assert daemon.alive()
    rc, _ = daemon.stop()
    assert rc == 0


class Scale(threading.Thread):
    """A request/reply scale: W -> weight, T -> OK, P<v> -> OK; Z -> no answer."""

    def __init__(self, pty):
        super().__init__(daemon=True)
        self.pty = pty
        self.requests = []
        self.stop = False
        self.start()
        at_exit(self.close)

    def close(self):
        self.stop = True
        self.join(2)

    def run(self):
        buf = b""
        while not self.stop:
            try:
                buf += os.read(self.pty.fd, 256)
            except (BlockingIOError, OSError):
                time.sleep(0.005)
                continue
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                self.requests.append(line)
                if line == b"W":
                    self.pty.send(b"ST,GS,+0012.345,kg\r\n")
                elif line == b"T" or line.startswith(b"P"):
                    self.pty.send(b"OK\r\n")


def test_commands_replies_polling_c2d():
    d = tmpdir()
    p = Pty(d, "scale")
    scale = Scale(p)
    _dev1 = dev_yaml("scale-1", p.gw, '''        framing: {type: line, delimiter: '\\r\\n', max_length: 64}
        messages:
          - name: weight
            match: {prefix: 'S'}
            decode: regex
            regex: '^(?<stability>ST|US),(?<mode>GS|NT),(?<weight>[-+]?\\d+\\.\\d+),(?<unit>\\w+)$'
          - name: ack
            match: {prefix: 'OK'}
            decode: regex
            regex: '^(?<status>OK)$'
            telemetry: false
        commands:
          - {name: weigh, text: 'W', reply: {message: weight, timeout: 500ms}}
          - {name: tare, text: 'T', c2d: true, reply: {message: ack, timeout: 1s}}
          - {name: preset, text: 'P{value:%04.1f}', reply: {message: ack, timeout: 1s}}
          - {name: beep, text: 'B{n}'}
          - {name: zero, text: 'Z', reply: {message: ack, timeout: 300ms}}
        poll:
          - {command: weigh, interval: 300ms}
''')
    daemon = start(d, f"""  - type: serial
    name: packing
    devices:
{_dev1}""")
    wait_for(lambda: reported(d, "scale-1")["serial"]["state"] == "online", what="online")
    mon = Monitor(d, "scale-1", 2)
    evs = mon.events()
    assert len(evs) >= 3 and all(e[0]["kind"] == "weight" for e in evs), evs
    assert evs[0][0]["values"] == {"stability": "ST", "mode": "GS", "weight": 12.345, "unit": "kg"}, evs[0]
    assert scale.requests.count(b"W") >= 3

    res = method(d, "scale-1", "weigh")
    assert res["status"] == 200 and res["payload"]["values"]["weight"] == 12.345, res
    res = method(d, "scale-1", "preset", {"value": 2.5})
    assert res["status"] == 200 and res["payload"] == {"kind": "ack", "values": {"status": "OK"}}, res
    assert b"P02.5" in scale.requests
    res = method(d, "scale-1", "beep", {"n": 3})                  # no reply expected
    assert res["status"] == 200, res
    wait_for(lambda: b"B3" in scale.requests, what="B3 on the wire")
    t0 = time.monotonic()
    res = method(d, "scale-1", "zero")                             # the scale never answers
    assert res["status"] == 504 and "no ack reply" in res["payload"]["error"], res
    assert 0.25 < time.monotonic() - t0 < 5
    res = method(d, "scale-1", "preset", {})
    assert res["status"] == 400 and "missing argument \"value\"" in res["payload"]["error"], res
    res = method(d, "scale-1", "explode")
    assert res["status"] == 404, res
    # C2D: the application property `command` names the template.
    n_t = scale.requests.count(b"T")
    ctl(d, "c2d", "send", "scale-1", "--body", "{}", "--property", "command=tare")
    wait_for(lambda: scale.requests.count(b"T") == n_t + 1, timeout=5, what="tare from C2D")
    # The command's reply completed the message: the queue is empty again.
    wait_for(lambda: json.loads(ctl(d, "device", "show", "scale-1", "--json").stdout)
             .get("cloudToDeviceMessageCount") == 0, timeout=5, what="C2D message completed")
    rep = wait_for(lambda: (lambda s: s if s["replyTimeouts"] >= 1 else None)(reported(d, "scale-1")["serial"]),
                   what="reply timeout counted")
    assert rep["commands"] >= 6, rep
    daemon.wait_log(r"No ack reply to command zero within 300ms")
    rc, _ = daemon.stop()
    assert rc == 0


def test_port_vanishes_and_returns():
    d = tmpdir()
    p = Pty(d, "usb")
    _dev2 = dev_yaml("usb-1", p.gw, '''        reopen: {min: 100ms, max: 400ms}
        framing: {type: line}
        messages: [{name: v, decode: kv, pair_separator: ',', types: {id: string}}]
''')
    daemon = start(d, f"""  - type: serial
    name: usb
    devices:
{_dev2}""")
    wait_for(lambda: reported(d, "usb-1")["serial"]["state"] == "online", what="online")
    p.stop()                                   # unplug: socat gone, the link disappears
    daemon.wait_log(r"serial port .*usb-gw disappeared")
    wait_for(lambda: reported(d, "usb-1")["serial"]["state"] == "offline", what="offline in the twin")
    time.sleep(1.0)                            # a few failed reopen attempts
    assert daemon.alive()
    p.start()                                  # plugged back, same link name
    daemon.wait_log(r"Serial port .*usb-gw is back", timeout=10)
    wait_for(lambda: reported(d, "usb-1")["serial"]["state"] == "online", what="online again")
    mon = Monitor(d, "usb-1", 2)
    p.send(b"x=42, name = pump 3,t=-1.5,id=007,flag=\n")
    evs = mon.events()
    assert [e[0]["values"] for e in evs] == [{"x": 42, "name": "pump 3", "t": -1.5, "id": "007", "flag": None}], evs
    assert reported(d, "usb-1")["serial"]["reopens"] >= 2
    rc, _ = daemon.stop()
    assert rc == 0


def test_port_claimed_twice_and_rs485():
    d = tmpdir()
    a, b, c = Pty(d, "a"), Pty(d, "b"), Pty(d, "c")
    # Another process holds port b exclusively.
    fd = os.open(b.gw, os.O_RDWR | os.O_NOCTTY)
    at_exit(lambda: os.close(fd))
    fcntl.ioctl(fd, termios.TIOCEXCL)
    body = """        framing: {type: line}
        messages: [{name: v, decode: kv}]
"""
    daemon = start(d, f"""  - type: serial
    name: first
    devices:
{dev_yaml("dev-a", a.gw, body)}{dev_yaml("dev-b", b.gw, body)}      - name: dev-c
        port: {{device: {c.gw}, rs485: true}}
{body}  - type: serial
    name: second
    devices:
{dev_yaml("dup-a", a.gw, body)}""")
    daemon.wait_log(r"serial port .*a-gw is already owned by adapter \"first\"")
    assert wait_for(lambda: reported(d, "dup-a")["serial"]["state"] == "error", what="dup-a error")
    daemon.wait_log(r"serial port .*b-gw is taken: another process holds it exclusively \(TIOCEXCL\)")
    daemon.wait_log(r"serial port .*c-gw does not support RS-485 mode \(TIOCSRS485: Inappropriate ioctl for device\)")
    assert "RS-485" in wait_for(lambda: reported(d, "dev-c")["serial"].get("lastError"), what="dev-c error")
    assert reported(d, "dev-a")["serial"]["state"] == "online"
    # And fieldhubd itself keeps others out of the port it owns.
    try:
        fd2 = os.open(a.gw, os.O_RDWR | os.O_NOCTTY)
        os.close(fd2)
        if os.geteuid() != 0:
            raise AssertionError("opened a port fieldhubd holds exclusively")
    except OSError as e:
        assert e.errno == 16, e
    # Within one adapter a port used twice is a config error.
    cfg = write(os.path.join(d, "dup.yaml"), config_text(d, extra=f"""adapters:
  - type: serial
    name: x
    devices:
{dev_yaml("d1", a.gw, body)}{dev_yaml("d2", a.gw, body)}"""))
    pr = subprocess.run([FIELDHUBD, "--check-config", "--config", cfg], capture_output=True, text=True)
    assert pr.returncode != 0 and "is already used by device \"d1\"" in pr.stderr, pr.stderr
    assert daemon.alive()
    rc, _ = daemon.stop()
    assert rc == 0


def test_plugin():
    if not os.path.exists(PLUGIN):
        raise AssertionError(f"the example plugin was not built: {PLUGIN}")
    d = tmpdir()
    p = Pty(d, "plug")
    _dev3 = dev_yaml("tv-1", p.gw, '''        framing: {type: plugin, plugin: example}
        plugin_args: scale=0.5
        messages: [{name: tv, decode: plugin, plugin: example}]
        commands: [{name: set, plugin: example}]
''')
    daemon = start(d, f"""  - type: serial
    name: plug
    plugins: {{example: {PLUGIN}}}
    devices:
{_dev3}""")
    wait_for(lambda: reported(d, "tv-1")["serial"]["state"] == "online", what="online")
    mon = Monitor(d, "tv-1", 2)

    def frame(recs):
        b = bytes([0xA5, len(recs)]) + b"".join(struct.pack(">Bh", t, v) for t, v in recs)
        return b + bytes([sum(b) & 0xFF])
    p.send(b"\x00\xA5\x99" + frame([(1, 100), (2, -7)]) + frame([(9, 1)]))
    evs = mon.events()
    assert [e[0]["values"] for e in evs] == [{"t1": 50.0, "t2": -3.5, "records": 2, "sequence": 1},
                                             {"t9": 0.5, "records": 1, "sequence": 2}], evs
    res = method(d, "tv-1", "set", {"tag": 3, "value": -12})
    assert res["status"] == 200, res
    got = p.read(1.0, until=frame([(3, -12)]))
    assert frame([(3, -12)]) in got, got
    res = method(d, "tv-1", "set", {"tag": 3})
    assert res["status"] == 400 and "plugin refused" in res["payload"]["error"], res
    rc, _ = daemon.stop()
    assert rc == 0


def test_examples_and_errors():
    for name in ("serial-nmea-gps.yaml", "serial-binary-sensor.yaml", "serial-scale.yaml"):
        path = os.path.join(SRCDIR, "configs", "examples", name)
        pr = subprocess.run([FIELDHUBD, "--check-config", "--config", path], capture_output=True, text=True)
        assert pr.returncode == 0, (name, pr.stdout, pr.stderr)
    d = tmpdir()
    cfg = write(os.path.join(d, "bad.yaml"), config_text(d, extra="""adapters:
  - type: serial
    name: bad
    devices:
      - name: s
        port: {device: /dev/ttyS0, baud: 9601}
        framing: {type: length, length_offset: 1, delimiter: '\\n'}
        check: {type: crc16-modbus, position: -1}
        messages:
          - {name: a, decode: regex, regex: '(?<x>'}
"""))
    pr = subprocess.run([FIELDHUBD, "--check-config", "--config", cfg], capture_output=True, text=True)
    assert pr.returncode != 0
    assert re.search(r"bad\.yaml:\d+:\d+: adapters\[0\]\.devices\[0\]\.port\.baud: 9601 is not a standard rate",
                     pr.stderr), pr.stderr
    for want in (
                 "framing.delimiter: not used by framing type length",
                 "check.position: the 2-byte check does not fit",
                 "messages[0].regex: bad regular expression"):
        assert want in pr.stderr, (want, pr.stderr)


if __name__ == "__main__":
    main([test_nmea_lines_regex_csv_resync, test_every_framing_and_check, test_commands_replies_polling_c2d,
          test_port_vanishes_and_returns, test_port_claimed_twice_and_rs485, test_plugin, test_examples_and_errors])
