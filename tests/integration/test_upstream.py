#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The `upstream` endpoint (local devices connect to a cloud IoT hub as themselves).

1. Against mosquitto configured like IoT Hub (TLS on loopback with a CA made here, one ACL per
   device user name that allows only its IoT Hub topics): the client ids, user names and
   topics fieldhub uses, seen in mosquitto's log and by a Python subscriber on `#` and
   `$iothub/#` (a user the ACL lets read everything), and that nothing it sends is denied.
2. Against a second fieldhubd playing the cloud (own state dir, config, fixed ports): the
   SAS tokens are checked there exactly as IoT Hub checks them; routing to upstream; a cloud
   outage while 10,000 messages arrive, then every message delivered in order per device
   (counted in the cloud's event stream through its admin socket, `after: 0`); kill -9 of the
   gateway during the drain, restart, nothing lost; C2D from the cloud to an offline local
   device, delivered when it connects to the gateway; a direct method from the cloud's
   service API to a local MQTT device and back (and 404 DeviceNotOnline when it is offline);
   desired properties changed in the cloud while the gateway was down, applied on reconnect;
   reported properties sent up.
3. C2D durability: a C2D message the gateway acknowledged survives a kill -9 while its store
   cannot commit (write-locked by another process): it was in the endpoint's spool before the
   PUBACK, and is queued at the next start; the same message id again is dropped; a store
   busy for longer than its timeout leaves the message in the spool, queued again 5 s later.
4. Drain after an outage with retry.max 10 s: the reachability probe reconnects the devices
   as soon as the cloud listens again (the first message within 1 s, not up to 10 s).
5. The same for an `mqtt` endpoint (the framework's probe, uplink.c) to a plain mosquitto:
   the first message is confirmed well within a second of the broker listening again
   (asserted < 1 s, the figure is printed: ~0.03 s under ASan), and a broker
   that refuses the CONNACK is still retried with backoff (not at the probe's pace).
6. The far side going away three times during a drain of 20,000 messages (a TCP proxy the
   test takes down and up), for an `mqtt` endpoint and for `upstream`: every message arrives
   and the first deliveries are in order per device, with nothing of a lost connection (paho
   keeps its unsent publishes) sent ahead of the resend.

Every process is stopped by pid; every wait is bounded."""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

try:
    import paho.mqtt.client as mqtt  # noqa: F401
except ImportError:
    if sys.executable != "/usr/bin/python3" and os.path.exists("/usr/bin/python3"):
        os.execv("/usr/bin/python3", ["/usr/bin/python3"] + sys.argv)
    print("python3-paho-mqtt is not installed", file=sys.stderr)
    sys.exit(77)

import paho.mqtt.client as mqtt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_api  # noqa: E402
import test_mqtt  # noqa: E402
from fhlib import Daemon, at_exit, main, tmpdir, write  # noqa: E402

MOSQUITTO = "/usr/sbin/mosquitto"
CLOUD = test_api.HOST          # the cloud hub's name (gw.test.local)
EDGE = "edge.test.local"       # the gateway's own name
UA = "?api-version=2021-04-12&DeviceClientType=fieldhub%2F0.1"
KEYS = {"dev1": base64.b64encode(bytes(range(40, 72))).decode(),
        "dev2": base64.b64encode(bytes(range(80, 112))).decode(),
        "dev3": base64.b64encode(bytes(range(120, 152))).decode()}   # not created in the cloud


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_for(fn, timeout=20, what="condition"):
    return test_mqtt.wait_for(fn, timeout=timeout, what=what)


def admin_request(d, req, timeout=10):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(f"{d}/admin.sock")
    s.sendall(json.dumps(req).encode() + b"\n")
    return s


def events(d, done=None, timeout=30):
    """Every telemetry event the hub in d still holds (monitor-events with after = 0), read
    until done(events) is true or, without done, until the stream is quiet for a second."""
    s = admin_request(d, {"cmd": "monitor-events", "args": {"after": 0}})
    buf, out = b"", []
    end = time.monotonic() + timeout
    first = True
    s.settimeout(1.0)
    while time.monotonic() < end:
        try:
            chunk = s.recv(1 << 20)
        except socket.timeout:
            if done is None:
                break
            continue
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            j = json.loads(line)
            if first:
                first = False
                assert j.get("ok"), j
                continue
            ev = j["event"]
            if ev["properties"]["system"].get("iothub-message-source", "Telemetry") == "Telemetry":
                out.append(ev)
        if done and done(out):
            break
    s.close()
    return out


# ---- the cloud: a second fieldhubd ----------------------------------------------------------

class Cloud:
    def __init__(self):
        self.d = tmpdir()
        self.port, self.mport = free_port(), free_port()
        text = test_api.config(self.d, test_mqtt.mqtt_extra())
        text = text.replace('service_api:\n  listen: ["127.0.0.1:0"]',
                            f'service_api:\n  listen: ["127.0.0.1:{self.port}"]')
        text = text.replace('mqtt:\n  listen: ["127.0.0.1:0"]', f'mqtt:\n  listen: ["127.0.0.1:{self.mport}"]')
        text = text.replace("max_queue_depth: 3", "max_queue_depth: 50")
        self.cfg = write(f"{self.d}/fieldhub.yaml", text)
        self.ca = f"{self.d}/state/ca.crt"
        self.daemon = None
        self.start()
        import ssl
        self.ctx = ssl.create_default_context(cafile=self.ca)
        for dev, key in KEYS.items():
            if dev == "dev3":
                continue
            st, _, body = self.req("PUT", f"/devices/{dev}",
                                   {"deviceId": dev, "authentication": {"type": "sas", "symmetricKey": {
                                       "primaryKey": key, "secondaryKey": key}}})
            assert st == 200, body

    def start(self):
        self.daemon = Daemon(self.cfg)
        self.daemon.wait_log(r"MQTT listening on", timeout=20)

    def stop(self):
        rc, _ = self.daemon.stop()
        log = self.daemon.log()
        assert rc == 0 and "Sanitizer" not in log and "runtime error" not in log, log[-3000:]

    def req(self, method, path, body=None):
        import http.client
        c = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=60)
        c.request(method, path + "?api-version=" + test_api.VERSION,
                  body=json.dumps(body) if body is not None else None,
                  headers={"Authorization": test_api.token(), "Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, dict(r.getheaders()), json.loads(data) if data else None


class Gateway:
    def __init__(self, cloud, extra_routes="", extra_ep="", devices=("dev1", "dev2"),
                 retry="{initial: 100ms, max: 1s}", extra_endpoints="", cloud_port=None):
        self.d = tmpdir()
        self.cloud = cloud
        for dev, key in KEYS.items():
            write(f"{self.d}/{dev}.key", key + "\n")
        devs = "".join(f"      - {{id: {dev}, key_file: {self.d}/{dev}.key}}\n" for dev in devices)
        text = test_api.config(self.d, test_mqtt.mqtt_extra() + f"""endpoints:
  - name: cloud
    type: upstream
    host_name: {CLOUD}
    gateway_host: 127.0.0.1
    port: {cloud_port or cloud.mport}
    tls: {{ca_file: {cloud.ca}}}
    retry: {retry}
    queue: {{max_messages: 200000}}
{extra_ep}    devices:
{devs}{extra_endpoints}routes:
  - name: up
    condition: "true"
    endpoint: cloud
  - name: reported
    source: TwinChangeEvents
    endpoint: cloud
{extra_routes}""")
        text = text.replace(f"host_name: {CLOUD}\n  host_aliases", f"host_name: {EDGE}\n  host_aliases")
        self.cfg = write(f"{self.d}/fieldhub.yaml", text)
        self.daemon = None
        self.start()

    def start(self):
        self.runs = getattr(self, "runs", 0) + 1
        self.daemon = Daemon(self.cfg, stderr_file=f"{self.cfg}.{self.runs}.stderr")
        self.daemon.wait_log(r"MQTT listening on", timeout=20)
        self.mport_mqtt = int(re.search(r"MQTT listening on \S+ \(port (\d+), TLS\)", self.daemon.log()).group(1))
        self.ca = f"{self.d}/state/ca.crt"

    def stop(self):
        rc, _ = self.daemon.stop()
        log = self.daemon.log()
        assert rc == 0 and "Sanitizer" not in log and "runtime error" not in log, log[-3000:]

    def device(self, dev, **kw):
        """A local device on the gateway's MQTT, with the same key as upstream."""
        cl = test_mqtt.Client(self, dev, test_mqtt.sas(dev, KEYS[dev], host=EDGE),
                              user=test_mqtt.username(dev, host=EDGE), **kw)
        assert cl.wait_connect() == 0, cl.rc
        return cl

    def endpoint(self, name="cloud"):
        out = subprocess.run([test_mqtt.FIELDHUBCTL, "--socket", f"{self.d}/admin.sock", "--json", "endpoints"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return {e["name"]: e for e in json.loads(out.stdout)}[name]


def publish_many(cl, dev, n, start=0, props=""):
    infos = []
    for i in range(start, start + n):
        infos.append(cl.c.publish(f"devices/{dev}/messages/events/n={i}{props}", b'{"i": %d}' % i, qos=1))
        if len(infos) >= 500:
            for x in infos:
                x.wait_for_publish(30)
                assert x.is_published()
            infos = []
    for x in infos:
        x.wait_for_publish(30)
        assert x.is_published()


def check_order(evs, devs_counts):
    per = {}
    for ev in evs:
        n = ev["properties"]["application"].get("n")
        if n is None:
            continue
        per.setdefault(ev["origin"], []).append(int(n))
    for dev, count in devs_counts.items():
        got = per.get(dev, [])
        # At-least-once: duplicates possible after a kill -9, but in order and nothing missing.
        dedup = []
        for x in got:
            if not dedup or x > dedup[-1]:
                dedup.append(x)
            else:
                assert x <= dedup[-1], (dev, x)
        assert dedup == list(range(count)), (dev, len(got), len(dedup), dedup[:5], dedup[-5:])
    return per


def test_cloud():
    cloud = Cloud()
    gw = Gateway(cloud)
    gw.daemon.wait_log(r"Upstream: dev1 connected to ssl://127.0.0.1:\d+ as gw.test.local", timeout=20)
    gw.daemon.wait_log(r"Upstream: dev2 connected", timeout=20)
    assert "created the local identity dev1 with its upstream key" in gw.daemon.log()

    # Routing to upstream: a local device's message arrives in the cloud as that device,
    # with its properties.
    c1 = gw.device("dev1")
    c1.c.publish("devices/dev1/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8&kind=hello",
                 b'{"t": 1}', qos=1).wait_for_publish(10)
    evs = wait_for(lambda: [e for e in events(cloud.d) if e["properties"]["application"].get("kind") == "hello"],
                   what="the first message in the cloud")
    ev = evs[0]
    assert ev["origin"] == "dev1" and ev["payload"] == {"t": 1}, ev
    assert ev["properties"]["system"]["content-type"] == "application/json", ev
    assert ev["properties"]["system"]["iothub-connection-device-id"] == "dev1", ev

    # Reported properties go up in order.
    c1.c.subscribe("$iothub/twin/res/#", 0)
    time.sleep(0.3)
    c1.c.publish("$iothub/twin/PATCH/properties/reported/?$rid=1", b'{"fw": "1.0"}', qos=0)
    c1.c.publish("$iothub/twin/PATCH/properties/reported/?$rid=2", b'{"fw": "1.1", "temp": 20}', qos=0)
    wait_for(lambda: (cloud.req("GET", "/twins/dev1")[2]["properties"]["reported"].get("fw") == "1.1"
                      and cloud.req("GET", "/twins/dev1")[2]["properties"]["reported"].get("temp") == 20),
             what="reported properties in the cloud")

    # A direct method from the cloud to the local MQTT device and back.
    c1.c.subscribe("$iothub/methods/POST/#", 0)
    time.sleep(0.3)

    def answer():
        m = c1.wait_msgs(1, timeout=20, pred=lambda m: m.topic.startswith("$iothub/methods/POST/reboot/"))[0]
        rid = m.topic.split("$rid=")[1]
        assert json.loads(m.payload) == {"delay": 5}, m.payload
        c1.c.publish(f"$iothub/methods/res/201/?$rid={rid}", b'{"ok": true}', qos=0)
    t = threading.Thread(target=answer)
    t.start()
    st, _, body = cloud.req("POST", "/twins/dev1/methods",
                            {"methodName": "reboot", "payload": {"delay": 5}, "responseTimeoutInSeconds": 10})
    t.join(30)
    assert st == 200 and body == {"status": 201, "payload": {"ok": True}}, (st, body)
    # dev2 is not online at the gateway: the gateway answers 404 DeviceNotOnline for it.
    st, _, body = cloud.req("POST", "/twins/dev2/methods", {"methodName": "ping", "responseTimeoutInSeconds": 5})
    assert st == 200 and body["status"] == 404 and body["payload"]["errorCode"] == 404103, (st, body)

    # C2D from the cloud to dev2, which is offline here: queued durably at the gateway,
    # delivered when dev2 connects (after a gateway restart too).
    import http.client
    c = http.client.HTTPSConnection("127.0.0.1", cloud.port, context=cloud.ctx, timeout=30)
    c.request("POST", f"/messages/devicebound/dev2?api-version={test_api.VERSION}", body=b"open valve",
              headers={"Authorization": test_api.token(), "iothub-app-cmd": "open", "iothub-messageid": "m-1"})
    r = c.getresponse()
    r.read()
    c.close()
    assert r.status == 200, r.status
    # The cloud's queue empties only once the gateway acknowledged it (after its spool fsync).
    wait_for(lambda: cloud.req("GET", "/devices/dev2")[2].get("cloudToDeviceMessageCount") == 0, timeout=20,
             what="the C2D message to leave the cloud")
    time.sleep(0.5)
    gw.stop()
    gw.start()
    c2 = gw.device("dev2")
    c2.c.subscribe("devices/dev2/messages/devicebound/#", 1)
    try:
        m = c2.wait_msgs(1, timeout=20)[0]
    except AssertionError:
        print(open(f"{gw.cfg}.1.stderr").read()[-5000:], open(f"{gw.cfg}.2.stderr").read()[-5000:], file=sys.stderr)
        raise
    assert m.payload == b"open valve" and "cmd=open" in m.topic and "%24.mid=m-1" in m.topic, m.topic
    c2.close()
    c1 = gw.device("dev1")

    # Desired properties changed in the cloud while the gateway is down: applied on
    # reconnect, and the local device sees the patch.
    st, _, body = cloud.req("PATCH", "/twins/dev1", {"properties": {"desired": {"mode": "eco", "gone": 1}}})
    assert st == 200, body
    wait_for(lambda: json.loads(subprocess.run(
        [test_mqtt.FIELDHUBCTL, "--socket", f"{gw.d}/admin.sock", "--json", "twin", "show", "dev1"],
        capture_output=True, text=True, timeout=30).stdout or "{}").get("properties", {}).get("desired", {})
        .get("gone") == 1, what="the live desired patch at the gateway")
    c1.close()
    gw.stop()
    st, _, body = cloud.req("PUT", "/twins/dev1", {"properties": {"desired": {"mode": "boost", "level": 3}}})
    assert st == 200, body
    gw.start()
    c1 = gw.device("dev1")
    c1.c.subscribe("$iothub/twin/PATCH/properties/desired/#", 0)
    c1.c.subscribe("$iothub/twin/res/#", 0)
    time.sleep(0.3)

    def local_desired():
        c1.c.publish("$iothub/twin/GET/?$rid=77", b"", qos=0)
        try:
            m = c1.wait_msgs(1, timeout=2, pred=lambda m: "$rid=77" in m.topic)[-1]
        except AssertionError:
            return None
        with c1.lock:
            c1.msgs = [x for x in c1.msgs if "$rid=77" not in x.topic]
        d = json.loads(m.payload)["desired"]
        return d if d.get("mode") == "boost" else None
    d = wait_for(local_desired, timeout=20, what="the cloud's desired properties at the gateway")
    assert d.get("level") == 3 and "gone" not in d, d

    # Outage: the cloud stops while 10,000 messages arrive; then all are delivered, in order
    # per device. kill -9 of the gateway during the drain loses nothing.
    cloud.stop()
    gw.daemon.wait_log(r"Upstream: dev1 cannot reach", timeout=20)
    c2 = gw.device("dev2")
    N = 5000
    t0 = time.monotonic()
    th = threading.Thread(target=publish_many, args=(c2, "dev2", N))
    th.start()
    publish_many(c1, "dev1", N)
    th.join(120)
    t_in = time.monotonic() - t0
    c1.close()
    c2.close()
    backlog = gw.endpoint()["backlog"]["count"]
    assert backlog >= 2 * N, gw.endpoint()
    cloud.start()
    t1 = time.monotonic()
    wait_for(lambda: gw.endpoint()["backlog"]["count"] < 2 * N, timeout=30, what="the drain to start")
    t_start = time.monotonic() - t1
    # Kill -9 of the gateway in the middle of the drain.
    t2 = time.monotonic()
    wait_for(lambda: gw.endpoint()["backlog"]["count"] <= N, timeout=60, what="half of the drain")
    left = gw.endpoint()["backlog"]["count"]
    rate = (2 * N - left) / (time.monotonic() - t2)
    gw.daemon.proc.kill()
    gw.daemon.proc.wait(10)
    gw.start()
    wait_for(lambda: gw.endpoint()["backlog"]["count"] == 0, timeout=120, what="the backlog to drain")
    t_drain = time.monotonic() - t1
    def complete(evs):
        last = {}
        for ev in evs:
            n = ev["properties"]["application"].get("n")
            if n is not None:
                last[ev["origin"]] = max(last.get(ev["origin"], -1), int(n))
        return last.get("dev1") == N - 1 and last.get("dev2") == N - 1
    evs = events(cloud.d, done=complete, timeout=60)
    per = check_order(evs, {"dev1": N, "dev2": N})
    dups = sum(len(v) for v in per.values()) - 2 * N
    print(f"upstream: {2 * N} messages in {t_in:.1f}s while the cloud was down; drain started "
          f"{t_start:.2f}s after the cloud returned (its devices reconnect with backoff, retry.max 1s); "
          f"drain rate {rate:.0f} msg/s until the kill -9 at {left} left; backlog empty {t_drain:.1f}s after "
          f"the cloud returned (restart included): {2 * N / t_drain:.0f} msg/s overall; {dups} duplicates",
          file=sys.stderr)
    gw.stop()
    for i in range(1, gw.runs + 1):
        log = open(f"{gw.cfg}.{i}.stderr").read()
        assert "Sanitizer" not in log and "runtime error" not in log, log[-3000:]
    cloud.stop()


# ---- mosquitto configured like IoT Hub -------------------------------------------------------

def make_certs(d):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.crt", "-days", "2", "-subj", "/CN=test CA"],
                   check=True, capture_output=True)
    write(f"{d}/ext.cnf", "subjectAltName=IP:127.0.0.1,DNS:gw.test.local\n")
    subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", f"{d}/srv.key", "-out", f"{d}/srv.csr", "-subj", "/CN=127.0.0.1"],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", f"{d}/srv.csr", "-CA", f"{d}/ca.crt", "-CAkey", f"{d}/ca.key",
                    "-CAcreateserial", "-out", f"{d}/srv.crt", "-days", "2", "-extfile", f"{d}/ext.cnf"],
                   check=True, capture_output=True)
    os.chmod(f"{d}/srv.key", 0o644)


def pump(a, b):
    """Copies a to b until either side ends, then shuts both down (their owner closes them)."""
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    for x in (a, b):
        try:
            x.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class ConnectSpy:
    """A TLS man in the middle the test controls (gateway -TLS-> spy -TLS-> mosquitto), which
    records each MQTT CONNECT's client id, user name and password (mosquitto cannot check SAS
    tokens, so the test checks what was sent)."""

    def __init__(self, d, target_port):
        import ssl
        self.target_port, self.connects, self.socks = target_port, [], []
        self.srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.srv_ctx.load_cert_chain(f"{d}/srv.crt", f"{d}/srv.key")
        self.cli_ctx = ssl.create_default_context(cafile=f"{d}/ca.crt")
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(16)
        self.port = self.ls.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        at_exit(self.close)

    def close(self):
        for x in [self.ls] + self.socks:
            try:
                x.close()
            except OSError:
                pass

    def _accept(self):
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _read_packet(s):
        hdr = s.recv(1)
        if not hdr:
            raise OSError("closed")
        mult, length, raw = 1, 0, b""
        while True:
            b = s.recv(1)
            raw += b
            length += (b[0] & 127) * mult
            mult *= 128
            if not b[0] & 128:
                break
        body = b""
        while len(body) < length:
            chunk = s.recv(length - len(body))
            if not chunk:
                raise OSError("closed")
            body += chunk
        return hdr + raw + body, body

    def _serve(self, c):
        try:
            t = self.srv_ctx.wrap_socket(c, server_side=True)
            pkt, body = self._read_packet(t)
            # CONNECT: protocol name, level, flags, keep-alive, then client id, user, password.
            pos = 2 + body[0] * 256 + body[1]
            flags = body[pos + 1]
            pos += 4

            def field():
                nonlocal pos
                n = body[pos] * 256 + body[pos + 1]
                v = body[pos + 2:pos + 2 + n]
                pos += 2 + n
                return v.decode()
            cid = field()
            user = field() if flags & 0x80 else None
            pw = field() if flags & 0x40 else None
            self.connects.append((cid, user, pw))
            u = self.cli_ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.target_port)),
                                         server_hostname="127.0.0.1")
            self.socks += [t, u]
            u.sendall(pkt)

            threading.Thread(target=pump, args=(u, t), daemon=True).start()
            pump(t, u)
        except (OSError, IndexError):
            c.close()


def check_sas(dev, token, ttl=3600):
    import hashlib
    import hmac
    import urllib.parse
    fields = dict(x.split("=", 1) for x in token[len("SharedAccessSignature "):].split("&"))
    assert token.startswith("SharedAccessSignature ") and set(fields) == {"sr", "sig", "se"}, token
    assert fields["sr"] == urllib.parse.quote(f"{CLOUD}/devices/{dev}", safe=""), fields["sr"]
    se = int(fields["se"])
    assert time.time() + ttl - 15 < se < time.time() + ttl + 5, (se, ttl)
    mac = hmac.new(base64.b64decode(KEYS[dev]), f"{fields['sr']}\n{se}".encode(), hashlib.sha256).digest()
    assert urllib.parse.unquote(fields["sig"]) == base64.b64encode(mac).decode(), token


def test_mosquitto():
    d = tmpdir()
    make_certs(d)
    tls_port, plain_port = free_port(), free_port()
    acl = "user observer\ntopic read #\ntopic read $iothub/#\n\n"
    for dev in ("dev1", "dev2"):
        acl += (f"user {CLOUD}/{dev}/{UA}\n"
                f"topic write devices/{dev}/messages/events/#\n"
                f"topic read devices/{dev}/messages/devicebound/#\n"
                "topic readwrite $iothub/twin/#\ntopic readwrite $iothub/methods/#\n\n")
    write(f"{d}/acl", acl, 0o644)
    # As root, mosquitto would drop to the mosquitto user, who cannot read this private directory.
    user = "user root\n" if os.geteuid() == 0 else ""
    cfg = write(f"{d}/mosquitto.conf", f"""{user}per_listener_settings false
allow_anonymous true
acl_file {d}/acl
log_dest file {d}/mosquitto.log
log_type all
connection_messages true
listener {tls_port} 127.0.0.1
cafile {d}/ca.crt
certfile {d}/srv.crt
keyfile {d}/srv.key
tls_version tlsv1.2
listener {plain_port} 127.0.0.1
""", 0o644)
    broker = subprocess.Popen([MOSQUITTO, "-c", cfg], stdout=subprocess.DEVNULL,
                              stderr=open(f"{d}/mosquitto.stderr", "wb"))

    def stop_broker():
        if broker.poll() is None:
            os.kill(broker.pid, signal.SIGTERM)
            broker.wait(10)
    at_exit(stop_broker)
    def up():
        try:
            socket.create_connection(("127.0.0.1", plain_port), 0.5).close()
            return True
        except OSError:
            return False
    try:
        wait_for(up, timeout=10, what="mosquitto")
    except AssertionError:
        print(open(f"{d}/mosquitto.stderr").read(), file=sys.stderr)
        raise

    seen, lock = [], threading.Lock()
    sub = mqtt.Client(client_id="observer", clean_session=True, protocol=mqtt.MQTTv311)
    sub.username_pw_set("observer")
    ready = threading.Event()
    sub.on_connect = lambda c, u, f, rc: (c.subscribe([("#", 1), ("$iothub/#", 0)]), ready.set())

    def on_msg(c, u, m):
        with lock:
            seen.append((m.topic, m.payload))
    sub.on_message = on_msg
    sub.connect("127.0.0.1", plain_port, 30)
    sub.loop_start()
    at_exit(sub.loop_stop)
    assert ready.wait(10)
    time.sleep(0.3)

    class FakeCloud:
        pass
    fc = FakeCloud()
    spy = ConnectSpy(d, tls_port)
    fc.mport, fc.ca = spy.port, f"{d}/ca.crt"
    gw = Gateway(fc, extra_ep="    token_ttl: 10s\n")
    wait_for(lambda: "Upstream: dev1 connected" in gw.daemon.log() and "Upstream: dev2 connected" in gw.daemon.log(),
             what="both devices connected to mosquitto")
    c1 = gw.device("dev1")
    publish_many(c1, "dev1", 20, props="&%24.ct=application%2Fjson")
    c1.c.publish("$iothub/twin/PATCH/properties/reported/?$rid=5", b'{"x": 1}', qos=0)
    got = wait_for(lambda: [t for t in list(seen) if t[0].startswith("devices/dev1/messages/events/")][:20]
                   if len([t for t in list(seen) if t[0].startswith("devices/dev1/messages/events/")]) >= 20 else None,
                   what="20 messages at mosquitto")
    # Only what a device may set: no $.cdid or other properties this hub stamped.
    for i, (topic, payload) in enumerate(got):
        assert topic == f"devices/dev1/messages/events/%24.ct=application%2Fjson&n={i}", topic
        assert payload == b'{"i": %d}' % i, payload
    # The twin GET after connecting and the reported patch (no IoT Hub answers them here).
    wait_for(lambda: any(t.startswith("$iothub/twin/PATCH/properties/reported/?$rid=r") and p == b'{"x":1}'
                         for t, p in list(seen)), what="the reported patch at mosquitto")
    assert any(re.match(r"\$iothub/twin/GET/\?\$rid=g\d+$", t) for t, p in list(seen)), seen[-5:]
    log = open(f"{d}/mosquitto.log").read()
    for dev in ("dev1", "dev2"):
        assert re.search(rf"New client connected from 127\.0\.0\.1:\d+ as {dev} \(p2, c1, k240, "
                         rf"u'{re.escape(CLOUD)}/{dev}/{re.escape(UA)}'\)", log), log[-3000:]
    assert "Denied" not in log, [x for x in log.splitlines() if "Denied" in x]
    # Client id = device id, user name {cloud host}/{id}/?api-version=..., password a SAS
    # token for {cloud host}/devices/{id} signed with the device's upstream key.
    first = list(spy.connects)
    assert sorted(c[0] for c in first) == ["dev1", "dev2"], first
    for cid, user, pw in first:
        assert user == f"{CLOUD}/{cid}/{UA}", user
        check_sas(cid, pw, ttl=10)
    # Token renewal at 80% of token_ttl (8 s): each device reconnects with a new token, and
    # what is published afterwards still arrives.
    wait_for(lambda: len(spy.connects) >= 4, timeout=15, what="the reconnects that renew the tokens")
    for cid, user, pw in spy.connects[2:]:
        check_sas(cid, pw, ttl=10)
        assert pw not in [x[2] for x in first], "the token was not renewed"
    assert "renewing the SAS token of dev1" in gw.daemon.log()
    c1.c.publish("devices/dev1/messages/events/after=renewal", b"x", qos=1).wait_for_publish(10)
    wait_for(lambda: any(t == "devices/dev1/messages/events/after=renewal" for t, p in list(seen)),
             what="a message after the renewal")
    c1.close()
    gw.stop()
    stop_broker()


def test_config_errors():
    d = tmpdir()
    write(f"{d}/bad.key", "not base64!\n")
    write(f"{d}/good.key", KEYS["dev1"] + "\n")

    def check(ep, *patterns):
        cfg = write(f"{d}/fieldhub.yaml", test_api.config(d, f"endpoints:\n  - name: cloud\n    type: upstream\n{ep}"))
        p = subprocess.run([test_api.FIELDHUBD, "--check-config", "--config", cfg], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 78, (p.returncode, p.stderr)
        for pat in patterns:
            assert re.search(pat, p.stderr), (pat, p.stderr)
    check("    host_name: nodots\n    devices: [{id: dev1, key_file: %s/good.key}]\n" % d,
          r"fieldhub\.yaml:\d+:\d+: .*host_name.*at least one dot")
    check("    host_name: hub.example.net\n", r"devices")
    check("    host_name: hub.example.net\n    devices: []\n", r"at least one device")
    check("    host_name: hub.example.net\n    devices: [{id: dev1, key_file: %s/bad.key}]\n" % d,
          r"key of device \"dev1\" is not the base64")
    check("    host_name: hub.example.net\n    devices: [{id: dev1, key_file: %s/good.key}, "
          "{id: dev1, key_file: %s/good.key}]\n" % (d, d), r"\"dev1\" again")
    check("    host_name: hub.example.net\n    gateway_host: \"h:1\"\n    topic: x\n"
          "    devices: [{id: dev1, key_file: %s/good.key}]\n" % d, r"gateway_host", r"topic")


def test_create_missing():
    """dev3 has no identity in the cloud: the cloud refuses it, the gateway creates it through
    the cloud's registry REST API with a policy key, then connects and sends."""
    cloud = Cloud()
    assert cloud.req("GET", "/devices/dev3")[0] == 404
    gw = Gateway(cloud, devices=("dev3",), extra_ep=f"    create_missing: {{policy: iothubowner, key_file: "
                                                    f"{cloud.d}/owner.key, port: {cloud.port}}}\n")
    gw.daemon.wait_log(r"the cloud refused dev3; creating its identity there \(policy iothubowner\)", timeout=20)
    gw.daemon.wait_log(r"created the identity of dev3 in the cloud", timeout=20)
    gw.daemon.wait_log(r"Upstream: dev3 (is )?connected", timeout=20)
    st, _, dev = cloud.req("GET", "/devices/dev3")
    assert st == 200 and dev["authentication"]["symmetricKey"]["primaryKey"] == KEYS["dev3"], dev
    c3 = gw.device("dev3")
    c3.c.publish("devices/dev3/messages/events/n=0", b"hi", qos=1).wait_for_publish(10)
    wait_for(lambda: [e for e in events(cloud.d) if e["origin"] == "dev3"], what="dev3's message in the cloud")
    c3.close()
    gw.stop()
    cloud.stop()


def send_c2d(cloud, dev, body, **headers):
    import http.client
    c = http.client.HTTPSConnection("127.0.0.1", cloud.port, context=cloud.ctx, timeout=30)
    h = {"Authorization": test_api.token()}
    h.update(headers)
    c.request("POST", f"/messages/devicebound/{dev}?api-version={test_api.VERSION}", body=body, headers=h)
    r = c.getresponse()
    r.read()
    c.close()
    assert r.status == 200, r.status


def test_c2d_durable():
    """A C2D message the gateway acknowledged to the cloud survives a kill -9 that comes while
    the local store cannot commit (its database write-locked by another process): the PUBACK
    leaves only once the message is fsync'ed in the endpoint's spool, and the next start
    queues it. The cloud offering the same message id again does not queue it twice."""
    import sqlite3
    cloud = Cloud()
    gw = Gateway(cloud)
    gw.daemon.wait_log(r"Upstream: dev2 connected", timeout=20)
    spool = f"{gw.d}/state/upstream-cloud.c2d"
    assert os.path.isdir(spool), spool
    db = sqlite3.connect(f"{gw.d}/state/fieldhub.db", isolation_level=None, timeout=10)
    db.execute("BEGIN IMMEDIATE")   # the gateway's commits wait (its busy timeout is 5 s)
    try:
        t0 = time.monotonic()
        send_c2d(cloud, "dev2", b"close valve", **{"iothub-app-cmd": "close", "iothub-messageid": "m-dur"})
        wait_for(lambda: cloud.req("GET", "/devices/dev2")[2].get("cloudToDeviceMessageCount") == 0, timeout=10,
                 what="the cloud to get the gateway's PUBACK")
        t_ack = time.monotonic() - t0
        gw.daemon.proc.kill()
        gw.daemon.proc.wait(10)
    finally:
        db.execute("ROLLBACK")
        db.close()
    files = os.listdir(spool)
    assert len(files) == 1 and files[0].endswith(".c2d"), files
    gw.start()
    gw.daemon.wait_log(r"queueing 1 cloud-to-device messages from the spool", timeout=20)
    wait_for(lambda: os.listdir(spool) == [], timeout=20, what="the spool to empty once queued")
    c2 = gw.device("dev2")
    c2.c.subscribe("devices/dev2/messages/devicebound/#", 1)
    m = c2.wait_msgs(1, timeout=20)[0]
    assert m.payload == b"close valve" and "cmd=close" in m.topic and "%24.mid=m-dur" in m.topic, m.topic
    # The same message id again (as the cloud does when our PUBACK was lost): dropped here.
    send_c2d(cloud, "dev2", b"close valve", **{"iothub-app-cmd": "close", "iothub-messageid": "m-dur"})
    gw.daemon.wait_log(r"the cloud sent C2D message m-dur again; already queued here, dropped", timeout=20)
    send_c2d(cloud, "dev2", b"open valve", **{"iothub-messageid": "m-2"})
    msgs = c2.wait_msgs(2, timeout=20)
    assert [x.payload for x in msgs] == [b"close valve", b"open valve"], [x.payload for x in msgs]
    # The store cannot commit for longer than its busy timeout (5 s): the enqueue fails, the
    # message stays in the spool and is queued again a few seconds later, without a restart.
    db = sqlite3.connect(f"{gw.d}/state/fieldhub.db", isolation_level=None, timeout=10)
    db.execute("BEGIN IMMEDIATE")
    try:
        send_c2d(cloud, "dev2", b"stalled", **{"iothub-messageid": "m-3"})
        wait_for(lambda: cloud.req("GET", "/devices/dev2")[2].get("cloudToDeviceMessageCount") == 0, timeout=10,
                 what="the cloud to get the gateway's PUBACK")
        gw.daemon.wait_log(r"cannot be queued here yet: .*; it stays in the spool", timeout=15)
    finally:
        db.execute("ROLLBACK")
        db.close()
    try:
        msgs = c2.wait_msgs(3, timeout=20)
    except AssertionError:
        print(gw.daemon.log()[-5000:], file=sys.stderr)
        raise
    assert [x.payload for x in msgs] == [b"close valve", b"open valve", b"stalled"], [x.payload for x in msgs]
    wait_for(lambda: os.listdir(spool) == [], timeout=20, what="the spool to empty once queued")
    c2.close()
    print(f"upstream C2D: the cloud had the gateway's PUBACK {t_ack:.2f}s after sending, with the local store "
          f"write-locked; kill -9, restart: queued from the spool and delivered", file=sys.stderr)
    gw.stop()
    for i in range(1, gw.runs + 1):
        log = open(f"{gw.cfg}.{i}.stderr").read()
        assert "Sanitizer" not in log and "runtime error" not in log, log[-3000:]
    cloud.stop()


def test_drain_after_outage():
    """retry.max 10 s: after a long outage the devices' next attempts are up to 10 s away, but
    the reachability probe (a TCP connect every 100 ms) brings them back at once: the first
    message reaches the cloud within 2 s of the cloud listening again (a few hundred ms: paho's
    receive thread is woken after the connect, paho-inbox.h, instead of noticing the new
    connection after its 1 s poll)."""
    cloud = Cloud()
    gw = Gateway(cloud, retry="{initial: 1s, max: 10s}")
    gw.daemon.wait_log(r"Upstream: dev1 connected", timeout=20)
    cloud.stop()
    gw.daemon.wait_log(r"Upstream: dev1 cannot reach", timeout=20)
    t_down = time.monotonic()
    c1 = gw.device("dev1")
    publish_many(c1, "dev1", 20)
    c1.close()
    # Attempts at about 1, 3, 7, 15 s, then 25 s after the outage began: come back in between.
    time.sleep(max(0.0, 16.5 - (time.monotonic() - t_down)))
    cloud.start()
    t_listen = time.monotonic()
    seen = {}

    def watch():   # when the gateway logs the probe's success and dev1's reconnection
        while len(seen) < 2 and time.monotonic() - t_listen < 15:
            log = gw.daemon.log()
            for key, pat in (("probe", "reachable again after"), ("connected", "dev1 is connected to")):
                if key not in seen and pat in log:
                    seen[key] = time.monotonic() - t_listen
            time.sleep(0.01)
    w = threading.Thread(target=watch)
    w.start()
    evs = events(cloud.d, done=lambda evs: len(evs) > 0, timeout=30)
    t_first = time.monotonic() - t_listen
    w.join(20)
    assert evs, "no message reached the cloud"
    line = re.search(r"upstream cloud reachable again after \d+\.\ds[^\n]*", gw.daemon.log())
    print(f"upstream drain after a {16.5:.1f}s outage with retry.max 10s: first message in the cloud "
          f"{t_first:.2f}s after it listened again (probe answered after {seen.get('probe', -1):.2f}s, dev1 "
          f"connected after {seen.get('connected', -1):.2f}s; {line.group(0) if line else 'no probe log'})",
          file=sys.stderr)
    assert line, "no 'reachable again' log line"
    # probe period 0.1 s + TLS + the twin GET and the first publish (under ASan on a loaded
    # machine): a few hundred ms; without the probe the next attempt is up to 10 s away,
    # without the wake-up of paho's receive thread about a second more. The issue's goal is
    # 1 s (0.11 s measured under ASan).
    assert t_first < 1.0, t_first
    evs = events(cloud.d, done=lambda evs: len(evs) >= 20, timeout=30)
    check_order(evs, {"dev1": 20})
    gw.stop()
    cloud.stop()


def sink_broker(d, port, refuse=False):
    """mosquitto on plain TCP; refuse: every client without a password is refused (CONNACK 5)."""
    user = "user root\n" if os.geteuid() == 0 else ""
    auth = f"allow_anonymous false\npassword_file {d}/passwd\n" if refuse else "allow_anonymous true\n"
    if refuse and not os.path.exists(f"{d}/passwd"):
        write(f"{d}/passwd", "", 0o644)
        subprocess.run(["mosquitto_passwd", "-b", f"{d}/passwd", "someone", "secret"], check=True,
                       capture_output=True, timeout=30)
        os.chmod(f"{d}/passwd", 0o644)
    log = f"{d}/sink-{'refuse' if refuse else 'open'}-{time.monotonic_ns()}.log"
    cfg = write(f"{d}/sink.conf", f"""{user}per_listener_settings false
{auth}persistence false
max_queued_messages 0
log_dest file {log}
log_type all
connection_messages true
listener {port} 127.0.0.1
""", 0o644)
    p = subprocess.Popen([MOSQUITTO, "-c", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    at_exit(lambda: p.poll() is None and (p.kill(), p.wait()))
    t0 = time.monotonic()
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return p, log, time.monotonic()
        except OSError:
            assert p.poll() is None, "mosquitto (sink) exited"
            assert time.monotonic() - t0 < 10, "mosquitto (sink) does not listen"
            time.sleep(0.002)


def stop_proc(p):
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def test_mqtt_endpoint_reconnect():
    """An `mqtt` endpoint with retry {initial: 5s, max: 10s} whose broker is away for 7 s: its
    attempts come about 3.75-6.25 s after the outage began and 7.5-10 s after that, so the
    next one would be at least 4.25 s away, but the framework's reachability probe (a TCP
    connect every 100 ms while the endpoint is down) reconnects it at once, and paho's receive
    thread is woken so that the connection does not wait for its 1 s poll: the first message is
    confirmed (PUBACK, cursor moved) within a second (tens of ms) of the broker listening again. Then a
    broker that refuses the connection (CONNACK 5): the probe answers from its first try, so
    the backoff stays (one attempt at once, the next about 5 s later), and the broker is not
    hammered (the probe alone would retry ten times a second)."""
    d = tmpdir()
    port = free_port()
    sink, _, _ = sink_broker(d, port)
    cloud = Cloud()
    gw = Gateway(cloud, extra_routes="  - {name: to-sink, condition: \"true\", endpoint: sink}\n",
                 extra_endpoints=f"""  - name: sink
    type: mqtt
    address: tcp://127.0.0.1:{port}
    topic: "sink/{{deviceId}}"
    retry: {{initial: 5s, max: 10s}}
""")
    wait_for(lambda: gw.endpoint("sink")["state"] == "up", timeout=20, what="the sink endpoint up")
    stop_proc(sink)
    gw.daemon.wait_log(r"Endpoint sink is unreachable", timeout=20)
    t_down = time.monotonic()
    c1 = gw.device("dev1")
    publish_many(c1, "dev1", 20)
    c1.close()
    wait_for(lambda: gw.endpoint("sink")["backlog"]["count"] >= 20, timeout=20, what="the sink backlog")
    d0 = gw.endpoint("sink")["delivered"]
    # Attempts at 3.75-6.25 s and then 7.5-10 s later: come back in between.
    time.sleep(max(0.0, 7.0 - (time.monotonic() - t_down)))
    sink, _, t_listen = sink_broker(d, port)
    t_first = None
    while time.monotonic() - t_listen < 20:
        e = gw.endpoint("sink")
        if e["delivered"] > d0:
            t_first = time.monotonic() - t_listen
            break
        time.sleep(0.01)
    assert t_first is not None, "nothing was delivered to the sink broker within 20 s"
    print(f"mqtt endpoint: first message confirmed {t_first:.3f}s after the broker listened again "
          f"(retry 5s..10s, outage 7s)", file=sys.stderr)
    assert "answers again; reconnecting now" in gw.daemon.log(), gw.daemon.log()[-3000:]
    # The issue's goal: the drain starts within a second of the far side's return (without
    # the probe, >= 4.25 s; without the waker of paho's receive thread, ~1.1 s).
    assert t_first < 1.0, t_first
    wait_for(lambda: gw.endpoint("sink")["backlog"]["count"] == 0, timeout=30, what="the sink drained")
    stop_proc(sink)

    # A broker that refuses: backed off, not retried at the probe's pace.
    wait_for(lambda: gw.endpoint("sink")["state"] != "up", timeout=20, what="the sink endpoint down")
    sink, log, t_listen = sink_broker(d, port, refuse=True)
    # 8 s: when the probe never failed (the broker came back before it ran), the first attempt
    # comes after the backoff: 5 s at most here, +25 % jitter. At the probe's pace (100 ms)
    # there would be dozens.
    time.sleep(8.0)
    text = open(log).read()
    refused = len(re.findall(r"not authori[sz]ed", text))
    conns = len(re.findall(r"New connection from", text))
    print(f"mqtt endpoint against a refusing broker: {refused} refused CONNECTs and {conns} TCP connections "
          f"in 8 s", file=sys.stderr)
    assert 1 <= refused <= 4, text[-3000:]
    assert gw.endpoint("sink")["state"] != "up"
    stop_proc(sink)
    gw.stop()
    cloud.stop()


class CutProxy:
    """A TCP forwarder on loopback in front of target_port that the test can take down (every
    current connection reset with SO_LINGER 0, the listening socket closed, so connections and
    the gateway's reachability probe are refused) and bring back on the same port."""

    def __init__(self, target_port):
        self.target_port, self.conns, self.lock = target_port, [], threading.Lock()
        self.accepted, self.ls = 0, None
        self.port = free_port()
        self.up()
        at_exit(self.down)

    def up(self):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(16)
        self.ls = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def down(self):
        import struct
        if self.ls:
            try:
                self.ls.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.ls.close()
            self.ls = None
        with self.lock:
            conns, self.conns = self.conns, []
        for x in conns:
            try:
                x.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                x.close()
            except OSError:
                pass

    def _accept(self, ls):
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target_port), 5)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns += [c, u]
                self.accepted += 1
            threading.Thread(target=pump, args=(c, u), daemon=True).start()
            threading.Thread(target=pump, args=(u, c), daemon=True).start()



def first_delivery_order(seq):
    """(first deliveries out of order, distinct values) of a list of ints in arrival order."""
    seen, last, bad = set(), -1, 0
    for x in seq:
        if x in seen:
            continue
        seen.add(x)
        if x < last:
            bad += 1
        last = max(last, x)
    return bad, len(seen)


def cut_during_drain(proxy, delivered, n, what):
    """The far side goes away (proxy down) three times during a drain, after 10, 40 and 70 %
    of the backlog, for half a second each. Returns what was delivered before the first."""
    first = None
    for part in (10, 40, 70):
        wait_for(lambda: delivered() >= n * part // 100, timeout=60, what=f"{part} % of the drain to {what}")
        proxy.down()
        first = delivered() if first is None else first
        time.sleep(0.5)
        proxy.up()
    return first


def test_mqtt_endpoint_cut_backlog():
    """An `mqtt` endpoint whose broker goes away three times during a drain, with the window in
    flight and paho still holding publishes it had not written: after the reconnect nothing of
    the old connection goes out ahead of the resend from the cursor, so the broker's
    subscriber sees every message, and the first delivery of each in order. (paho keeps a
    client's queued publishes across a lost connection; every connection therefore gets a new
    paho client, paho-inbox.h.)"""
    n = 20000
    d = tmpdir()
    port = free_port()
    sink, _, _ = sink_broker(d, port)
    got, lock = [], threading.Lock()
    sub = mqtt.Client(client_id="order-watch", clean_session=True, protocol=mqtt.MQTTv311)
    ready = threading.Event()
    sub.on_connect = lambda c, u, f, rc: (c.subscribe("sink/#", 1), ready.set())

    def on_msg(c, u, m):
        with lock:
            got.append(json.loads(m.payload)["i"])
    sub.on_message = on_msg
    sub.connect("127.0.0.1", port, 30)
    sub.loop_start()
    at_exit(sub.loop_stop)
    assert ready.wait(10)
    proxy = CutProxy(port)
    cloud = Cloud()
    gw = Gateway(cloud, extra_routes="  - {name: to-sink, condition: \"true\", endpoint: sink}\n",
                 extra_endpoints=f"""  - name: sink
    type: mqtt
    address: tcp://127.0.0.1:{proxy.port}
    topic: "sink/{{deviceId}}"
    retry: {{initial: 100ms, max: 1s}}
""")
    wait_for(lambda: gw.endpoint("sink")["state"] == "up", timeout=20, what="the sink endpoint up")
    proxy.down()
    c1 = gw.device("dev1")
    publish_many(c1, "dev1", n)
    c1.close()
    proxy.up()
    at = cut_during_drain(proxy, lambda: len(got), n, "the sink")
    wait_for(lambda: gw.endpoint("sink")["backlog"]["count"] == 0, timeout=60, what="the sink drained")
    wait_for(lambda: first_delivery_order(list(got))[1] == n, timeout=30, what="every message at the subscriber")
    with lock:
        bad, distinct = first_delivery_order(got)
        total = len(got)
    print(f"mqtt endpoint cut during a drain: {at} delivered before the cut, {total} deliveries in all, "
          f"{distinct} distinct, {bad} first deliveries out of order; {proxy.accepted} connections", file=sys.stderr)
    assert proxy.accepted >= 2, "the endpoint did not reconnect through the proxy"
    assert bad == 0, f"{bad} first deliveries out of order"
    gw.stop()
    cloud.stop()
    stop_proc(sink)


def test_upstream_cut_backlog():
    """The same for the `upstream` endpoint: the cloud (a TCP proxy in front of its MQTT port,
    TLS end to end) goes away three times during dev1's drain; the cloud's event
    stream then holds every message of dev1, first deliveries in order."""
    n = 20000
    cloud = Cloud()
    proxy = CutProxy(cloud.mport)
    gw = Gateway(cloud, devices=("dev1",), cloud_port=proxy.port)
    gw.daemon.wait_log(r"Upstream: dev1 connected to", timeout=20)
    proxy.down()
    c1 = gw.device("dev1")
    publish_many(c1, "dev1", n)
    c1.close()
    proxy.up()
    at = cut_during_drain(proxy, lambda: n - gw.endpoint("cloud")["backlog"]["count"], n, "the cloud")
    wait_for(lambda: gw.endpoint("cloud")["backlog"]["count"] == 0, timeout=60, what="the cloud endpoint drained")
    evs = events(cloud.d, done=lambda evs: len({e["properties"]["application"]["n"] for e in evs}) >= n,
                 timeout=30)
    ns = [int(e["properties"]["application"]["n"]) for e in evs if e["origin"] == "dev1"]
    bad, distinct = first_delivery_order(ns)
    print(f"upstream cut during a drain: about {at} confirmed before the cut, {len(ns)} events, {distinct} distinct, "
          f"{bad} first deliveries out of order; {proxy.accepted} connections", file=sys.stderr)
    assert proxy.accepted >= 2, "dev1 did not reconnect through the proxy"
    assert distinct == n and bad == 0, (distinct, bad)
    check_order(evs, {"dev1": n})
    gw.stop()
    cloud.stop()

if __name__ == "__main__":
    tests = [test_config_errors, test_mosquitto, test_cloud, test_create_missing, test_c2d_durable,
             test_drain_after_outage, test_mqtt_endpoint_reconnect, test_mqtt_endpoint_cut_backlog,
             test_upstream_cut_backlog]
    if len(sys.argv) > 1:
        tests = [t for t in tests if t.__name__ in sys.argv[1:]]
    main(tests)
