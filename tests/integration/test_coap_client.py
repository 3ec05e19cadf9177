#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""CoAP client mode (adapters/coap/): fieldhubd polls and observes libcoap's
coap-server-openssl as the field device, over plain UDP and DTLS-PSK, maps raw / JSON / CBOR
payloads into points, and writes desired properties and method calls back as PUTs."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from fhlib import FIELDHUBCTL, Daemon, Skip, at_exit, config_text, ctl, main, tmpdir, write  # noqa: E402

SERVER = shutil.which("coap-server-openssl")
CLIENT = shutil.which("coap-client-openssl")
PSK = "field-secret-42"


def free_port_pair():
    """A UDP port p with p+1 free too (coap-server-openssl serves coaps on port + 1)."""
    for _ in range(50):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        if p % 2 or p > 65000:
            continue
        try:
            t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            t.bind(("127.0.0.1", p + 1))
            t.close()
            return p
        except OSError:
            continue
    raise AssertionError("no free UDP port pair")


class Device:
    """coap-server-openssl with dynamic resources (PUT creates them), plain UDP and DTLS-PSK."""

    def __init__(self, d):
        if not SERVER or not CLIENT:
            raise Skip("libcoap3-bin (coap-server-openssl, coap-client-openssl) is not installed")
        self.port = free_port_pair()
        self.logf = open(os.path.join(d, "coap-server.log"), "wb")
        self.proc = subprocess.Popen([SERVER, "-A", "127.0.0.1", "-p", str(self.port), "-d", "20", "-k", PSK, "-v", "3"],
                                     stdout=self.logf, stderr=subprocess.STDOUT)
        at_exit(self.stop)
        time.sleep(0.3)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        self.logf.close()

    def put(self, path, data, fmt):
        with open("/tmp/.fieldhub-coap-put", "wb") as f:
            f.write(data)
        p = subprocess.run([CLIENT, "-m", "put", "-f", "/tmp/.fieldhub-coap-put", "-t", str(fmt), "-B", "3",
                            f"coap://127.0.0.1:{self.port}/{path}"], capture_output=True, timeout=20)
        assert p.returncode == 0, p.stderr

    def get(self, path):
        p = subprocess.run([CLIENT, "-m", "get", "-B", "3", f"coap://127.0.0.1:{self.port}/{path}"],
                           capture_output=True, timeout=20)
        return p.stdout[:-1] if p.stdout.endswith(b"\n") else p.stdout  # coap-client ends the body with a newline


def monitor(d, device):
    args = [FIELDHUBCTL, "--socket", os.path.join(d, "admin.sock"), "--json", "monitor-events", "--properties",
            "--device", device]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []

    def rd():
        for line in p.stdout:
            lines.append(json.loads(line)["event"])
    threading.Thread(target=rd, daemon=True).start()

    def stop():
        if p.poll() is None:
            p.terminate()
            p.wait()
    at_exit(stop)
    return lines


def wait_for(fn, timeout=10, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = fn()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def readings(events, resource):
    return [e["payload"] for e in events
            if e["properties"]["system"].get("iothub-message-source") == "Telemetry"
            and e["properties"]["application"].get("coap-resource") == resource]


def test_poll_observe_and_writes():
    d = tmpdir()
    dev = Device(d)
    dev.put("sensors/data", b'{"temp":21.5,"hum":{"rel":40},"list":[1,2]}', 50)
    # CBOR {"p": 1013, "ok": true}
    dev.put("sensors/cbor", bytes([0xa2, 0x61, ord("p"), 0x19, 0x03, 0xf5, 0x62, ord("o"), ord("k"), 0xf5]), 60)
    dev.put("sensors/raw", b"17.25", 0)
    write(f"{d}/dev.psk", PSK + "\n")
    cfg = write(f"{d}/fieldhub.yaml", config_text(d, extra=f"""adapters:
  - type: coap
    name: field-coap
    devices:
      - id: coap-dev
        uri: coap://127.0.0.1:{dev.port}
        resources:
          - path: sensors/data
            interval: 500ms
            format: json
            points:
              - {{name: temperature, path: temp}}
              - {{name: humidity, path: hum.rel}}
              - {{name: second, path: list.1}}
          - path: sensors/cbor
            interval: 500ms
            format: cbor
            points: [{{name: pressure, path: p}}, {{name: ok, path: ok}}]
          - path: sensors/raw
            interval: 500ms
            format: raw
          - path: time
            mode: observe
            format: raw
            points: [{{name: clock}}]
        writes:
          - {{property: setpoint, path: actuators/setpoint, method: put, format: raw}}
          - {{property: config, path: actuators/config, method: put, format: cbor}}
        methods:
          - {{name: reboot, path: actuators/reboot, method: put, format: json}}
      - id: coap-secure
        uri: coaps://127.0.0.1:{dev.port + 1}
        psk_identity: fieldhub
        psk_key_file: {d}/dev.psk
        resources:
          - path: sensors/data
            interval: 500ms
            points: [{{name: t, path: temp}}]
"""))
    daemon = Daemon(cfg)
    daemon.wait_log(r"Admin socket listening")
    try:
        check_device(d, dev, daemon)
    except AssertionError:
        print(daemon.log()[-5000:], file=sys.stderr)
        raise
    rc, _ = daemon.stop()
    log = daemon.log()
    assert "Sanitizer" not in log and "runtime error" not in log, log[-4000:]
    assert rc == 0, log[-3000:]


def check_device(d, dev, daemon):
    events = monitor(d, "coap-dev")
    sec = monitor(d, "coap-secure")
    # Polling: every format mapped into points.
    wait_for(lambda: readings(events, "sensors/data") and readings(events, "sensors/cbor") and
             readings(events, "sensors/raw"), what="readings of the three polled resources")
    assert readings(events, "sensors/data")[0] == {"temperature": 21.5, "humidity": 40, "second": 2}
    assert readings(events, "sensors/cbor")[0] == {"pressure": 1013, "ok": True}
    assert readings(events, "sensors/raw")[0] == {"raw": 17.25}
    # A changed value is seen on the next poll.
    dev.put("sensors/data", b'{"temp":23.0,"hum":{"rel":41},"list":[1,3]}', 50)
    wait_for(lambda: {"temperature": 23.0, "humidity": 41, "second": 3} in readings(events, "sensors/data"),
             what="the new reading")
    # Observe: /time notifies once a second.
    wait_for(lambda: len(readings(events, "time")) >= 3, timeout=8, what="3 notifications of /time")
    assert all(re.match(r"\w{3} +\d+ \d\d:\d\d:\d\d", r["clock"]) for r in readings(events, "time"))
    # DTLS-PSK toward the device.
    wait_for(lambda: readings(sec, "sensors/data"), what="a reading over DTLS")
    assert readings(sec, "sensors/data")[0]["t"] in (21.5, 23.0)
    # Writes: a desired patch becomes PUTs (raw text and CBOR), a method a PUT of its JSON payload.
    ctl(d, "twin", "update", "coap-dev", "--desired", '{"setpoint":22.5,"config":{"mode":"eco"},"unmapped":1}')
    wait_for(lambda: dev.get("actuators/setpoint") == b"22.5", what="the setpoint PUT")
    wait_for(lambda: dev.get("actuators/config") == bytes([0xa1, 0x64]) + b"mode" + bytes([0x63]) + b"eco",
             what="the CBOR config PUT")
    p = ctl(d, "--json", "method", "invoke", "coap-dev", "reboot", "--payload", '{"delay":5}', "--timeout", "10s")
    assert json.loads(p.stdout)["status"] == 200, p.stdout
    assert json.loads(dev.get("actuators/reboot")) == {"delay": 5}
    p = ctl(d, "--json", "method", "invoke", "coap-dev", "nope", "--timeout", "5s")
    assert json.loads(p.stdout)["status"] == 501, p.stdout  # not mapped to a resource
    # The device goes away: reported offline; back: readings resume.
    dev.stop()
    daemon.wait_log(r"no answer \(timeout\)|coap-dev.*offline", timeout=30)


def test_config_errors():
    d = tmpdir()
    cfg = write(f"{d}/bad.yaml", config_text(d, extra="""adapters:
  - type: coap
    name: c
    devices:
      - id: a
        uri: http://127.0.0.1:5683
        resources:
          - {path: /abs, mode: sometimes, format: xml}
          - path: ok
            format: raw
            points: [{name: x}, {name: y}]
      - id: a
        uri: coaps://127.0.0.1:5684
        resources:
          - path: s
            points: [{name: x, path: "a..b"}]
"""))
    p = subprocess.run([os.environ.get("FIELDHUBD", "fieldhubd"), "--check-config", "--config", cfg],
                       capture_output=True, text=True)
    err = p.stdout + p.stderr
    assert p.returncode != 0, err
    for needle in ["expected coap://IP[:port]", "expected a resource path", "sometimes", "xml",
                   "expected one (the whole payload is one value)", "duplicate device id \"a\"",
                   "expected both for DTLS-PSK", "separated by '.'"]:
        assert needle in err, (needle, err)


if __name__ == "__main__":
    main([test_poll_observe_and_writes, test_config_errors])
