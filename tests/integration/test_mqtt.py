#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The MQTT 3.1.1 device interface (reference §2) against the real fieldhubd, with real
clients (paho, mosquitto_pub/sub) over TLS trusting the generated CA, and raw TLS sockets
for the byte-exact session of §2.12 and the bad-input cases."""

import os
import sys

try:
    import paho.mqtt.client as mqtt  # noqa: F401
except ImportError:  # a pyenv python without Debian's python3-paho-mqtt
    if sys.executable != "/usr/bin/python3" and os.path.exists("/usr/bin/python3"):
        os.execv("/usr/bin/python3", ["/usr/bin/python3"] + sys.argv)
    print("python3-paho-mqtt is not installed", file=sys.stderr)
    sys.exit(77)

import base64
import hashlib
import hmac
import json
import re
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.parse

import paho.mqtt.client as mqtt

sys.path.insert(0, os.path.dirname(__file__))
from fhlib import FIELDHUBCTL, Daemon, main, tmpdir, write  # noqa: E402
import test_api  # noqa: E402
from test_api import HOST, token  # noqa: E402

API = "2021-04-12"
ALIAS = "alias.test.local"


def mqtt_extra(extra=""):
    return """mqtt:
  listen: ["127.0.0.1:0"]
  limits:
    connect_timeout: 3s
""" + extra


class Hub(test_api.Hub):
    def __init__(self, extra="", hub_extra=""):
        super().__init__(mqtt_extra(extra))
        if hub_extra:
            # hub: keys go into the hub section (x509_ca_files)
            text = open(self.cfg).read().replace("  host_aliases: [alias.test.local]\n",
                                                 "  host_aliases: [alias.test.local]\n" + hub_extra)
            write(self.cfg, text)
            self.daemon.kill()
            self.daemon = Daemon(self.cfg)
            self.daemon.wait_log(r"Metrics endpoint listening")
            self.port = int(re.search(r"Service API listening on \S+ \(port (\d+), TLS\)",
                                      self.daemon.log()).group(1))
            self._conn = None
        self.daemon.wait_log(r"MQTT listening on")
        self.mport_mqtt = int(re.search(r"MQTT listening on \S+ \(port (\d+), TLS\)", self.daemon.log()).group(1))

    def conn_req(self, method, path, body):
        """One request on its own connection (from another thread)."""
        import http.client
        c = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=30)
        c.request(method, path + "?api-version=" + test_api.VERSION, body=json.dumps(body),
                  headers={"Authorization": token(), "Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, dict(r.getheaders()), json.loads(data) if data else None

    def device(self, dev_id, body=None):
        st, _, dev = self.req("PUT", f"/devices/{dev_id}", body or {"deviceId": dev_id})
        assert st == 200, dev
        return dev

    def key(self, dev):
        return dev["authentication"]["symmetricKey"]["primaryKey"]


def sas(dev_id, key, se=None, host=HOST, module=None, lower_hex=False):
    se = int(time.time()) + 3600 if se is None else se
    res = f"{host}/devices/{dev_id}" + (f"/modules/{module}" if module else "")
    sr = urllib.parse.quote(res, safe="")
    if lower_hex:
        sr = re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), sr)
    sig = base64.b64encode(hmac.new(base64.b64decode(key), f"{sr}\n{se}".encode(), hashlib.sha256).digest()).decode()
    return f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={se}"


def username(dev_id, host=HOST, extra=""):
    return f"{host}/{dev_id}/?api-version={API}{extra}"


class Client:
    """A paho client over TLS with the generated CA, recording what it receives."""

    def __init__(self, hub, dev_id, password=None, user=None, client_id=None, cert=None, clean=False,
                 keepalive=60, will=None):
        self.c = mqtt.Client(client_id=client_id or dev_id, clean_session=clean, protocol=mqtt.MQTTv311)
        self.c.username_pw_set(user or username(dev_id), password)
        self.c.tls_set(ca_certs=hub.ca, certfile=cert[0] if cert else None, keyfile=cert[1] if cert else None)
        self.c.tls_insecure_set(False)
        if will:
            self.c.will_set(*will)
        self.msgs = []
        self.rc = None
        self.disconnected = threading.Event()
        self.connected = threading.Event()
        self.lock = threading.Lock()
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_disconnect = self._on_disconnect
        self.c.connect("127.0.0.1", hub.mport_mqtt, keepalive)
        self.c.loop_start()

    def _on_connect(self, c, u, flags, rc):
        self.rc = rc
        self.connected.set()

    def _on_message(self, c, u, m):
        with self.lock:
            self.msgs.append(m)

    def _on_disconnect(self, c, u, rc):
        self.disconnected.set()

    def wait_connect(self, timeout=10):
        assert self.connected.wait(timeout), "no CONNACK"
        return self.rc

    def wait_msgs(self, n, timeout=10, pred=None):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                got = [m for m in self.msgs if not pred or pred(m)]
            if len(got) >= n:
                return got
            time.sleep(0.02)
        raise AssertionError(f"expected {n} messages, got {[(m.topic, m.payload) for m in self.msgs]}")

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def connect(hub, dev_id, key, **kw):
    cl = Client(hub, dev_id, sas(dev_id, key), **kw)
    assert cl.wait_connect() == 0, cl.rc
    return cl


def monitor(hub, device=None):
    """fieldhubctl monitor-events --json as a background process; returns (proc, lines list)."""
    args = [FIELDHUBCTL, "--socket", os.path.join(hub.d, "admin.sock"), "--json", "monitor-events", "--properties"]
    if device:
        args += ["--device", device]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []

    def rd():
        for line in p.stdout:
            lines.append(json.loads(line)["event"])
    t = threading.Thread(target=rd, daemon=True)
    t.start()
    time.sleep(0.5)

    def stop():
        if p.poll() is None:
            p.terminate()
            p.wait()
    from fhlib import at_exit
    at_exit(stop)
    return p, lines


def wait_for(fn, timeout=10, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = fn()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---- raw MQTT over TLS ----------------------------------------------------------------------


def enc_str(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def rem_len(n):
    out = b""
    while True:
        d = n % 128
        n //= 128
        out += bytes([d | (0x80 if n else 0)])
        if not n:
            return out


def pkt(first, body):
    return bytes([first]) + rem_len(len(body)) + body


def connect_pkt(client_id, user=None, password=None, keepalive=180, clean=False, level=4):
    flags = (0x02 if clean else 0) | (0x80 if user is not None else 0) | (0x40 if password is not None else 0)
    body = enc_str("MQTT") + bytes([level, flags]) + struct.pack(">H", keepalive) + enc_str(client_id)
    if user is not None:
        body += enc_str(user)
    if password is not None:
        body += enc_str(password)
    return pkt(0x10, body)


def publish_pkt(topic, payload=b"", qos=0, pid=None, retain=False):
    body = enc_str(topic) + (struct.pack(">H", pid) if qos else b"") + payload
    return pkt(0x30 | (qos << 1) | (1 if retain else 0), body)


def subscribe_pkt(pid, subs):
    body = struct.pack(">H", pid) + b"".join(enc_str(f) + bytes([q]) for f, q in subs)
    return pkt(0x82, body)


class Raw:
    def __init__(self, hub):
        ctx = ssl.create_default_context(cafile=hub.ca)
        s = socket.create_connection(("127.0.0.1", hub.mport_mqtt))
        self.t = ctx.wrap_socket(s, server_hostname=HOST)
        self.t.settimeout(5)
        self.buf = b""

    def send(self, b):
        self.t.sendall(b)

    def read_packet(self, timeout=5):
        self.t.settimeout(timeout)
        while True:
            if len(self.buf) >= 2:
                n, mult, i = 0, 1, 1
                while i < len(self.buf):
                    d = self.buf[i]
                    n += (d & 127) * mult
                    mult *= 128
                    i += 1
                    if not d & 128:
                        break
                else:
                    i = None
                if i is not None and len(self.buf) >= i + n:
                    p, self.buf = self.buf[:i + n], self.buf[i + n:]
                    return p
            b = self.t.recv(65536)
            if not b:
                raise EOFError("closed")
            self.buf += b

    def closed(self, timeout=5):
        """True when the server closes the connection within timeout (after any pending bytes)."""
        self.t.settimeout(timeout)
        try:
            while True:
                b = self.t.recv(65536)
                if not b:
                    return True
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self):
        self.t.close()


# ---- tests ---------------------------------------------------------------------------------


def test_example_session_bytes():
    """Reference §2.12 replayed over a raw TLS socket; the server's bytes compared exactly."""
    hub = Hub()
    dev = hub.device("dev1")
    key = hub.key(dev)
    # Twin state of the example: desired {"interval":5} at $version 3, reported $version 7.
    assert hub.req("PATCH", "/twins/dev1", {"properties": {"desired": {"interval": 1}}})[0] == 200
    assert hub.req("PATCH", "/twins/dev1", {"properties": {"desired": {"interval": 5}}})[0] == 200
    pre = connect(hub, "dev1", key)
    for i in range(6):
        pre.c.publish(f"$iothub/twin/PATCH/properties/reported/?$rid=p{i}",
                      json.dumps({"x": None if i % 2 else 1}), qos=0)
    pre.c.subscribe("$iothub/twin/res/#", 0)
    time.sleep(1.0)
    pre.close()

    r = Raw(hub)
    r.send(connect_pkt("dev1", username("dev1", extra="&DeviceClientType=test"), sas("dev1", key), keepalive=180))
    assert r.read_packet() == b"\x20\x02\x00\x00"
    r.send(subscribe_pkt(1, [("devices/dev1/messages/devicebound/#", 1), ("$iothub/methods/POST/#", 0),
                             ("$iothub/twin/res/#", 0), ("$iothub/twin/PATCH/properties/desired/#", 0)]))
    assert r.read_packet() == b"\x90\x06\x00\x01\x01\x00\x00\x00"
    r.send(publish_pkt("devices/dev1/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8", b'{"t":21.5}', 1, 2))
    assert r.read_packet() == b"\x40\x02\x00\x02"
    r.send(publish_pkt("$iothub/twin/GET/?$rid=1"))
    body = b'{"desired":{"interval":5,"$version":3},"reported":{"$version":7}}'
    got = r.read_packet()
    assert got == publish_pkt("$iothub/twin/res/200/?$rid=1", body), got
    r.send(publish_pkt("$iothub/twin/PATCH/properties/reported/?$rid=2", b'{"interval":5}'))
    assert r.read_packet() == publish_pkt("$iothub/twin/res/204/?$rid=2&$version=8")
    assert hub.req("PATCH", "/twins/dev1", {"properties": {"desired": {"interval": 10}}})[0] == 200
    assert r.read_packet() == publish_pkt("$iothub/twin/PATCH/properties/desired/?$version=4",
                                          b'{"interval":10,"$version":4}')
    # A method call from the service API; the hub chooses the rid.
    result = {}

    def call():
        result["r"] = hub.conn_req("POST", "/twins/dev1/methods",
                                   {"methodName": "reboot", "payload": {"delay": 5}, "responseTimeoutInSeconds": 10})
    th = threading.Thread(target=call)
    th.start()
    p = r.read_packet()
    m = re.fullmatch(rb"\x30.{1,2}\x00.(\$iothub/methods/POST/reboot/\?\$rid=([0-9A-Za-z-]+))\{\"delay\":5\}", p, re.S)
    assert m, p
    assert p == publish_pkt(m.group(1).decode(), b'{"delay":5}')
    r.send(publish_pkt(f"$iothub/methods/res/200/?$rid={m.group(2).decode()}", b'{"ok":true}'))
    th.join(15)
    st, _, body = result["r"]
    assert st == 200 and body == {"status": 200, "payload": {"ok": True}}, result
    st, _, _ = hub.req("POST", "/messages/devicebound/dev1", b"\x01\x02open",
                       headers={"iothub-messageid": "m-1", "iothub-ack": "full", "iothub-app-cmd": "open",
                                "Content-Type": "application/octet-stream"})
    assert st in (200, 204), st
    p = r.read_packet()
    # The hub stamps the expiry ($.exp, as in Azure's older traces) and the service API keeps the
    # sender's content type ($.ct): both are values of this run, the rest is the example's.
    m = re.search(rb"(&%24\.exp=[0-9T%A-Z.-]+Z)(&%24\.ct=application%2Foctet-stream)?&iothub-ack", p)
    assert m, p
    topic = ("devices/dev1/messages/devicebound/%24.mid=m-1&%24.to=%2Fdevices%2Fdev1%2Fmessages%2FdeviceBound"
             + m.group(1).decode() + (m.group(2) or b"").decode() + "&iothub-ack=full&cmd=open")
    pid = p[len(p) - 2 - 6:len(p) - 6]
    assert p == pkt(0x32, enc_str(topic) + pid + b"\x01\x02open"), p
    r.send(pkt(0x40, pid))
    # PUBACK = complete: the queue empties.
    wait_for(lambda: hub.req("GET", "/devices/dev1")[2]["cloudToDeviceMessageCount"] == 0, what="C2D completed")
    r.send(b"\xe0\x00")
    assert r.closed()
    hub.finish()


def test_connect_codes_and_quirks():
    hub = Hub()
    key = hub.key(hub.device("d1"))
    other = hub.key(hub.device("d2"))
    hub.device("off", {"deviceId": "off", "status": "disabled"})

    def code(cid, user, pw, level=4):
        r = Raw(hub)
        r.send(connect_pkt(cid, user, pw, level=level))
        try:
            p = r.read_packet()
        except EOFError:
            return None
        assert p[3] == 0 or r.closed()
        r.close()
        return p[3]

    assert code("d1", username("d1"), sas("d1", key)) == 0
    assert code("d1", username("d1"), sas("d1", key), level=3) == 1
    assert code("d2", username("d1"), sas("d1", key)) == 2
    assert code("d1", "garbage", sas("d1", key)) == 4
    assert code("d1", username("d1"), "SharedAccessSignature nonsense") == 4
    assert code("d1", username("d1"), sas("d1", other)) == 5                        # bad signature
    assert code("d1", username("d1"), sas("d1", key, se=int(time.time()) - 3600)) == 5  # expired
    assert code("nobody", username("nobody"), sas("nobody", key)) == 5
    assert code("off", username("off"), sas("off", key)) == 5
    assert code("d1", username("d1"), sas("d2", other)) == 5                        # sr of another device
    assert code("d1", username("d1", host="elsewhere.test"), sas("d1", key)) == 5
    # Quirks: old user name without "?", %2f in sr, a cloud host name through an alias.
    assert code("d1", f"{HOST}/d1/api-version=2016-11-14&DeviceClientType=iothubclient%2f1.1", sas("d1", key)) == 0
    assert code("d1", username("d1"), sas("d1", key, lower_hex=True)) == 0
    assert code("d1", username("d1", host=ALIAS), sas("d1", key, host=ALIAS)) == 0
    assert code("d1", username("d1", host=HOST.upper()), sas("d1", key)) == 0
    # A policy token with DeviceConnect (iothubowner) acting as the device.
    assert code("d1", username("d1"), token(sr=f"{HOST}/devices/d1")) == 0
    # mosquitto_pub over TLS.
    p = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(hub.mport_mqtt), "--cafile", hub.ca,
                        "--insecure", "-V", "mqttv311", "-i", "d1", "-u", username("d1"), "-P", sas("d1", key), "-q", "1",
                        "-t", "devices/d1/messages/events/", "-m", "hello"], capture_output=True, text=True, timeout=20)
    assert p.returncode == 0, p.stderr
    assert "auth-failed" not in "" and re.search(r"connection of device d2 refused \(CONNACK 0x02\)|device d1 refused",
                                                 hub.daemon.log())
    hub.finish()


def test_telemetry_properties_and_will():
    hub = Hub()
    key = hub.key(hub.device("t1"))
    mon, events = monitor(hub, "t1")
    cl = connect(hub, "t1", key, will=("devices/t1/messages/events/", b"gone", 1, False))
    infos = [cl.c.publish("devices/t1/messages/events/%24.mid=42&%24.ct=application%2Fjson&%24.ce=utf-8&temp=21",
                          b'{"t":1}', qos=1),
             cl.c.publish("devices/t1/messages/events/$.mid=43&a%20b=c%26d/", b"raw", qos=1, retain=True),
             cl.c.publish("devices/t1/messages/events/?x=1", b"q", qos=1),
             cl.c.publish("devices/t1/messages/events", b"zero", qos=0)]
    for i in infos[:3]:
        i.wait_for_publish(10)
    # An abnormal end: the Will is injected as telemetry.
    cl.c.socket().shutdown(socket.SHUT_RDWR)
    cl.c.loop_stop()
    wait_for(lambda: len([e for e in events if e["properties"]["system"].get("iothub-message-source") == "Telemetry"]) >= 5,
             what="5 telemetry events")
    tel = [e for e in events if e["properties"]["system"].get("iothub-message-source") == "Telemetry"]
    e0 = tel[0]
    s = e0["properties"]["system"]
    assert e0["payload"] == {"t": 1} and s["message-id"] == "42" and s["content-type"] == "application/json", e0
    assert s["iothub-connection-device-id"] == "t1" and s["iothub-connection-auth-generation-id"]
    assert json.loads(s["iothub-connection-auth-method"]) == {"scope": "device", "type": "sas", "issuer": "iothub",
                                                             "acceptingIpFilterRule": None}
    assert s.get("iothub-enqueuedtime"), s
    assert e0["properties"]["application"] == {"temp": "21"}
    assert tel[1]["properties"]["system"]["message-id"] == "43"
    assert tel[1]["properties"]["application"] == {"a b": "c&d", "mqtt-retain": "true"}, tel[1]
    assert tel[2]["properties"]["application"] == {"x": "1"}
    assert tel[3]["payload"] == "zero"
    will = tel[4]
    assert will["payload"] == "gone" and will["properties"]["application"]["iothub-MessageType"] == "Will", will
    # Connection-state events.
    ops = [e["properties"]["application"].get("opType") for e in events]
    assert "deviceConnected" in ops and "deviceDisconnected" in ops, ops
    st, _, d = hub.req("GET", "/devices/t1")
    assert d["connectionState"] == "Disconnected"
    hub.finish()


def test_bad_input_closes_only_that_connection():
    hub = Hub()
    k1 = hub.key(hub.device("b1"))
    k2 = hub.key(hub.device("b2"))
    good = connect(hub, "b2", k2)

    def session():
        r = Raw(hub)
        r.send(connect_pkt("b1", username("b1"), sas("b1", k1)))
        assert r.read_packet() == b"\x20\x02\x00\x00"
        return r

    cases = [
        ("garbage", None, b"\xff\xff\xff\xff\xff"),
        ("qos2", True, publish_pkt("devices/b1/messages/events/", b"x", 2, 7)),
        ("unknown topic", True, publish_pkt("devices/b1/other", b"x", 1, 7)),
        ("other device", True, publish_pkt("devices/b2/messages/events/", b"x", 1, 7)),
        ("bad bag", True, publish_pkt("devices/b1/messages/events/a=%zz", b"x", 1, 7)),
        ("unsupported filter", True, subscribe_pkt(3, [("devices/b1/#", 1)])),
        ("truncated", True, b"\x32\x10\x00\x05dev"),
        ("oversize message", True, publish_pkt("devices/b1/messages/events/", b"x" * (256 * 1024 + 1), 1, 9)),
        ("after disconnect", True, b"\xe0\x00" + publish_pkt("devices/b1/messages/events/", b"late", 1, 5)),
    ]
    for name, connected, data in cases:
        if connected:
            r = session()
        else:
            r = Raw(hub)
        r.send(data)
        if name == "truncated":
            # Incomplete: nothing happens until the connection times out (keep-alive); close it.
            assert not r.closed(0.5), name
            r.close()
            continue
        assert r.closed(), name
        r.close()
    # An oversize CONNECT (over the packet limit) is refused at its header.
    r = Raw(hub)
    r.send(b"\x10\xff\xff\xff\x7f")
    assert r.closed()
    # The other connection is unaffected.
    info = good.c.publish("devices/b2/messages/events/", b"still here", qos=1)
    info.wait_for_publish(10)
    assert info.is_published()
    log = hub.daemon.log()
    for what in ["QoS 2", "unknown topic", "another identity's topic", "malformed property bag",
                 "unsupported filter", "larger than 256 KB"]:
        assert re.search(rf"device b1\): .*{what}", log, re.I), (what, log[-3000:])
    # SUBSCRIBE QoS 2 is granted QoS 1; more than 5 subscriptions close.
    r = session()
    r.send(subscribe_pkt(4, [("devices/b1/messages/devicebound/#", 2), ("$iothub/twin/res/#", 2)]))
    assert r.read_packet() == b"\x90\x04\x00\x04\x01\x01"
    r.close()
    good.close()
    hub.finish()


def test_connections_that_never_finish_tls():
    """A port scanner, a health check or a client that dies mid-handshake: the connection is
    closed before the MQTT layer ever saw it, and nothing else is disturbed."""
    hub = Hub()
    for _ in range(5):
        socket.create_connection(("127.0.0.1", hub.mport_mqtt)).close()
    s = socket.create_connection(("127.0.0.1", hub.mport_mqtt))
    s.sendall(b"\x16\x03\x01\x00\x05hello")  # the start of a ClientHello, then silence
    s.close()
    s = socket.create_connection(("127.0.0.1", hub.mport_mqtt))
    s.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not TLS at all
    s.close()
    time.sleep(0.5)
    assert hub.daemon.alive(), hub.daemon.log()[-3000:]
    # A real device still connects and publishes.
    dev = "after-scan"
    key = hub.key(hub.device(dev))
    c = Client(hub, dev, sas(dev, key))
    assert c.connected.wait(10) and c.rc == 0, c.rc
    info = c.c.publish(f"devices/{dev}/messages/events/", b"ok", qos=1)
    info.wait_for_publish(10)
    assert info.is_published()
    c.c.disconnect()
    c.c.loop_stop()


def test_c2d_offline_redelivery_and_takeover():
    hub = Hub()
    key = hub.key(hub.device("c1"))
    for i in range(3):
        st = hub.req("POST", "/messages/devicebound/c1", f"m{i}".encode(),
                     headers={"iothub-messageid": f"id{i}", "Content-Type": "text/plain"})
        assert st[0] in (200, 204), st
    # Subscribed without PUBACKs (raw), then the connection dies: redelivered on reconnect.
    r = Raw(hub)
    r.send(connect_pkt("c1", username("c1"), sas("c1", key)))
    assert r.read_packet() == b"\x20\x02\x00\x00"
    r.send(subscribe_pkt(1, [("devices/c1/messages/devicebound/#", 1)]))
    assert r.read_packet()[0] == 0x90
    got = [r.read_packet() for _ in range(3)]
    assert all(b"m" in g for g in got)
    # Takeover: a second connection of c1 closes the first.
    cl = connect(hub, "c1", key)
    assert r.closed(), "the old connection must be closed on takeover"
    cl.c.subscribe("devices/c1/messages/devicebound/#", 1)
    msgs = cl.wait_msgs(3)
    assert [m.payload for m in msgs] == [b"m0", b"m1", b"m2"], [m.payload for m in msgs]
    assert "%24.mid=id0" in msgs[0].topic
    wait_for(lambda: hub.req("GET", "/devices/c1")[2]["cloudToDeviceMessageCount"] == 0, what="completed")
    # mosquitto_sub receives a message sent while subscribed.
    cl.close()
    p = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(hub.mport_mqtt), "--cafile", hub.ca,
                          "-V", "mqttv311", "-i", "c1", "-u", username("c1"), "-P", sas("c1", key), "-q", "1",
                          "-t", "devices/c1/messages/devicebound/#", "-C", "1", "-v"],
                         stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    hub.req("POST", "/messages/devicebound/c1", b"sub", headers={"Content-Type": "text/plain"})
    out, _ = p.communicate(timeout=15)
    assert out.startswith("devices/c1/messages/devicebound/") and out.strip().endswith("sub"), out
    hub.finish()


def test_revocation_within_one_second():
    hub = Hub()
    for dev_id, change in [("r1", "disable"), ("r2", "delete"), ("r3", "regenerate")]:
        dev = hub.device(dev_id)
        cl = connect(hub, dev_id, hub.key(dev))
        t0 = time.monotonic()
        if change == "disable":
            st = hub.req("PUT", f"/devices/{dev_id}", {"deviceId": dev_id, "status": "disabled"},
                         headers={"If-Match": "*"})[0]
        elif change == "delete":
            st = hub.req("DELETE", f"/devices/{dev_id}", headers={"If-Match": "*"})[0]
        else:
            body = dict(dev)
            body["authentication"]["symmetricKey"]["primaryKey"] = base64.b64encode(os.urandom(32)).decode()
            st = hub.req("PUT", f"/devices/{dev_id}", body, headers={"If-Match": "*"})[0]
        assert st in (200, 204), st
        assert cl.disconnected.wait(1.0), f"{change}: still connected after 1 s"
        assert time.monotonic() - t0 < 1.0
        cl.c.loop_stop()
    hub.finish()


def test_keepalive_and_token_expiry():
    hub = Hub()
    key = hub.key(hub.device("k1"))
    r = Raw(hub)
    r.send(connect_pkt("k1", username("k1"), sas("k1", key), keepalive=1))
    assert r.read_packet() == b"\x20\x02\x00\x00"
    t0 = time.monotonic()
    assert r.closed(4), "no keep-alive enforcement"
    assert 1.4 <= time.monotonic() - t0 < 3.0, time.monotonic() - t0
    # A token expiring in 2 s (+ the 300 s skew does not extend the connection past se).
    r = Raw(hub)
    r.send(connect_pkt("k1", username("k1"), sas("k1", key, se=int(time.time()) + 2), keepalive=60))
    assert r.read_packet() == b"\x20\x02\x00\x00"
    assert r.closed(5), "not closed at token expiry"
    # No CONNECT at all: closed after connect_timeout.
    r = Raw(hub)
    assert r.closed(5)
    hub.finish()


def test_methods_and_twin_errors():
    hub = Hub()
    key = hub.key(hub.device("m1"))
    cl = connect(hub, "m1", key)
    cl.c.subscribe([("$iothub/methods/POST/#", 0), ("$iothub/twin/res/#", 0)])
    time.sleep(0.5)

    def on_msg(c, u, m):
        if m.topic.startswith("$iothub/methods/POST/"):
            rid = m.topic.split("$rid=")[1]
            c.publish(f"$iothub/methods/res/201/?$rid={rid}", json.dumps({"echo": json.loads(m.payload)}))
        else:
            with cl.lock:
                cl.msgs.append(m)
    cl.c.on_message = on_msg
    st, _, body = hub.req("POST", "/twins/m1/methods", {"methodName": "ping", "payload": [1, 2],
                                                        "responseTimeoutInSeconds": 5})
    assert st == 200 and body == {"status": 201, "payload": {"echo": [1, 2]}}, body
    # Twin errors: malformed JSON -> 400 with the JSON error body; stale $version -> 412.
    cl.c.publish("$iothub/twin/PATCH/properties/reported/?$rid=9", b"{nope")
    cl.c.publish("$iothub/twin/PATCH/properties/reported/?$rid=10&$version=99", b'{"a":1}')
    msgs = cl.wait_msgs(2)
    assert msgs[0].topic == "$iothub/twin/res/400/?$rid=9", msgs[0].topic
    assert json.loads(msgs[0].payload)["errorCode"] == 400004
    assert msgs[1].topic.startswith("$iothub/twin/res/412/?$rid=10"), msgs[1].topic
    # Reals come back as the shortest decimal that round-trips (18.9, not 18.899999999999999):
    # in the device's twin GET, the service API and fieldhubctl twin show.
    cl.c.publish("$iothub/twin/PATCH/properties/reported/?$rid=11", b'{"temp":18.9,"sum":0.30000000000000004}')
    assert cl.wait_msgs(3)[2].topic.startswith("$iothub/twin/res/204/?$rid=11"), cl.msgs[2].topic
    cl.c.publish("$iothub/twin/GET/?$rid=12")
    got = cl.wait_msgs(4)[3]
    assert got.topic == "$iothub/twin/res/200/?$rid=12", got.topic
    assert re.search(rb'"temp":18\.9,"sum":0\.30000000000000004[,}]', got.payload), got.payload
    st, _, raw = hub.req("GET", "/twins/m1", raw=True)
    assert st == 200 and re.search(rb'"temp":18\.9,"sum":0\.30000000000000004[,}]', raw), raw
    p = subprocess.run([FIELDHUBCTL, "--socket", os.path.join(hub.d, "admin.sock"), "twin", "show", "m1"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and re.search(r'"temp": 18\.9,\s*"sum": 0\.30000000000000004\b', p.stdout), p
    cl.close()
    # Not subscribed: 404103.
    st, _, body = hub.req("POST", "/twins/m1/methods", {"methodName": "ping", "responseTimeoutInSeconds": 5})
    assert st == 404, body
    hub.finish()


def make_cert(d, name, cn, days=30, ca=None, expired=False):
    key, crt = f"{d}/{name}.key", f"{d}/{name}.crt"
    subprocess.run(["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", key], check=True,
                   capture_output=True)
    if ca is None:
        args = ["openssl", "req", "-new", "-x509", "-key", key, "-out", crt, "-subj", f"/CN={cn}"]
        if expired:
            args += ["-not_before", "20200101000000Z", "-not_after", "20200201000000Z"]
        else:
            args += ["-days", str(days)]
        p = subprocess.run(args, capture_output=True, text=True)
        if p.returncode != 0 and expired:  # openssl 3.0 has no -not_before on req: use x509 -set-dates
            raise AssertionError(p.stderr)
        assert p.returncode == 0, p.stderr
    else:
        csr = f"{d}/{name}.csr"
        subprocess.run(["openssl", "req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={cn}"], check=True,
                       capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
                        "-out", crt, "-days", str(days)], check=True, capture_output=True)
    der = subprocess.run(["openssl", "x509", "-in", crt, "-outform", "DER"], check=True, capture_output=True).stdout
    return crt, key, der


def test_x509():
    d = tmpdir()
    cakey = f"{d}/ca.key"
    subprocess.run(["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", cakey], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "req", "-new", "-x509", "-key", cakey, "-out", f"{d}/ca.crt", "-subj", "/CN=Test CA",
                    "-days", "30", "-addext", "basicConstraints=critical,CA:TRUE"], check=True, capture_output=True)
    hub = Hub(hub_extra=f"  x509_ca_files: [{d}/ca.crt]\n")
    c1, k1, der1 = make_cert(d, "x1", "x1")
    c2, k2, der2 = make_cert(d, "x2", "x2")
    c3, k3, _ = make_cert(d, "x3", "x3", ca=(f"{d}/ca.crt", cakey))
    c4, k4, _ = make_cert(d, "x4", "wrong", ca=(f"{d}/ca.crt", cakey))
    sha1 = hashlib.sha1(der1).hexdigest().upper()
    sha256 = hashlib.sha256(der2).hexdigest()
    hub.device("x1", {"deviceId": "x1", "authentication": {"type": "selfSigned", "x509Thumbprint": {
        "primaryThumbprint": "00" * 20, "secondaryThumbprint": sha1}}})
    hub.device("x2", {"deviceId": "x2", "authentication": {"type": "selfSigned", "x509Thumbprint": {
        "primaryThumbprint": sha256, "secondaryThumbprint": None}}})
    hub.device("x3", {"deviceId": "x3", "authentication": {"type": "certificateAuthority"}})

    def rc(dev_id, cert):
        cl = Client(hub, dev_id, None, cert=cert)
        try:
            return cl.wait_connect()
        finally:
            cl.c.disconnect()
            cl.c.loop_stop()
    assert rc("x1", (c1, k1)) == 0           # SHA-1, secondary, upper case
    assert rc("x2", (c2, k2)) == 0           # SHA-256, primary
    assert rc("x1", (c2, k2)) == 5           # another certificate
    assert rc("x3", (c3, k3)) == 0           # CA-signed, CN = device id
    # CN of another name, signed by the CA, presented for x3.
    assert rc("x3", (c4, k4)) == 5
    # A self-signed certificate presented to a CA device.
    assert rc("x3", (c1, k1)) == 5
    # An expired self-signed certificate registered by its thumbprint: refused.
    ekey = f"{d}/e.key"
    subprocess.run(["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", ekey], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "req", "-new", "-key", ekey, "-out", f"{d}/e.csr", "-subj", "/CN=x5"], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", f"{d}/e.csr", "-signkey", ekey, "-out", f"{d}/e.crt",
                    "-days", "0"], check=True, capture_output=True)
    eder = subprocess.run(["openssl", "x509", "-in", f"{d}/e.crt", "-outform", "DER"], check=True,
                          capture_output=True).stdout
    hub.device("x5", {"deviceId": "x5", "authentication": {"type": "selfSigned", "x509Thumbprint": {
        "primaryThumbprint": hashlib.sha256(eder).hexdigest(), "secondaryThumbprint": None}}})
    time.sleep(2.1)
    assert rc("x5", (f"{d}/e.crt", ekey)) == 5
    assert re.search(r"device x5 refused \(CONNACK 0x05\): X.509: the client certificate has expired",
                     hub.daemon.log()), hub.daemon.log()[-2000:]
    hub.finish()


def read_all_events(hub, device=None, quiet=1.0):
    """Every event the stream still holds (admin socket monitor-events from seq 0)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.path.join(hub.d, "admin.sock"))
    args = {"after": 0}
    if device:
        args["device"] = device
    s.sendall((json.dumps({"cmd": "monitor-events", "args": args}) + "\n").encode())
    # The first event may take a while (a sanitizer build scanning a large stream); after
    # that, `quiet` seconds without data mean the stream has been read to its end.
    s.settimeout(max(quiet, 20.0))
    buf = b""
    try:
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            buf += b
            if buf.count(b"\n") >= 2:  # the acknowledgement and at least one event
                s.settimeout(quiet)
    except socket.timeout:
        pass
    s.close()
    lines = [json.loads(x) for x in buf.split(b"\n") if x.strip()]
    assert lines and lines[0].get("ok"), lines[:1]
    return [x["event"] for x in lines[1:]]


def test_kill9_loses_nothing_acknowledged():
    import random
    hub = Hub()
    devs = [(f"k9-{i}", hub.key(hub.device(f"k9-{i}"))) for i in range(4)]
    acked = set()
    sent = [0]
    lock = threading.Lock()
    clients = []
    stop = threading.Event()

    def run(dev_id, key):
        c = mqtt.Client(client_id=dev_id, clean_session=False, protocol=mqtt.MQTTv311)
        c.username_pw_set(username(dev_id), sas(dev_id, key))
        c.tls_set(ca_certs=hub.ca)
        c.max_inflight_messages_set(16)
        pending = {}
        early = set()  # PUBACKs that arrived before publish() returned the mid

        def on_publish(cl, u, mid):
            with lock:
                if mid in pending:
                    acked.add(pending.pop(mid))
                else:
                    early.add(mid)
        c.on_publish = on_publish
        c.connect("127.0.0.1", hub.mport_mqtt, 60)
        c.loop_start()
        clients.append(c)
        n = 0
        while not stop.is_set():
            tag = f"{dev_id}#{n}"
            # Not under our lock: paho calls on_publish holding its own locks.
            info = c.publish(f"devices/{dev_id}/messages/events/", tag.encode(), qos=1)
            with lock:
                if info.mid in early:
                    early.discard(info.mid)
                    acked.add(tag)
                else:
                    pending[info.mid] = tag
            n += 1
            with lock:
                sent[0] += 1
            if len(pending) > 64:
                time.sleep(0.002)
    threads = [threading.Thread(target=run, args=dk, daemon=True) for dk in devs]
    for t in threads:
        t.start()
    time.sleep(random.uniform(1.0, 2.5))
    hub.daemon.signal(signal.SIGKILL)
    hub.daemon.proc.wait()
    stop.set()
    for t in threads:
        t.join(10)
    for c in clients:
        c.loop_stop()
    with lock:
        acked_now = set(acked)
    assert len(acked_now) > 100, f"only {len(acked_now)} messages were acknowledged before the kill"
    assert sent[0] > len(acked_now), "the kill must land mid-stream"
    # Restart on the same state directory and read the events stream from its start.
    hub.daemon = Daemon(hub.cfg)
    hub.daemon.wait_log(r"MQTT listening on")
    events = read_all_events(hub, quiet=2.0)
    stored = set()
    for e in events:
        if e["properties"]["system"].get("iothub-message-source") == "Telemetry":
            stored.add(e["payload"] if isinstance(e["payload"], str) else json.dumps(e["payload"]))
    lost = acked_now - stored
    assert not lost, f"{len(lost)} acknowledged messages lost, e.g. {sorted(lost)[:5]}"
    print(f"   {len(acked_now)} acknowledged, {len(stored)} stored, 0 lost", flush=True)
    hub.finish()


def test_throttling_shapes_traffic():
    hub = Hub("    max_messages_per_second: 20\n")
    key = hub.key(hub.device("fl"))
    cl = connect(hub, "fl", key)
    t0 = time.monotonic()
    infos = [cl.c.publish("devices/fl/messages/events/", b"x", qos=1) for _ in range(80)]
    for i in infos:
        i.wait_for_publish(20)
    took = time.monotonic() - t0
    assert all(i.is_published() for i in infos)
    assert took >= 2.5, f"80 messages at 20/s took only {took:.2f}s"
    assert not cl.disconnected.is_set()
    assert re.search(r"device fl sends more than 20 messages/s; slowing it down", hub.daemon.log())
    cl.close()
    hub.finish()


def test_metrics():
    hub = Hub()
    key = hub.key(hub.device("mt"))
    cl = connect(hub, "mt", key)
    cl.c.publish("devices/mt/messages/events/", b"x", qos=1).wait_for_publish(10)
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", hub.mport, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    assert re.search(r'^fieldhub_connections\{protocol="mqtt"\} 1$', text, re.M), text
    assert re.search(r'^fieldhub_messages_in_total\{protocol="mqtt"\} 1$', text, re.M), text
    cl.close()
    hub.finish()


if __name__ == "__main__":
    main([test_example_session_bytes, test_connect_codes_and_quirks, test_telemetry_properties_and_will,
          test_bad_input_closes_only_that_connection, test_connections_that_never_finish_tls,
          test_c2d_offline_redelivery_and_takeover,
          test_revocation_within_one_second, test_keepalive_and_token_expiry, test_methods_and_twin_errors,
          test_x509, test_kill9_loses_nothing_acknowledged, test_throttling_shapes_traffic, test_metrics])
