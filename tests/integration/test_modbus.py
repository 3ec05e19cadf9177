#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""The Modbus adapter end to end: the real fieldhubd polls a real Modbus slave on loopback
(tests/sim/modbus-sim, an implementation of the protocol independent of libmodbus and of the
adapter's codecs) over TCP, and over RTU through socat pty pairs with several unit ids on one
line. Checked from outside only: telemetry and its properties (fieldhubctl monitor-events),
the twin (fieldhubctl twin show), methods, the log, and what the slave saw (its request log).

The slave's test register map (holding registers unless noted):
  0 int16 -2 | 1 uint16 51234 | 2 0x0201 | 10.. int32 -123456789 in ABCD,BADC,CDAB,DCBA (2 each)
  20.. uint32 3000000000 (same orders) | 30.. float32 -1234.5 | 40.. int64 -1234567890123456789
  (4 each) | 56 uint64 18446744073709551000 ABCD | 60.. float64 pi | 80..85 "FIELDHUB-01"
  90 0xA005 (bits 0,2,13,15) | 91 1234 | coils 0..7 10110010 | discrete 0..3 0110
  input registers 0..9 = 1000+i."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
import time

sys.path.insert(0, os.path.dirname(__file__))
from fhlib import FIELDHUBCTL, FIELDHUBD, SRCDIR, Daemon, at_exit, config_text, ctl, main, pty_pair, tmpdir, write  # noqa: E402
from fhlib import telemetry_events as events, reported, wait_for  # noqa: E402

SIM = os.environ.get("FIELDHUB_MODBUS_SIM", "modbus-sim")


class Sim:
    """The slave simulator, stopped by pid."""

    def __init__(self, d, *args, name="sim"):
        self.log_path = os.path.join(d, name + ".log")
        self.ready = os.path.join(d, name + ".ready")
        open(self.log_path, "w").close()
        self.proc = subprocess.Popen([SIM, *args, "--log", self.log_path, "--ready", self.ready],
                                     stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, name + ".err"), "w"))
        at_exit(self.stop)
        end = time.monotonic() + 5
        while not os.path.exists(self.ready):
            assert self.proc.poll() is None, f"modbus-sim exited: {open(os.path.join(d, name + '.err')).read()}"
            assert time.monotonic() < end, "modbus-sim did not start"
            time.sleep(0.02)
        time.sleep(0.05)
        self.port = open(self.ready).read().strip()

    def requests(self):
        """[(t_us, unit, fc, addr, count, gap_us)]"""
        out = []
        for line in open(self.log_path):
            f = line.split()
            if len(f) == 7 and f[0] == "REQ":
                out.append(tuple(int(x) for x in f[1:]))
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(d, adapters_yaml, level="info"):
    cfg = write(os.path.join(d, "fieldhub.yaml"), config_text(d, extra="adapters:\n" + adapters_yaml, level=level))
    daemon = Daemon(cfg)
    daemon.wait_log(r"fieldhubd .* started")
    return daemon, cfg


TYPES_POINTS = """
          - {name: i16, table: holding_register, address: 0, type: int16}
          - {name: u16, table: holding_register, address: 1}
          - {name: i16_badc, table: holding_register, address: 2, type: int16, byte_order: BADC}
          - {name: i32_abcd, table: holding_register, address: 10, type: int32}
          - {name: i32_badc, table: holding_register, address: 12, type: int32, byte_order: BADC}
          - {name: i32_cdab, table: holding_register, address: 14, type: int32, byte_order: CDAB}
          - {name: i32_dcba, table: holding_register, address: 16, type: int32, byte_order: DCBA}
          - {name: u32_abcd, table: holding_register, address: 20, type: uint32}
          - {name: u32_dcba, table: holding_register, address: 26, type: uint32, byte_order: DCBA}
          - {name: f32_abcd, table: holding_register, address: 30, type: float32}
          - {name: f32_badc, table: holding_register, address: 32, type: float32, byte_order: BADC}
          - {name: f32_cdab, table: holding_register, address: 34, type: float32, byte_order: CDAB}
          - {name: f32_dcba, table: holding_register, address: 36, type: float32, byte_order: DCBA}
          - {name: i64_abcd, table: holding_register, address: 40, type: int64}
          - {name: i64_badc, table: holding_register, address: 44, type: int64, byte_order: BADC}
          - {name: i64_cdab, table: holding_register, address: 48, type: int64, byte_order: CDAB}
          - {name: i64_dcba, table: holding_register, address: 52, type: int64, byte_order: DCBA}
          - {name: u64, table: holding_register, address: 56, type: uint64}
          - {name: f64_abcd, table: holding_register, address: 60, type: float64}
          - {name: f64_dcba, table: holding_register, address: 72, type: float64, byte_order: DCBA}
          - {name: label, entity: "400081", type: string, length: 6}
          - {name: bit0, table: holding_register, address: 90, type: bit, bit: 0}
          - {name: bit1, table: holding_register, address: 90, type: bit, bit: 1}
          - {name: bit15, table: holding_register, address: 90, type: bit, bit: 15}
          - {name: scaled, table: holding_register, address: 91, scale: 0.1, offset: -3, unit: degC}
          - {name: coil0, table: coil, address: 0}
          - {name: coil1, table: coil, address: 1}
          - {name: coil3, table: coil, address: 3}
          - {name: di1, table: discrete_input, address: 1}
          - {name: ir9, entity: "300010"}
"""

EXPECTED = {
    "i16": -2, "u16": 51234, "i16_badc": 258,
    "i32_abcd": -123456789, "i32_badc": -123456789, "i32_cdab": -123456789, "i32_dcba": -123456789,
    "u32_abcd": 3000000000, "u32_dcba": 3000000000,
    "f32_abcd": -1234.5, "f32_badc": -1234.5, "f32_cdab": -1234.5, "f32_dcba": -1234.5,
    "i64_abcd": -1234567890123456789, "i64_badc": -1234567890123456789, "i64_cdab": -1234567890123456789,
    "i64_dcba": -1234567890123456789, "u64": 18446744073709551000,
    "f64_abcd": 3.141592653589793, "f64_dcba": 3.141592653589793,
    "label": "FIELDHUB-01", "bit0": True, "bit1": False, "bit15": True, "scaled": 120.4,
    "coil0": True, "coil1": False, "coil3": True, "di1": True, "ir9": 1009,
}


def test_tcp_every_type_and_coalescing():
    d = tmpdir()
    sim = Sim(d, "--tcp", "0")
    daemon, _ = start(d, f"""  - type: modbus
    name: plant
    devices:
      - name: types-1
        tcp: {{host: 127.0.0.1, port: {sim.port}}}
        unit: 7
        poll_interval: 500ms
        max_gap: 16
        points:{TYPES_POINTS}""")
    evs = events(d, "types-1", 3)
    assert len(evs) >= 2, evs
    payload, props = evs[-1]
    assert payload["unit"] == 7
    for k, v in EXPECTED.items():
        assert payload["values"][k] == v, f"{k}: {payload['values'][k]!r} != {v!r}"
        assert payload["quality"][k] == "good", (k, payload["quality"][k])
    assert props["application"] == {"adapter": "plant", "adapterType": "modbus", "pollGroup": "500ms"}, props
    assert props["system"]["content-type"] == "application/json"
    assert props["system"]["iothub-connection-device-id"] == "types-1"
    # The JSON number text is exact too (no 1.8446744073709552e19).
    raw = subprocess.run([FIELDHUBCTL, "--socket", os.path.join(d, "admin.sock"), "--json", "monitor-events",
                          "--device", "types-1", "--timeout", "1s"], capture_output=True, text=True, timeout=30).stdout
    assert 'u64\\":18446744073709551000,' in raw.replace(" ", ""), raw[:400]

    # Coalescing: holding 0..91 with gaps <= 16 is one FC3 of 92 registers; coils 0..3 one
    # FC1; discrete one FC2; input registers one FC4: four requests per cycle, whatever the
    # number of points.
    reqs = [r for r in sim.requests() if r[1] == 7]
    cycles = [r for r in reqs if r[2] == 3]
    assert cycles and all(r[3] == 0 and r[4] == 92 for r in cycles), cycles[:5]
    per_fc = {fc: sum(1 for r in reqs if r[2] == fc) for fc in (1, 2, 3, 4)}
    assert max(per_fc.values()) - min(per_fc.values()) <= 1, per_fc
    assert len(reqs) <= 4 * (per_fc[3] + 1), (len(reqs), per_fc)

    # The twin shows the adapter's view.
    rep = wait_for(lambda: reported(d, "types-1").get("modbus", {}).get("state") == "online"
                   and reported(d, "types-1"), what="reported state online")
    assert rep["modbus"]["pointsGood"] == len(EXPECTED), rep
    assert rep["modbus"].get("lastError") is None, rep   # null deletes it from the twin
    rc, _ = daemon.stop()
    assert rc == 0


def test_errors_reported_not_fatal():
    d = tmpdir()
    sim = Sim(d, "--tcp", "0", "--units", "1,2,4", "--dead", "2", "--exception-addr", "5", "--garbage", "4")
    daemon, _ = start(d, f"""  - type: modbus
    name: plant
    devices:
      - name: exc-1
        tcp: {{host: 127.0.0.1, port: {sim.port}}}
        unit: 1
        poll_interval: 300ms
        max_gap: 0
        points:
          - {{name: good, table: holding_register, address: 0, type: int16}}
          - {{name: bad, table: holding_register, address: 5}}
      - name: dead-2
        tcp: {{host: 127.0.0.1, port: {sim.port}}}
        unit: 2
        timeout: 200ms
        poll_interval: 300ms
        backoff: {{min: 1s, max: 4s}}
        points: [{{name: x, table: holding_register, address: 0}}]
      - name: garbage-4
        tcp: {{host: 127.0.0.1, port: {sim.port}}}
        unit: 4
        timeout: 200ms
        poll_interval: 300ms
        points: [{{name: x, table: holding_register, address: 0}}]
      - name: refused-3
        tcp: {{host: 127.0.0.1, port: 1}}
        backoff: {{min: 200ms, max: 1s}}
        points: [{{name: x, table: holding_register, address: 0}}]
""")
    evs = events(d, "exc-1", 2)
    assert evs, "no telemetry from exc-1"
    payload, _ = evs[-1]
    assert payload["values"] == {"good": -2}, payload
    assert payload["quality"]["good"] == "good"
    assert payload["quality"]["bad"] == "exception 2 (ILLEGAL DATA ADDRESS)", payload
    daemon.wait_log(r"Reading holding_register 5\.\.5 \(point bad\) from unit 1 failed: exception 2 \(ILLEGAL DATA ADDRESS\)")
    rep = wait_for(lambda: reported(d, "exc-1")["modbus"]["lastError"], what="lastError in the twin")
    assert rep == "exception 2 (ILLEGAL DATA ADDRESS)", rep
    # Logged once, not every cycle.
    time.sleep(1)
    assert daemon.log().count("(point bad) from unit 1 failed") == 1, daemon.log()

    daemon.wait_log(r"Unit 2 on tcp:127\.0\.0\.1:\d+ does not answer \(timeout\); backing off")
    daemon.wait_log(r"Adapter device dead-2 is offline: timeout")
    assert wait_for(lambda: reported(d, "dead-2")["modbus"]["state"] == "offline", what="dead-2 offline in twin")
    daemon.wait_log(r"Adapter device garbage-4 is offline: timeout")
    daemon.wait_log(r"Adapter device refused-3 is offline: cannot connect to 127\.0\.0\.1:1: Connection refused")
    assert wait_for(lambda: reported(d, "refused-3")["modbus"]["state"] == "offline", what="refused-3 offline")
    # Backoff: the dead unit costs one timeout per window (1s, 2s, 4s...), the others poll on.
    t0 = time.monotonic()
    n0 = len([r for r in sim.requests() if r[1] == 2])
    time.sleep(3.5)
    n_dead = len([r for r in sim.requests() if r[1] == 2]) - n0
    assert n_dead <= 3, f"{n_dead} requests to the dead unit in {time.monotonic() - t0:.1f}s"
    good = [r for r in sim.requests() if r[1] == 1 and r[3] == 0]
    assert len(good) >= 8, len(good)
    assert daemon.alive()
    rc, _ = daemon.stop()
    assert rc == 0


def test_writes_methods_profiles():
    d = tmpdir()
    sim = Sim(d, "--tcp", "0")
    daemon, _ = start(d, f"""  - type: modbus
    name: plant
    profiles:
      meter:
        byte_order: CDAB
        points:
          - {{name: setpoint, table: holding_register, address: 100, type: int32, writable: true}}
          - {{name: limit, table: holding_register, address: 102, type: uint16, scale: 0.5, writable: true}}
          - {{name: flag, table: holding_register, address: 103, type: bit, bit: 3, writable: true}}
          - {{name: relay, table: coil, address: 20, writable: true}}
          - {{name: ro, table: holding_register, address: 0, type: int16}}
    devices:
      - {{name: meter-a, tcp: {{host: 127.0.0.1, port: {sim.port}}}, unit: 1, profile: meter, poll_interval: 300ms}}
      - {{name: meter-b, tcp: {{host: 127.0.0.1, port: {sim.port}}}, unit: 2, profile: meter, poll_interval: 300ms}}
""")
    # Profiles: both devices poll the same map.
    for dev in ("meter-a", "meter-b"):
        evs = events(d, dev, 2)
        assert evs and evs[-1][0]["values"]["ro"] == -2, evs

    # A direct method write lands in the slave (FC16, CDAB) and answers the read-back.
    p = ctl(d, "--json", "method", "invoke", "meter-a", "write", "--payload", '{"point":"setpoint","value":-70000}')
    res = json.loads(p.stdout)
    assert res["status"] == 200 and res["payload"] == {"point": "setpoint", "value": -70000}, res
    p = ctl(d, "--json", "method", "invoke", "meter-a", "read", "--payload",
            '{"table":"holding_register","address":100,"count":2}')
    res = json.loads(p.stdout)
    assert res["payload"]["values"] == [0xEE90, 0xFFFE], res     # low word first
    assert any(r[1] == 1 and r[2] == 16 and r[3] == 100 and r[4] == 2 for r in sim.requests())

    # Desired properties write (FC6 for one register, scale undone; FC5 for a coil; a bit by
    # read-modify-write) and the reported properties follow from the read-back.
    ctl(d, "twin", "update", "meter-b", "--desired", '{"limit": 21.5, "relay": true, "flag": true, "setpoint": 7}')
    rep = wait_for(lambda: (lambda r: r if r.get("limit") == 21.5 and r.get("relay") is True and r.get("flag") is True
                            and r.get("setpoint") == 7 else None)(reported(d, "meter-b")),
                   what="reported read-back of the desired writes")
    reqs = sim.requests()
    assert any(r[1] == 2 and r[2] == 6 and r[3] == 102 for r in reqs), "no FC6 to limit"
    assert any(r[1] == 2 and r[2] == 5 and r[3] == 20 for r in reqs), "no FC5 to relay"
    res = json.loads(ctl(d, "--json", "method", "invoke", "meter-b", "read", "--payload",
                         '{"table":"holding_register","address":102,"count":2}').stdout)
    assert res["payload"]["values"] == [43, 8], res          # 21.5 / 0.5; bit 3

    # Operators get clear errors.
    res = json.loads(ctl(d, "--json", "method", "invoke", "meter-a", "write", "--payload",
                         '{"point":"ro","value":1}').stdout)
    assert res["status"] == 403, res
    res = json.loads(ctl(d, "--json", "method", "invoke", "meter-a", "write", "--payload",
                         '{"point":"setpoint","value":1e12}').stdout)
    assert res["status"] == 400 and "out of range" in res["payload"]["error"], res
    res = json.loads(ctl(d, "--json", "method", "invoke", "meter-a", "reboot").stdout)
    assert res["status"] == 501, res
    res = json.loads(ctl(d, "--json", "method", "invoke", "meter-a", "read", "--payload",
                         '{"table":"holding_register","address":65535,"count":2}').stdout)
    assert res["status"] == 400, res
    assert daemon.alive()
    rc, _ = daemon.stop()
    assert rc == 0


def test_reload_one_device():
    d = tmpdir()
    sim = Sim(d, "--tcp", "0")
    dev = """      - name: {name}
        tcp: {{host: 127.0.0.1, port: {port}}}
        unit: {unit}
        poll_interval: {iv}
        points: [{{name: x, table: holding_register, address: {addr}}}]
"""

    def conf(a_iv, a_addr):
        return ("  - type: modbus\n    name: plant\n    devices:\n"
                + dev.format(name="steady", port=sim.port, unit=1, iv="200ms", addr=0)
                + dev.format(name="changing", port=sim.port, unit=2, iv=a_iv, addr=a_addr))
    daemon, cfg = start(d, conf("200ms", 1))
    time.sleep(1.5)
    write(cfg, config_text(d, extra="adapters:\n" + conf("400ms", 91)))
    t_reload = time.time()
    daemon.signal(signal.SIGHUP)
    daemon.wait_log(r"Configuration reloaded")
    daemon.wait_log(r"Device configuration changed, restarting its polling")
    time.sleep(2)
    reqs = sim.requests()
    steady = [r[0] for r in reqs if r[1] == 1]
    gaps = [(b - a) / 1e6 for a, b in zip(steady, steady[1:])]
    assert len(steady) >= 15 and max(gaps) < 0.3, f"steady device disturbed: max gap {max(gaps):.3f}s"
    changed = [r for r in reqs if r[1] == 2]
    assert changed[-1][3] == 91, changed[-3:]                  # the new point map is polled
    assert "Device identity" not in daemon.log().split("Configuration reloaded")[1]
    assert daemon.log().count("Adapter device steady is online") == 1
    rc, _ = daemon.stop()
    assert rc == 0
    _ = t_reload


def test_rtu_shared_bus_and_dead_slave():
    d = tmpdir()
    gw, slave = pty_pair(d, "bus")
    sim = Sim(d, "--rtu", slave, "--baud", "19200", "--units", "1,2,3", "--dead", "3", "--pace")
    daemon, _ = start(d, f"""  - type: modbus
    name: field
    devices:
""" + "".join(f"""      - name: rtu-{u}
        rtu: {{device: {gw}, baud: 19200, parity: even, turnaround: 2ms}}
        unit: {u}
        timeout: 1s
        poll_interval: 250ms
        backoff: {{min: 1s, max: 8s}}
        points:
          - {{name: i32, table: holding_register, address: 14, type: int32, byte_order: CDAB}}
          - {{name: f64, table: holding_register, address: 60, type: float64}}
""" for u in (1, 2, 3)))
    for u in (1, 2):
        evs = events(d, f"rtu-{u}", 3)
        assert evs and evs[-1][0]["values"] == {"i32": -123456789, "f64": 3.141592653589793}, evs
    daemon.wait_log(r"Adapter device rtu-3 is offline: timeout")
    time.sleep(3)
    reqs = sim.requests()
    # (The timeout is generous so that a loaded test machine never turns a slow answer into a
    # late one, which would collide with the next request as it would on a real bus.)
    # One transaction at a time with the inter-frame silence (3.5 characters at 19200 =
    # 2.0 ms) plus the 2 ms turnaround before every request that follows a response.
    gaps = [r[5] for r in reqs if r[5] > 0]
    assert gaps and min(gaps) >= 3500, f"silence violated: min gap {min(gaps)} us"
    # The dead slave costs one timeout per backoff window: over ~4 s at most 4 attempts,
    # while the live ones keep their 250 ms cycle.
    dead = [r for r in reqs if r[1] == 3]
    assert 1 <= len(dead) <= 4, len(dead)
    for u in (1, 2):
        t = [r[0] for r in reqs if r[1] == u]
        gaps = [(b - a) / 1e6 for a, b in zip(t, t[1:])]
        assert max(gaps) < 0.25 + 1.0 + 0.1, f"unit {u} delayed beyond one timeout: {max(gaps):.3f}s"
    rc, _ = daemon.stop()
    assert rc == 0


def test_rtu_garbage_and_wrong_unit():
    d = tmpdir()
    gw, slave = pty_pair(d, "g")
    Sim(d, "--rtu", slave, "--baud", "38400", "--units", "1,4,5", "--wrong-unit", "4", "--garbage", "5")
    daemon, _ = start(d, "  - type: modbus\n    name: field\n    devices:\n" + "".join(f"""      - name: rtu-{u}
        rtu: {{device: {gw}, baud: 38400, parity: none, stop_bits: 2}}
        unit: {u}
        timeout: 200ms
        poll_interval: 200ms
        points: [{{name: x, table: holding_register, address: 1}}]
""" for u in (1, 4, 5)))
    daemon.wait_log(r"Adapter device rtu-5 is offline: CRC error")
    daemon.wait_log(r"Adapter device rtu-4 is offline: (response from the wrong unit|timeout)")
    evs = events(d, "rtu-1", 3)
    assert evs and evs[-1][0]["values"] == {"x": 51234}, evs
    assert wait_for(lambda: reported(d, "rtu-5")["modbus"]["lastError"] == "CRC error", what="CRC error in the twin")
    assert daemon.alive()
    rc, _ = daemon.stop()
    assert rc == 0


def test_rtu_port_errors():
    d = tmpdir()
    gw, slave = pty_pair(d, "a")
    gw2, _ = pty_pair(d, "b")
    sim = Sim(d, "--rtu", slave, "--baud", "9600")
    # Another process holds port b exclusively.
    fd = os.open(gw2, os.O_RDWR | os.O_NOCTTY)
    at_exit(lambda: os.close(fd))
    fcntl.ioctl(fd, termios.TIOCEXCL)
    daemon, _ = start(d, f"""  - type: modbus
    name: one
    devices:
      - name: rs485-dev
        rtu: {{device: {gw}, baud: 9600, rs485: true}}
        points: [{{name: x, table: holding_register, address: 0}}]
      - name: taken-dev
        rtu: {{device: {gw2}, baud: 9600}}
        points: [{{name: x, table: holding_register, address: 0}}]
  - type: modbus
    name: two
    devices:
      - name: dup-dev
        rtu: {{device: {gw}, baud: 9600}}
        points: [{{name: x, table: holding_register, address: 0}}]
""")
    # RS-485 mode on a pseudo-terminal: ENOTTY, explained.
    daemon.wait_log(r"serial port .*a-gw does not support RS-485 mode \(TIOCSRS485: Inappropriate ioctl for device\)")
    # State and error text arrive in the twin together or in successive patches: wait for both.
    assert wait_for(lambda: (lambda m: m.get("state") == "error" and "RS-485" in (m.get("lastError") or ""))(
        reported(d, "rs485-dev")["modbus"]), what="rs485-dev error naming RS-485")
    daemon.wait_log(r"serial port .*b-gw is taken: another process holds it exclusively \(TIOCEXCL\)")
    # One owner per port across adapters (adapter "one" claimed it first).
    daemon.wait_log(r"serial port .*a-gw is already owned by adapter \"one\"")
    assert daemon.alive()
    assert not sim.requests()
    rc, _ = daemon.stop()
    assert rc == 0


def test_check_config_errors():
    d = tmpdir()
    cfg = write(os.path.join(d, "bad.yaml"), config_text(d, extra="""adapters:
  - type: modbus
    name: plant
    devices:
      - name: m1
        tcp: {host: 127.0.0.1}
        points:
          - {name: v, table: holding_register, address: 0, type: float33}
"""))
    p = subprocess.run([FIELDHUBD, "--check-config", "--config", cfg], capture_output=True, text=True, timeout=30)
    assert p.returncode == 78, p
    line = open(cfg).read().splitlines().index("          - {name: v, table: holding_register, address: 0, type: float33}") + 1
    assert f"{cfg}:{line}:" in p.stderr and "adapters[0].devices[0].points[0].type" in p.stderr \
        and "float33" in p.stderr, p.stderr
    # The shipped examples and the demo are valid.
    for f in ("configs/examples/modbus.yaml", "configs/demo.yaml"):
        p = subprocess.run([FIELDHUBD, "--check-config", "--config", os.path.join(SRCDIR, f)], capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 0, (f, p.stderr)


if __name__ == "__main__":
    main([test_tcp_every_type_and_coalescing, test_errors_reported_not_fatal, test_writes_methods_profiles,
          test_reload_one_device, test_rtu_shared_bus_and_dead_slave, test_rtu_garbage_and_wrong_unit,
          test_rtu_port_errors,
          test_check_config_errors])
