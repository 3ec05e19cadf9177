#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""CoAP server mode (gateway/front/coap.c) against the real fieldhubd, with libcoap's
coap-client-openssl over plain UDP and DTLS-PSK, and hand-built datagrams for duplicates and
bad input. What is checked is visible from outside: the events stream (fieldhubctl
monitor-events), the admin socket (C2D, twins, methods), the log."""

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from fhlib import FIELDHUBCTL, Daemon, Skip, config_text, ctl, main, tmpdir, write  # noqa: E402

CLIENT = shutil.which("coap-client-openssl")
LABEL = b"fieldhub-coap-psk"


def psk_of(key):
    return hmac.new(base64.b64decode(key), LABEL, hashlib.sha256).digest()


class Hub:
    def __init__(self, extra_coap=""):
        if not CLIENT:
            raise Skip("coap-client-openssl (libcoap3-bin) is not installed")
        self.d = tmpdir()
        text = config_text(self.d, extra=f"""coap:
  listen: ["127.0.0.1:0"]
  dtls_listen: ["127.0.0.1:0"]
  plaintext_devices: [plain1, plain2]
  limits:
    session_timeout: 30s
    max_message_bytes: 64KiB
    max_requests_per_second: 50
{extra_coap}""")
        self.cfg = write(f"{self.d}/fieldhub.yaml", text)
        self.daemon = Daemon(self.cfg)
        self.daemon.wait_log(r"Admin socket listening")
        log = self.daemon.log()
        self.udp = int(re.search(r"CoAP listening on \S+ \(port (\d+), UDP\)", log).group(1))
        self.dtls = int(re.search(r"CoAP listening on \S+ \(port (\d+), DTLS\)", log).group(1))

    def ctl(self, *args, check=True):
        return ctl(self.d, *args, check=check)

    def device(self, dev_id):
        """Creates a SAS device; returns (primary, secondary) keys, regenerated until neither PSK
        holds a NUL byte (coap-client takes the key as a C string)."""
        self.ctl("device", "create", dev_id)
        for _ in range(50):
            p = self.ctl("--json", "device", "show", dev_id)
            keys = json.loads(p.stdout)["authentication"]["symmetricKey"]
            k1, k2 = keys["primaryKey"], keys["secondaryKey"]
            bad = [w for w, k in (("primary", k1), ("secondary", k2)) if b"\0" in psk_of(k)]
            if not bad:
                return k1, k2
            self.ctl("device", "regenerate-key", dev_id, "--key", bad[0])
        raise AssertionError("no NUL-free PSK after 50 keys")

    def finish(self):
        rc, _ = self.daemon.stop()
        log = self.daemon.log()
        assert "Sanitizer" not in log and "runtime error" not in log, log[-4000:]
        assert rc == 0, f"fieldhubd exited {rc}:\n{log[-3000:]}"


def unescape(s):
    return re.sub(r"\\x([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), s)


class Result:
    def __init__(self, p):
        self.rc = p.returncode
        out = p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")
        self.pdus = [unescape(line) for line in out.splitlines() if line.startswith("v:1 ")]
        # Responses: what the server sent (not our own request or ACKs of ours).
        self.responses = [x for x in self.pdus if re.search(r" c:[2-5]\.\d\d ", x)]
        self.out = out

    def code(self, i=-1):
        return re.search(r" c:(\d\.\d\d) ", self.responses[i]).group(1) if self.responses else None

    def option(self, num, i=-1):
        m = re.search(rf"\b{num}:([^,\]]*?)(?:, \d+:|, [A-Z][A-Za-z-]+:| \])", self.responses[i]) if self.responses else None
        return m.group(1) if m else None

    def payload(self, i=-1):
        m = re.search(r" :: '(.*)'$", self.responses[i], re.S) if self.responses else None
        return m.group(1) if m else ""


def coap(hub, method, path, *args, dev=None, psk=None, secure=False, wait=3, extra=()):
    """One coap-client-openssl exchange; returns a Result."""
    port = hub.dtls if secure else hub.udp
    url = f"coap{'s' if secure else ''}://127.0.0.1:{port}/{path}"
    argv = [CLIENT.encode(), b"-v", b"7", b"-B", str(wait).encode(), b"-m", method.encode()]
    if secure:
        argv += [b"-u", dev.encode(), b"-k", psk]
    argv += [a if isinstance(a, bytes) else str(a).encode() for a in list(args) + list(extra)] + [url.encode()]
    return Result(subprocess.run(argv, capture_output=True, timeout=wait + 30))


def monitor(hub, device=None):
    args = [FIELDHUBCTL, "--socket", os.path.join(hub.d, "admin.sock"), "--json", "monitor-events", "--properties"]
    if device:
        args += ["--device", device]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []

    def rd():
        for line in p.stdout:
            lines.append(json.loads(line)["event"])
    threading.Thread(target=rd, daemon=True).start()
    time.sleep(0.5)

    def stop():
        if p.poll() is None:
            p.terminate()
            p.wait()
    from fhlib import at_exit
    at_exit(stop)
    return lines


def telemetry(events):
    return [e for e in events if e["properties"]["system"].get("iothub-message-source") == "Telemetry"]


def wait_for(fn, timeout=10, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = fn()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---- hand-built datagrams ---------------------------------------------------------------------


def pdu(code, mid, token=b"\x42", typ=0, options=(), payload=b""):
    """code as (class, detail); options as [(number, bytes)] in increasing order."""
    out = bytes([0x40 | (typ << 4) | len(token), (code[0] << 5) | code[1]]) + struct.pack(">H", mid) + token
    last = 0
    for num, val in options:
        delta, length = num - last, len(val)
        last = num

        def nib(v):
            if v < 13:
                return v, b""
            if v < 269:
                return 13, bytes([v - 13])
            return 14, struct.pack(">H", v - 269)
        dn, dx = nib(delta)
        ln, lx = nib(length)
        out += bytes([(dn << 4) | ln]) + dx + lx + val
    if payload:
        out += b"\xff" + payload
    return out


def path_opts(path):
    return [(11, seg.encode()) for seg in path.split("/")]


def udp_exchange(port, data, wait=2.0, count=1):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(wait)
    s.connect(("127.0.0.1", port))
    s.send(data)
    got = []
    try:
        while len(got) < count:
            got.append(s.recv(70000))
    except socket.timeout:
        pass
    return s, got


def parse_code(d):
    return f"{d[1] >> 5}.{d[1] & 31:02d}", (d[0] >> 4) & 3


# ---- tests ---------------------------------------------------------------------------------------


def test_telemetry_udp_and_dtls():
    hub = Hub()
    key, key2 = hub.device("dev1")
    hub.device("plain1")
    events = monitor(hub)
    # Plain UDP, CON: empty ACK first, separate 2.04 once durable.
    r = coap(hub, "post", "d/plain1/telemetry?a=b&$.mid=m-1", "-e", '{"t":21.5}', "-t", "50")
    assert r.code() == "2.04", r.out
    assert any(" t:ACK c:0.00 " in x for x in r.pdus), r.pdus  # the empty ACK
    assert re.search(r" t:CON c:2\.04 ", r.responses[-1]), r.responses  # the separate response
    # NON: answered with a NON 2.04.
    r = coap(hub, "post", "d/plain1/telemetry", "-N", "-e", "non")
    assert r.code() == "2.04", r.out
    # DTLS-PSK with the primary and the secondary identity.
    r = coap(hub, "post", "d/dev1/telemetry?x=1", "-e", "hello", secure=True, dev="dev1", psk=psk_of(key))
    assert r.code() == "2.04", r.out
    r = coap(hub, "post", "d/dev1/telemetry", "-e", "second", secure=True, dev="dev1#2", psk=psk_of(key2))
    assert r.code() == "2.04", r.out
    tel = wait_for(lambda: len(telemetry(events)) >= 4 and telemetry(events), what="4 telemetry events")
    e0 = tel[0]
    s = e0["properties"]["system"]
    assert e0["payload"] == {"t": 21.5} and s["content-type"] == "application/json" and s["message-id"] == "m-1", e0
    assert e0["properties"]["application"] == {"a": "b"}
    assert s["iothub-connection-device-id"] == "plain1"
    assert json.loads(s["iothub-connection-auth-method"])["type"] == "none"
    assert tel[1]["payload"] == "non"
    assert tel[2]["payload"] == "hello" and tel[2]["properties"]["application"] == {"x": "1"}
    assert json.loads(tel[2]["properties"]["system"]["iothub-connection-auth-method"])["type"] == "sas"
    assert tel[3]["payload"] == "second"
    # fieldhubctl prints the same PSK.
    p = hub.ctl("--json", "device", "show-coap-psk", "dev1")
    assert json.loads(p.stdout) == {"identity": "dev1", "pskHex": psk_of(key).hex()}
    p = hub.ctl("device", "show-coap-psk", "dev1", "--secondary")
    assert f"identity: dev1#2\npsk: {psk_of(key2).hex()}" in p.stdout
    # Another device's resource: 4.03; a DTLS-only device over plain UDP: 4.01.
    r = coap(hub, "post", "d/plain1/telemetry", "-e", "x", secure=True, dev="dev1", psk=psk_of(key))
    assert r.code() == "4.03", r.out
    r = coap(hub, "post", "d/dev1/telemetry", "-e", "x")
    assert r.code() == "4.01", r.out
    hub.finish()


def test_bad_credentials_and_input():
    hub = Hub()
    key, _ = hub.device("dev1")
    # Unknown identity, wrong key: the handshake fails, the reason is logged.
    r = coap(hub, "post", "d/dev1/telemetry", "-e", "x", secure=True, dev="ghost", psk=b"whatever", wait=2)
    assert r.code() is None, r.out
    hub.daemon.wait_log(r'DTLS handshake of identity "ghost" refused: unknown PSK identity')
    r = coap(hub, "post", "d/dev1/telemetry", "-e", "x", secure=True, dev="dev1", psk=b"wrong-key", wait=2)
    assert r.code() is None, r.out
    hub.daemon.wait_log(r'DTLS handshake of identity "dev1" failed \(wrong key\?\)')
    # Malformed datagrams and an unknown critical option: the right answer or none; the daemon lives on.
    hub.device("plain1")
    s, got = udp_exchange(hub.udp, b"\x40\x01", wait=0.5)  # truncated header
    s, got = udp_exchange(hub.udp, b"\x4f\x01\x00\x01" + b"x" * 3, wait=0.5)  # token length 15
    s, got = udp_exchange(hub.udp, pdu((0, 2), 0x1234, options=path_opts("d/plain1/telemetry") + [(2049, b"x")],
                                       payload=b"p"))
    assert got and parse_code(got[0])[0] == "4.02", got  # Bad Option (RFC 7252 5.4.1)
    # Oversize block-wise transfer: 4.13 with Size1.
    big = os.path.join(hub.d, "big.bin")
    with open(big, "wb") as f:
        f.write(b"A" * (70 * 1024))
    r = coap(hub, "post", "d/plain1/telemetry", "-f", big, "-b", "1024", wait=10)
    assert r.code() == "4.13", r.out
    hub.daemon.wait_log(r"more than the limit of 65536; answering 4.13")
    # A flood from one address: 5.03 with Max-Age, logged; other devices unaffected.
    codes = []
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect(("127.0.0.1", hub.udp))
    for i in range(120):
        s.send(pdu((0, 1), 0x2000 + i, token=struct.pack(">H", i), typ=1, options=path_opts("d/plain1/twin")))
    s.settimeout(0.5)
    try:
        while True:
            codes.append(parse_code(s.recv(70000))[0])
    except socket.timeout:
        pass
    assert "5.03" in codes and "2.05" in codes, codes
    hub.daemon.wait_log(r"more than 50 requests/s from this address; answering 5.03")
    time.sleep(1.2)
    r = coap(hub, "post", "d/dev1/telemetry", "-e", "still-fine", secure=True, dev="dev1", psk=psk_of(key))
    assert r.code() == "2.04", r.out
    assert hub.daemon.alive()
    hub.finish()


def test_duplicates_stored_once():
    hub = Hub()
    hub.device("plain1")
    events = monitor(hub, "plain1")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect(("127.0.0.1", hub.udp))
    con = pdu((0, 2), 0x5151, token=b"\x01\x02", options=path_opts("d/plain1/telemetry"), payload=b"dup-con")
    s.send(con)
    s.send(con)  # a retransmission while the first copy is being stored
    time.sleep(0.5)
    s.send(con)  # and one after it is stored
    non = pdu((0, 2), 0x5152, token=b"\x03", typ=1, options=path_opts("d/plain1/telemetry"), payload=b"dup-non")
    s.send(non)
    s.send(non)
    got = []
    s.settimeout(1.5)
    try:
        while True:
            got.append(s.recv(65536))
    except socket.timeout:
        pass
    codes = [parse_code(d) for d in got]
    assert ("2.04", 0) in codes or ("2.04", 2) in codes, codes
    time.sleep(1)
    tel = telemetry(events)
    assert [e["payload"] for e in tel] == ["dup-con", "dup-non"], tel
    hub.finish()


def test_separate_answer_without_command():
    """Once a device has no command waiting (its first POST of the session looked), its POSTs
    are answered straight from the store's completion: an empty ACK at once, then a CON 2.04
    (NON for a NON request) with the request's token; a retransmission while the first copy is
    being stored gets one more empty ACK and is stored once."""
    hub = Hub()
    hub.device("plain2")
    events = monitor(hub, "plain2")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", hub.udp))

    def collect(until, wait=3.0):
        got = []
        s.settimeout(wait)
        try:
            while not until(got):
                got.append(s.recv(65536))
        except socket.timeout:
            pass
        return got

    def token(d):
        return d[4:4 + (d[0] & 15)]

    path = path_opts("d/plain2/telemetry")
    s.send(pdu((0, 2), 0x6001, token=b"\x11", options=path, payload=b"first"))
    got = collect(lambda g: any(parse_code(d)[0] == "2.04" for d in g))
    sep = [d for d in got if parse_code(d)[0] == "2.04"]
    assert sep and parse_code(sep[0]) == ("2.04", 0) and token(sep[0]) == b"\x11", [parse_code(d) for d in got]
    s.send(bytes([0x60, 0]) + sep[0][2:4])

    con = pdu((0, 2), 0x6002, token=b"\x21\x22", options=path, payload=b"second")
    s.send(con)
    s.send(con)  # a retransmission while the first copy is being stored
    got = collect(lambda g: any(parse_code(d)[0] == "2.04" for d in g))
    got += collect(lambda g: False, wait=0.5)
    codes = [parse_code(d) for d in got]
    acks = [d for d in got if parse_code(d) == ("0.00", 2) and d[2:4] == con[2:4]]
    sep = [d for d in got if parse_code(d)[0] == "2.04"]
    assert len(acks) >= 1 and len(sep) == 1, codes
    assert parse_code(sep[0]) == ("2.04", 0) and token(sep[0]) == b"\x21\x22" and sep[0][2:4] != con[2:4], codes
    s.send(bytes([0x60, 0]) + sep[0][2:4])

    s.send(pdu((0, 2), 0x6003, token=b"\x31", typ=1, options=path, payload=b"third"))
    got = collect(lambda g: any(parse_code(d)[0] == "2.04" for d in g))
    sep = [d for d in got if parse_code(d)[0] == "2.04"]
    assert sep and parse_code(sep[0]) == ("2.04", 1) and token(sep[0]) == b"\x31", [parse_code(d) for d in got]
    # Acknowledged: libcoap retransmits nothing.
    assert not collect(lambda g: False, wait=2.5)

    wait_for(lambda: len(telemetry(events)) >= 3, what="3 events")
    time.sleep(0.5)
    assert [e["payload"] for e in telemetry(events)] == ["first", "second", "third"], telemetry(events)
    hub.finish()


def test_commands_while_away_and_piggybacked():
    hub = Hub()
    key, _ = hub.device("dev1")
    psk = psk_of(key)
    # Queued while the device sleeps.
    hub.ctl("c2d", "send", "dev1", "--body", "first", "--property", "k=v", "--message-id", "c-1")
    hub.ctl("c2d", "send", "dev1", "--body", "second", "--message-id", "c-2")
    hub.ctl("c2d", "send", "dev1", "--body", "third", "--message-id", "c-3")
    # Wake up, GET: the next command with a lock token.
    r = coap(hub, "get", "d/dev1/commands", secure=True, dev="dev1", psk=psk)
    assert r.code() == "2.05" and r.payload() == "first", r.out
    lock = r.option(65000)
    assert lock and len(lock) == 36, r.responses
    assert "k=v" in r.option(65004) and "%24.mid=c-1" in r.option(65004), r.option(65004)
    # Complete it.
    r = coap(hub, "delete", f"d/dev1/commands?lock={lock}", secure=True, dev="dev1", psk=psk)
    assert r.code() == "2.02", r.out
    r = coap(hub, "delete", f"d/dev1/commands?lock={lock}", secure=True, dev="dev1", psk=psk)
    assert r.code() == "4.12", r.out  # lock lost (HTTP 412)
    # A device that only wakes to send: the 2.04 carries the next command.
    r = coap(hub, "post", "d/dev1/telemetry", "-e", "reading", secure=True, dev="dev1", psk=psk)
    assert r.code() == "2.04" and r.payload() == "second", r.out
    lock2 = r.option(65000)
    r = coap(hub, "post", f"d/dev1/commands?lock={lock2}&abandon", secure=True, dev="dev1", psk=psk)
    assert r.code() == "2.04", r.out
    # Abandoned: delivered again; reject it this time.
    r = coap(hub, "get", "d/dev1/commands", secure=True, dev="dev1", psk=psk)
    assert r.payload() == "second", r.out
    r = coap(hub, "delete", f"d/dev1/commands?lock={r.option(65000)}&reject", secure=True, dev="dev1", psk=psk)
    assert r.code() == "2.02", r.out
    # Observe while awake: a command sent now arrives as a notification.
    p = subprocess.Popen([CLIENT.encode(), b"-v", b"7", b"-s", b"4", b"-B", b"6", b"-u", b"dev1", b"-k", psk,
                          f"coaps://127.0.0.1:{hub.dtls}/d/dev1/commands".encode()],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(1.0)
    hub.ctl("c2d", "send", "dev1", "--body", "fourth")
    out = p.communicate(timeout=20)[0].decode(errors="replace")
    res = [unescape(x) for x in out.splitlines() if x.startswith("v:1 ") and re.search(r" c:2\.05 ", x)]
    bodies = [re.search(r" :: '(.*)'$", x).group(1) for x in res if " :: '" in x]
    assert bodies == ["third", "fourth"], res
    # Empty queue: 2.05 without a body (both locks are held).
    r = coap(hub, "get", "d/dev1/commands", secure=True, dev="dev1", psk=psk)
    assert r.code() == "2.05" and r.payload() == "", r.out
    hub.finish()


def test_twin_and_methods():
    hub = Hub()
    hub.device("plain1")
    r = coap(hub, "post", "d/plain1/twin/reported", "-e", '{"fw":"1.2","temp":{"max":40}}', "-t", "50")
    assert r.code() == "2.04", r.out
    r = coap(hub, "get", "d/plain1/twin")
    view = json.loads(r.payload())
    assert view["reported"]["fw"] == "1.2" and view["reported"]["$version"] >= 1, view
    r = coap(hub, "post", "d/plain1/twin/reported", "-e", "[1]")
    assert r.code() == "4.00", r.out
    # Observe desired: a service update arrives as a notification.
    p = subprocess.Popen([CLIENT, "-v", "7", "-s", "4", "-B", "6", f"coap://127.0.0.1:{hub.udp}/d/plain1/twin/desired"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    hub.ctl("twin", "update", "plain1", "--desired", '{"interval":30}')
    out = p.communicate(timeout=20)[0]
    bodies = [json.loads(re.search(r" :: '(.*)'$", x).group(1)) for x in out.splitlines()
              if x.startswith("v:1 ") and " c:2.05 " in x and " :: '" in x]
    assert bodies and bodies[-1].get("interval") == 30, out[-3000:]

    # Methods: asleep -> the reference's offline answer.
    p = hub.ctl("method", "invoke", "plain1", "reboot", "--payload", '{"delay":1}', "--timeout", "5s", check=False)
    assert p.returncode != 0 and "DeviceNotOnline" in p.stderr, (p.stdout, p.stderr)
    # Awake (observing methods): the call arrives as a notification, the device POSTs the answer
    # from the same endpoint (a raw UDP device: one socket, one session).
    dev = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dev.settimeout(5)
    dev.connect(("127.0.0.1", hub.udp))
    dev.send(pdu((0, 1), 0x7001, token=b"\x77", options=[(6, b"")] + path_opts("d/plain1/methods")))
    code, typ = parse_code(dev.recv(65536))
    assert code == "2.05" and typ == 2, (code, typ)  # piggy-backed: no call yet
    result = {}

    def invoke():
        result["p"] = hub.ctl("--json", "method", "invoke", "plain1", "reboot", "--payload", '{"delay":1}',
                              "--timeout", "10s", check=False)
    t = threading.Thread(target=invoke)
    t.start()
    note = dev.recv(65536)
    code, typ = parse_code(note)
    assert code == "2.05" and typ == 0, (code, typ)  # a CON notification
    dev.send(bytes([0x60, 0]) + note[2:4])  # its ACK
    call = json.loads(note[note.index(b"\xff") + 1:])
    assert call["method"] == "reboot" and call["payload"] == {"delay": 1}, call
    rid = call["rid"]
    dev.send(pdu((0, 2), 0x7002, token=b"\x78", options=path_opts("d/plain1/methods") +
                 [(15, f"rid={rid}".encode()), (15, b"status=200")], payload=b'{"ok":true}'))
    code, _ = parse_code(dev.recv(65536))
    assert code == "2.04", code
    t.join(30)
    p = result["p"]
    assert p.returncode == 0 and json.loads(p.stdout)["status"] == 200, (p.stdout, p.stderr)
    assert json.loads(p.stdout)["payload"] == {"ok": True}, p.stdout
    # An unknown request id: 4.04.
    dev.send(pdu((0, 2), 0x7003, token=b"\x79", options=path_opts("d/plain1/methods") +
                 [(15, b"rid=nope"), (15, b"status=200")]))
    assert parse_code(dev.recv(65536))[0] == "4.04"
    hub.finish()


def test_blockwise():
    hub = Hub()
    hub.device("plain1")
    events = monitor(hub, "plain1")
    body = os.path.join(hub.d, "body.json")
    doc = {"samples": list(range(4000))}
    with open(body, "w") as f:
        json.dump(doc, f)
    r = coap(hub, "post", "d/plain1/telemetry", "-f", body, "-b", "64", "-t", "50", wait=20)
    assert r.code() == "2.04", r.out[-2000:]
    assert sum(1 for x in r.pdus if "Block1" in x) > 10
    tel = wait_for(lambda: telemetry(events), what="the block-wise message")
    assert tel[0]["payload"] == doc
    # A large twin comes back block-wise (Block2).
    big = {f"k{i}": "v" * 100 for i in range(60)}
    r = coap(hub, "post", "d/plain1/twin/reported", "-f", "-", "-b", "256", extra=())
    # (stdin was empty: a 4.00) -- send it from a file instead
    path = os.path.join(hub.d, "rep.json")
    with open(path, "w") as f:
        json.dump(big, f)
    r = coap(hub, "post", "d/plain1/twin/reported", "-f", path, "-t", "50", wait=20)
    assert r.code() == "2.04", r.out[-2000:]
    r = coap(hub, "get", "d/plain1/twin", "-b", "256", wait=20)
    assert sum(1 for x in r.responses if "Block2" in x) > 3, r.responses[:3]
    hub.finish()


def test_revocation_closes_dtls_session():
    hub = Hub()
    key, _ = hub.device("dev1")
    psk = psk_of(key)
    obs = subprocess.Popen([CLIENT.encode(), b"-v", b"7", b"-s", b"10", b"-B", b"12", b"-u", b"dev1", b"-k", psk,
                            f"coaps://127.0.0.1:{hub.dtls}/d/dev1/methods".encode()],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    hub.daemon.wait_log(r"device dev1 connected \(DTLS-PSK\)")
    time.sleep(0.5)
    t0 = time.monotonic()
    hub.ctl("device", "update", "dev1", "--status", "disabled")
    hub.daemon.wait_log(r"CoAP .*\(device dev1\): .*closing the session", timeout=1.0)
    hub.daemon.wait_log(r"device dev1 disconnected \(closed by the hub\)", timeout=1.0)
    assert time.monotonic() - t0 < 1.5
    obs.kill()
    obs.wait()
    # The disabled device cannot come back.
    r = coap(hub, "post", "d/dev1/telemetry", "-e", "x", secure=True, dev="dev1", psk=psk, wait=2)
    assert r.code() is None, r.out
    hub.daemon.wait_log(r'identity "dev1" refused: the device is disabled')
    hub.finish()


def test_config_checks():
    d = tmpdir()
    cfg = write(f"{d}/bad.yaml", config_text(d, extra="""coap:
  listen: ["0.0.0.0:5683"]
  plaintext_devices: ["bad id/"]
  limits: {max_sesions: 3}
"""))
    p = subprocess.run([os.environ.get("FIELDHUBD", "fieldhubd"), "--check-config", "--config", cfg],
                       capture_output=True, text=True)
    assert p.returncode != 0
    err = p.stdout + p.stderr
    assert "coap.allow_plaintext" in err and "expected a device id" in err and "max_sesions" in err, err


if __name__ == "__main__":
    main([test_telemetry_udp_and_dtls, test_bad_credentials_and_input, test_duplicates_stored_once,
          test_separate_answer_without_command, test_commands_while_away_and_piggybacked, test_twin_and_methods,
          test_blockwise,
          test_revocation_closes_dtls_session, test_config_checks])
