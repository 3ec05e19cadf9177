#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The service REST API over TLS (reference §5): every route, the error format and codes,
authorisation per route, If-Match, twins, query paging over a seeded registry, C2D and
feedback through the REST routes, methods to an offline device, malformed HTTP, metrics."""

import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(__file__))
from fhlib import FIELDHUBD, Daemon, main, tmpdir, write  # noqa: E402

HOST = "gw.test.local"
VERSION = "2021-04-12"
OWNER_KEY = base64.b64encode(bytes(range(32))).decode()
SERVICE_KEY = base64.b64encode(bytes(range(1, 33))).decode()
READ_KEY = base64.b64encode(bytes(range(2, 34))).decode()


def token(policy="iothubowner", key=OWNER_KEY, se=None, sr=HOST, sig=None):
    se = int(time.time()) + 3600 if se is None else se
    sr_enc = urllib.parse.quote(sr, safe="")
    mac = hmac.new(base64.b64decode(key), f"{sr_enc}\n{se}".encode(), hashlib.sha256).digest()
    s = sig or base64.b64encode(mac).decode()
    t = f"SharedAccessSignature sr={sr_enc}&sig={urllib.parse.quote(s, safe='')}&se={se}"
    return t + (f"&skn={policy}" if policy else "")


def config(d, extra=""):
    write(f"{d}/owner.key", OWNER_KEY + "\n")
    write(f"{d}/service.key", SERVICE_KEY + "\n")
    write(f"{d}/read.key", READ_KEY + "\n")
    return f"""hub:
  host_name: {HOST}
  host_aliases: [alias.test.local]
  policies:
    - name: iothubowner
      key_file: {d}/owner.key
    - name: service
      key_file: {d}/service.key
    - name: registryRead
      key_file: {d}/read.key
state_dir: {d}/state
log:
  level: info
  target: stderr
admin:
  socket: {d}/admin.sock
service_api:
  listen: ["127.0.0.1:0"]
  limits:
    request_timeout: 2s
    idle_timeout: 20s
    max_header_bytes: 8KiB
    max_body_bytes: 256KiB
metrics:
  listen: "127.0.0.1:0"
c2d:
  max_queue_depth: 3
{extra}"""


class Hub:
    def __init__(self, extra="", edit=None):
        self.d = tmpdir()
        text = config(self.d, extra)
        self.cfg = write(f"{self.d}/fieldhub.yaml", edit(text) if edit else text)
        self.daemon = Daemon(self.cfg)
        self.daemon.wait_log(r"Metrics endpoint listening")
        log = self.daemon.log()
        self.port = int(re.search(r"Service API listening on \S+ \(port (\d+), TLS\)", log).group(1))
        self.mport = int(re.search(r"Metrics endpoint listening on \S+ \(port (\d+)", log).group(1))
        self.ca = f"{self.d}/state/ca.crt"
        self.ctx = ssl.create_default_context(cafile=self.ca)
        self.ctx.check_hostname = True
        self._conn = None

    def finish(self):
        """Stops the daemon with SIGTERM: it must exit 0, with no sanitizer report."""
        if self._conn:
            self._conn.close()
            self._conn = None
        rc, secs = self.daemon.stop()
        log = self.daemon.log()
        assert "Sanitizer" not in log and "runtime error" not in log, log[-4000:]
        assert rc == 0, f"fieldhubd exited {rc}:\n{log[-3000:]}"

    def conn(self):
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=30)

    def req(self, method, path, body=None, headers=None, tok=None, version=VERSION, raw=False):
        """One request on a kept-alive connection; returns (status, headers dict, parsed body)."""
        h = {"Authorization": tok if tok is not None else token()}
        if tok == "":
            del h["Authorization"]
        if headers:
            h.update(headers)
        if version is not None:
            path += ("&" if "?" in path else "?") + "api-version=" + version
        data = None
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            if isinstance(data, str):
                data = data.encode()
            h.setdefault("Content-Type", "application/json; charset=utf-8")
        for attempt in range(2):
            if self._conn is None:
                self._conn = self.conn()
            try:
                self._conn.request(method, path, body=data, headers=h)
                r = self._conn.getresponse()
                payload = r.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._conn = None
                if attempt:
                    raise
        hdrs = {k.lower(): v for k, v in r.getheaders()}
        if r.getheader("Connection", "").lower() == "close":
            self._conn = None
        if raw or not payload:
            return r.status, hdrs, payload
        if "json" in hdrs.get("content-type", ""):
            return r.status, hdrs, json.loads(payload)
        return r.status, hdrs, payload.decode()

    def raw(self, data, read_timeout=5.0):
        """Sends raw bytes over TLS and returns everything read until close or timeout."""
        s = socket.create_connection(("127.0.0.1", self.port))
        t = self.ctx.wrap_socket(s, server_hostname=HOST)
        t.settimeout(read_timeout)
        t.sendall(data)
        out = b""
        try:
            while True:
                b = t.recv(65536)
                if not b:
                    break
                out += b
        except (socket.timeout, ssl.SSLError, ConnectionResetError):
            pass
        t.close()
        return out


def expect_error(resp, status, name):
    st, h, body = resp
    assert st == status, f"expected {status} {name}, got {st} {body}"
    assert h.get("iothub-errorcode") == name, f"expected iothub-errorcode {name}, got {h}"
    assert body["Message"].startswith(f"ErrorCode:{name};"), body
    assert body["ExceptionMessage"].startswith("Tracking ID:"), body
    assert h["content-type"] == "application/json; charset=utf-8"
    return body["Message"]


# ---- identity registry ----------------------------------------------------------------


def test_device_crud():
    hub = Hub()
    st, h, dev = hub.req("PUT", "/devices/dev1", {"deviceId": "dev1"}, headers={"Request-Id": "rid-1"})
    assert st == 200, dev
    assert h["request-id"] == "rid-1"
    assert dev["deviceId"] == "dev1" and dev["status"] == "enabled"
    assert len(base64.b64decode(dev["authentication"]["symmetricKey"]["primaryKey"])) >= 16
    assert h["etag"] == f'"{dev["etag"]}"'
    etag = dev["etag"]

    expect_error(hub.req("PUT", "/devices/dev1", {"deviceId": "dev1"}), 409, "DeviceAlreadyExists")
    st, _, got = hub.req("GET", "/devices/dev1")
    assert st == 200 and got["generationId"] == dev["generationId"]

    body = {"deviceId": "dev1", "status": "disabled", "statusReason": "maintenance"}
    expect_error(hub.req("PUT", "/devices/dev1", body, headers={"If-Match": '"bm9wZQ=="'}), 412, "PreconditionFailed")
    st, h, upd = hub.req("PUT", "/devices/dev1", body, headers={"If-Match": f'"{etag}"'})
    assert st == 200 and upd["status"] == "disabled" and upd["etag"] != etag, upd
    # Keys kept when the update leaves them empty.
    assert upd["authentication"]["symmetricKey"]["primaryKey"] == dev["authentication"]["symmetricKey"]["primaryKey"]
    st, _, upd = hub.req("PUT", "/devices/dev1", {"deviceId": "dev1", "status": "enabled"}, headers={"If-Match": "*"})
    assert st == 200 and upd["status"] == "enabled"
    expect_error(hub.req("PUT", "/devices/nope", {"deviceId": "nope"}, headers={"If-Match": "*"}), 404, "DeviceNotFound")

    # Bad bodies.
    expect_error(hub.req("PUT", "/devices/dev2", {"deviceId": "other"}), 400, "ArgumentInvalid")
    m = expect_error(hub.req("PUT", "/devices/dev2", {"deviceId": "dev2", "colour": "red"}), 400, "ArgumentInvalid")
    assert "colour" in m
    expect_error(hub.req("PUT", "/devices/dev2", b'{"deviceId": "dev2",'), 400, "IotHubFormatError")
    expect_error(hub.req("PUT", "/devices/dev2", {"deviceId": "dev2", "status": "sleepy"}), 400, "ArgumentInvalid")
    expect_error(hub.req("PUT", "/devices/dev2", b"x", headers={"Content-Type": "text/plain"}), 400,
                 "InvalidContentEncodingOrType")
    expect_error(hub.req("PUT", "/devices/bad%20id", {}), 400, "ArgumentInvalid")

    # List, statistics.
    for i in range(3):
        assert hub.req("PUT", f"/devices/list-{i}", {})[0] == 200
    st, _, lst = hub.req("GET", "/devices?top=2")
    assert st == 200 and len(lst) == 2, lst
    st, _, lst = hub.req("GET", "/devices")
    assert {x["deviceId"] for x in lst} == {"dev1", "list-0", "list-1", "list-2"}
    expect_error(hub.req("GET", "/devices?top=1001"), 400, "ArgumentInvalid")
    st, _, s = hub.req("GET", "/statistics/devices")
    assert s == {"totalDeviceCount": 4, "enabledDeviceCount": 4, "disabledDeviceCount": 0}, s
    st, _, s = hub.req("GET", "/statistics/service")
    assert st == 200 and s == {"connectedDeviceCount": 0}

    # Delete with If-Match.
    expect_error(hub.req("DELETE", "/devices/dev1", headers={"If-Match": '"bm9wZQ=="'}), 412, "PreconditionFailed")
    st, _, _ = hub.req("DELETE", "/devices/dev1", headers={"If-Match": "*"})
    assert st == 204
    expect_error(hub.req("GET", "/devices/dev1"), 404, "DeviceNotFound")
    expect_error(hub.req("DELETE", "/devices/dev1", headers={"If-Match": "*"}), 404, "DeviceNotFound")

    # Unknown route / method.
    expect_error(hub.req("GET", "/nothing/here"), 404, "NotFound")
    expect_error(hub.req("POST", "/twins/x"), 405, "MethodNotAllowed")
    hub.finish()



def test_bulk():
    hub = Hub()
    entries = [{"id": f"b-{i}", "importMode": "create"} for i in range(5)]
    st, _, res = hub.req("POST", "/devices", entries)
    assert st == 200 and res == {"isSuccessful": True, "errors": [], "warnings": []}, res
    st, h, res = hub.req("POST", "/devices", [{"id": "b-0", "importMode": "create"},
                                             {"id": "b-new", "importMode": "create"}])
    assert st == 400 and res["isSuccessful"] is False, res
    assert h["iothub-errorcode"] == "BulkRegistryOperationFailure"
    assert [(e["deviceId"], e["errorCode"], e["operation"]) for e in res["errors"]] == [("b-0", "DeviceAlreadyExists", "create")]
    assert hub.req("GET", "/devices/b-new")[0] == 200
    st, _, dev = hub.req("GET", "/devices/b-1")
    st, _, res = hub.req("POST", "/devices", [
        {"id": "b-1", "importMode": "updateIfMatchETag", "eTag": dev["etag"], "status": "disabled"},
        {"id": "b-2", "importMode": "updateIfMatchETag", "eTag": "bm9wZQ==", "status": "disabled"},
        {"id": "b-3", "importMode": "delete"},
        {"id": "b-missing", "importMode": "update"},
    ])
    assert st == 400
    assert sorted((e["deviceId"], e["errorCode"]) for e in res["errors"]) == [
        ("b-2", "PreconditionFailed"), ("b-missing", "DeviceNotFound")], res
    assert hub.req("GET", "/devices/b-1")[2]["status"] == "disabled"
    expect_error(hub.req("GET", "/devices/b-3"), 404, "DeviceNotFound")
    expect_error(hub.req("POST", "/devices", []), 400, "ArgumentInvalid")
    expect_error(hub.req("POST", "/devices", [{"id": f"x{i}", "importMode": "create"} for i in range(101)]), 400,
                 "ArgumentInvalid")
    expect_error(hub.req("POST", "/devices", [{"id": "x", "importMode": "create", "bogus": 1}]), 400, "ArgumentInvalid")
    st, _, res = hub.req("POST", "/devices", [{"id": "x", "importMode": "frobnicate"}])
    assert st == 400 and res["errors"][0]["errorCode"] == "ArgumentInvalid"
    hub.finish()


# ---- authorisation ----------------------------------------------------------------------



def test_auth_and_api_version():
    hub = Hub()
    assert hub.req("PUT", "/devices/a1", {})[0] == 200
    expect_error(hub.req("GET", "/devices/a1", tok=""), 401, "IotHubUnauthorized")
    bad_sig = base64.b64encode(b"\0" * 32).decode()
    expect_error(hub.req("GET", "/devices/a1", tok=token(sig=bad_sig)), 401, "IotHubUnauthorized")
    expect_error(hub.req("GET", "/devices/a1", tok=token(se=int(time.time()) - 3600)), 401, "IotHubUnauthorized")
    expect_error(hub.req("GET", "/devices/a1", tok=token(policy="nobody")), 401, "IotHubUnauthorized")
    expect_error(hub.req("GET", "/devices/a1", tok=token(sr="other.example.com")), 401, "IotHubUnauthorized")
    expect_error(hub.req("GET", "/devices/a1", tok="Bearer abc"), 401, "IotHubUnauthorized")
    # A device-key token is not a policy token.
    dev = hub.req("GET", "/devices/a1")[2]
    dtok = token(policy=None, key=dev["authentication"]["symmetricKey"]["primaryKey"], sr=f"{HOST}/devices/a1")
    expect_error(hub.req("GET", "/devices/a1", tok=dtok), 401, "IotHubUnauthorized")
    # The alias is accepted as the token's host.
    assert hub.req("GET", "/devices/a1", tok=token(sr="alias.test.local"))[0] == 200
    # Permissions per route.
    svc = token("service", SERVICE_KEY)
    rd = token("registryRead", READ_KEY)
    expect_error(hub.req("GET", "/devices/a1", tok=svc), 401, "IotHubUnauthorizedAccess")
    assert hub.req("GET", "/devices/a1", tok=rd)[0] == 200
    expect_error(hub.req("PUT", "/devices/a2", {}, tok=rd), 401, "IotHubUnauthorizedAccess")
    expect_error(hub.req("DELETE", "/devices/a1", headers={"If-Match": "*"}, tok=rd), 401, "IotHubUnauthorizedAccess")
    expect_error(hub.req("GET", "/twins/a1", tok=rd), 401, "IotHubUnauthorizedAccess")
    assert hub.req("GET", "/twins/a1", tok=svc)[0] == 200
    expect_error(hub.req("POST", "/devices/query", {"query": "SELECT * FROM devices"}, tok=rd), 401,
                 "IotHubUnauthorizedAccess")
    expect_error(hub.req("POST", "/messages/devicebound/a1", b"x", tok=rd), 401, "IotHubUnauthorizedAccess")
    # api-version.
    expect_error(hub.req("GET", "/devices/a1", version=None), 400, "InvalidProtocolVersion")
    expect_error(hub.req("GET", "/devices/a1", version="yesterday"), 400, "InvalidProtocolVersion")
    expect_error(hub.req("GET", "/devices/a1", version="2021-13-01"), 400, "InvalidProtocolVersion")
    for v in ("2016-11-14", "2020-10-01-preview", "2099-01-01"):
        assert hub.req("GET", "/devices/a1", version=v)[0] == 200, v
    log = hub.daemon.log()
    assert re.search(r"authentication failed from 127\.0\.0\.1:\d+: (bad signature|expired)", log), log
    assert "sig=" not in log and bad_sig not in log
    hub.finish()


# ---- twins ------------------------------------------------------------------------------



def metric(text, name):
    m = re.search(rf"^{re.escape(name)} (\d+)", text, re.M)
    return int(m.group(1)) if m else None


def test_twins():
    hub = Hub()
    assert hub.req("PUT", "/devices/t1", {})[0] == 200
    st, h, tw = hub.req("GET", "/twins/t1")
    assert st == 200 and tw["deviceId"] == "t1" and h["etag"] == f'"{tw["etag"]}"'
    v0, d0 = tw["version"], tw["properties"]["desired"]["$version"]
    # The lifecycle event of the create is appended asynchronously: wait for it.
    for _ in range(100):
        events0 = metric(hub.req("GET", "/metrics", version=None)[2], "fieldhub_events_appended_total")
        if events0 >= 1:
            break
        time.sleep(0.05)

    patch = {"tags": {"site": "x", "floor": {"n": 1}}, "properties": {"desired": {"rate": 5, "mode": "a"}}}
    st, h, tw = hub.req("PATCH", "/twins/t1", patch, headers={"If-Match": f'"{tw["etag"]}"'})
    assert st == 200, tw
    assert tw["tags"] == {"site": "x", "floor": {"n": 1}}
    assert tw["properties"]["desired"]["rate"] == 5 and tw["properties"]["desired"]["$version"] == d0 + 1
    assert tw["version"] > v0 and h["etag"] == f'"{tw["etag"]}"'
    etag = tw["etag"]
    # Merge and null deletion.
    st, _, tw = hub.req("PATCH", "/twins/t1", {"tags": {"floor": None}, "properties": {"desired": {"mode": None}}})
    assert st == 200 and tw["tags"] == {"site": "x"} and "mode" not in tw["properties"]["desired"], tw
    assert "rate" in tw["properties"]["desired"]["$metadata"]
    # Stale etag.
    expect_error(hub.req("PATCH", "/twins/t1", {"tags": {"a": 1}}, headers={"If-Match": f'"{etag}"'}), 412,
                 "PreconditionFailed")
    # Replace.
    st, _, tw = hub.req("PUT", "/twins/t1", {"tags": {"only": True}, "properties": {"desired": {"z": 1}}},
                        headers={"If-Match": "*"})
    assert st == 200 and tw["tags"] == {"only": True}, tw
    assert {k for k in tw["properties"]["desired"] if not k.startswith("$")} == {"z"}
    # Refused writes.
    m = expect_error(hub.req("PATCH", "/twins/t1", {"properties": {"reported": {"x": 1}}}), 400, "ArgumentInvalid")
    assert "reported" in m
    m = expect_error(hub.req("PATCH", "/twins/t1", {"tags": {"big": "x" * 4000, "big2": "y" * 4000, "big3": "z" * 1000}}),
                     400, "ArgumentInvalid")
    m = expect_error(hub.req("PATCH", "/twins/t1", {"tags": {"a.b": 1}}), 400, "ArgumentInvalid")
    assert "a.b" in m, m
    deep = cur = {}
    for i in range(12):
        cur["l"] = {}
        cur = cur["l"]
    expect_error(hub.req("PATCH", "/twins/t1", {"tags": deep}), 400, "ArgumentInvalid")
    expect_error(hub.req("PATCH", "/twins/t1", b"[1,"), 400, "IotHubFormatError")
    expect_error(hub.req("PATCH", "/twins/t1", {"bogus": 1}), 400, "ArgumentInvalid")
    expect_error(hub.req("PATCH", "/twins/nope", {"tags": {"a": 1}}), 404, "DeviceNotFound")
    expect_error(hub.req("GET", "/twins/nope"), 404, "DeviceNotFound")
    # The twin stayed as the last accepted write left it.
    st, _, tw2 = hub.req("GET", "/twins/t1")
    assert tw2["etag"] == tw["etag"] and tw2["tags"] == {"only": True}
    # Every accepted change produced a twin-change event (and the create a lifecycle event).
    events1 = metric(hub.req("GET", "/metrics", version=None)[2], "fieldhub_events_appended_total")
    assert events1 - events0 == 3, (events0, events1)
    hub.finish()


# ---- query ------------------------------------------------------------------------------



def test_query_paging_on_1000_devices():
    hub = Hub()
    n = 1050
    for start in range(0, n, 100):
        entries = [{"id": f"q-{i:05d}", "importMode": "create"} for i in range(start, min(n, start + 100))]
        st, _, res = hub.req("POST", "/devices", entries)
        assert st == 200, res
    for i in range(0, n, 21):  # 50 devices at site x
        assert hub.req("PATCH", f"/twins/q-{i:05d}", {"tags": {"site": "x", "i": i}})[0] == 200

    def run(q, page=None, limit=50):
        out, cont, pages = [], None, 0
        while pages < limit:
            h = {}
            if page:
                h["x-ms-max-item-count"] = str(page)
            if cont:
                h["x-ms-continuation"] = cont
            st, hh, rows = hub.req("POST", "/devices/query", {"query": q}, headers=h)
            assert st == 200, rows
            out += rows
            pages += 1
            cont = hh.get("x-ms-continuation")
            if not cont:
                return out, pages, hh
        raise AssertionError("paging does not end")

    rows, pages, h = run("SELECT * FROM devices", page=100)
    assert len(rows) == n and pages >= 11, (len(rows), pages)
    assert h["x-ms-item-type"] == "twin"
    assert [r["deviceId"] for r in rows] == [f"q-{i:05d}" for i in range(n)]
    rows, pages, h = run("SELECT deviceId, tags.i FROM devices WHERE tags.site = 'x'", page=20)
    assert len(rows) == 50 and h["x-ms-item-type"] == "raw", rows[:3]
    assert rows[1] == {"deviceId": "q-00021", "i": 21}, rows[1]
    rows, pages, _ = run("SELECT TOP 150 deviceId FROM devices", page=100)
    assert len(rows) == 150 and pages == 2, (len(rows), pages)
    rows, pages, _ = run("SELECT COUNT() AS n FROM devices WHERE tags.site = 'x'")
    assert rows == [{"n": 50}], rows
    rows, _, _ = run("SELECT tags.site AS site, COUNT() AS n FROM devices GROUP BY tags.site")
    assert sorted(rows, key=lambda r: r.get("n")) == [{"site": "x", "n": 50}, {"n": n - 50}], rows
    # Default page size 100.
    st, h, rows = hub.req("POST", "/devices/query", {"query": "SELECT deviceId FROM devices"})
    assert len(rows) == 100 and "x-ms-continuation" in h
    # A client that goes away in the middle of a long scan: the scan stops, the hub carries on.
    q = json.dumps({"query": "SELECT tags.site, COUNT() AS n FROM devices GROUP BY tags.site"}).encode()
    hub.raw(f"POST /devices/query?api-version={VERSION} HTTP/1.1\r\nHost: a\r\nAuthorization: {token()}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(q)}\r\n\r\n".encode() + q, read_timeout=0.001)
    assert hub.req("GET", "/statistics/devices")[2]["totalDeviceCount"] == n
    # Errors.
    m = expect_error(hub.req("POST", "/devices/query", {"query": "SELECT * FORM devices"}), 400, "ArgumentInvalid")
    assert "line 1, column" in m and "FORM" in m, m
    expect_error(hub.req("POST", "/devices/query", {"query": "SELECT *"}, headers={"x-ms-max-item-count": "1001"}),
                 400, "ArgumentInvalid")
    expect_error(hub.req("POST", "/devices/query", {"query": "SELECT * FROM devices"},
                         headers={"x-ms-continuation": "garbage!"}), 400, "ArgumentInvalid")
    expect_error(hub.req("POST", "/devices/query", {"q": "SELECT * FROM devices"}), 400, "ArgumentInvalid")
    expect_error(hub.req("POST", "/devices/query", {"query": "SELECT * FROM devices WHERE " + "a = 1 AND " * 1000 + "true"}),
                 400, "ArgumentInvalid")
    hub.finish()


# ---- C2D and feedback ---------------------------------------------------------------------



def test_c2d_and_feedback():
    hub = Hub()
    assert hub.req("PUT", "/devices/c1", {})[0] == 200
    st, _, r1 = hub.req("POST", "/messages/devicebound/c1?ttl=1", b"short-lived",
                        headers={"iothub-messageid": "m-exp", "iothub-ack": "negative",
                                 "Content-Type": "text/plain", "iothub-app-alert": "1"})
    assert st == 200 and r1["messageId"] == "m-exp" and r1["deviceId"] == "c1", r1
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 600))
    st, _, r2 = hub.req("POST", "/messages/devicebound/c1", b"{}", headers={
        "iothub-messageid": "m-purge", "iothub-ack": "full", "iothub-correlationid": "c-1", "iothub-expiry": expiry})
    assert st == 200 and r2["sequenceNumber"] > r1["sequenceNumber"], r2
    assert hub.req("GET", "/devices/c1")[2]["cloudToDeviceMessageCount"] == 2

    # Limits and errors.
    st, _, r3 = hub.req("POST", "/messages/devicebound/c1", b"3")
    assert st == 200
    expect_error(hub.req("POST", "/messages/devicebound/c1", b"4"), 403, "DeviceMaximumQueueDepthExceeded")
    expect_error(hub.req("POST", "/messages/devicebound/nope", b"x"), 404, "DeviceNotFound")
    expect_error(hub.req("POST", "/messages/devicebound/c1", b"x" * 70000), 413, "MessageTooLarge")
    expect_error(hub.req("POST", "/messages/devicebound/c1", b"x", headers={"iothub-ack": "sometimes"}), 400,
                 "ArgumentInvalid")
    expect_error(hub.req("POST", "/messages/devicebound/c1?ttl=0", b"x"), 400, "ArgumentInvalid")
    expect_error(hub.req("POST", "/messages/devicebound/c1", b"x", headers={"iothub-expiry": "tomorrow"}), 400,
                 "ArgumentInvalid")

    # The short-lived message expires (Expired feedback); purge the rest (Purged for m-purge).
    time.sleep(2.5)
    st, _, p = hub.req("DELETE", "/devices/c1/commands")
    assert st == 200 and p == {"totalMessagesPurged": 2, "deviceId": "c1", "moduleId": None}, p
    assert hub.req("GET", "/devices/c1")[2]["cloudToDeviceMessageCount"] == 0
    expect_error(hub.req("DELETE", "/devices/nope/commands"), 404, "DeviceNotFound")

    # Feedback is batched (15 s at most).
    deadline = time.monotonic() + 25
    while True:
        st, h, body = hub.req("GET", "/messages/serviceBound/feedback", raw=True)
        if st == 200:
            break
        assert st == 204, (st, body)
        assert time.monotonic() < deadline, "no feedback within 25 s"
        time.sleep(0.5)
    assert h["content-type"].startswith("application/vnd.microsoft.iothub.feedback.json")
    records = json.loads(body)
    got = sorted((r["originalMessageId"], r["statusCode"], r["deviceId"]) for r in records)
    assert got == [("m-exp", "Expired", "c1"), ("m-purge", "Purged", "c1")], records
    lock = h["etag"].strip('"')
    # Abandon: delivered again, same records.
    st, _, b = hub.req("POST", f"/messages/serviceBound/feedback/{lock}/abandon")
    assert st == 204, (st, b)
    st, h2, body2 = hub.req("GET", "/messages/serviceBound/feedback", raw=True)
    assert st == 200 and json.loads(body2) == records and h2["etag"] != h["etag"]
    lock2 = h2["etag"].strip('"')
    expect_error(hub.req("DELETE", f"/messages/serviceBound/feedback/{lock}"), 412, "DeviceMessageLockLost")
    st, _, _ = hub.req("DELETE", f"/messages/serviceBound/feedback/{lock2}")
    assert st == 204
    expect_error(hub.req("DELETE", f"/messages/serviceBound/feedback/{lock2}"), 412, "DeviceMessageLockLost")
    assert hub.req("GET", "/messages/servicebound/feedback")[0] == 204
    hub.finish()


# ---- methods ----------------------------------------------------------------------------------



def test_methods():
    hub = Hub()
    assert hub.req("PUT", "/devices/m1", {})[0] == 200
    call = {"methodName": "reboot", "payload": {"delay": 1}, "responseTimeoutInSeconds": 5}
    m = expect_error(hub.req("POST", "/twins/m1/methods", call), 404, "DeviceNotOnline")
    expect_error(hub.req("POST", "/twins/nope/methods", call), 404, "DeviceNotFound")
    expect_error(hub.req("POST", "/twins/m1/methods", {"payload": 1}), 400, "ArgumentInvalid")
    expect_error(hub.req("POST", "/twins/m1/methods", dict(call, responseTimeoutInSeconds=1)), 400, "ArgumentInvalid")
    expect_error(hub.req("POST", "/twins/m1/methods", dict(call, methodName="bad name")), 400, "ArgumentInvalid")
    expect_error(hub.req("POST", "/twins/m1/methods", dict(call, extra=1)), 400, "ArgumentInvalid")
    # Waiting for a connection that never comes: 404103 after the connect timeout.
    t0 = time.monotonic()
    expect_error(hub.req("POST", "/twins/m1/methods", dict(call, connectTimeoutInSeconds=1)), 404, "DeviceNotOnline")
    assert 0.8 < time.monotonic() - t0 < 5
    hub.finish()


# ---- HTTP layer ---------------------------------------------------------------------------------



def test_malformed_http():
    hub = Hub()
    auth = token()
    out = hub.raw(b"GARBAGE\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b"iothub-errorcode: ArgumentInvalid" in out, out
    out = hub.raw(b"GET /devices/x?api-version=2021-04-12 HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 "), out[:100]
    out = hub.raw(f"PUT /devices/x?api-version=2021-04-12 HTTP/1.1\r\nHost: a\r\nAuthorization: {auth}\r\n"
                  f"Content-Length: 300000\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 413 ") and b"MessageTooLarge" in out, out[:200]
    out = hub.raw(b"GET /devices/x HTTP/2.0\r\nHost: a\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 505 "), out[:100]
    # Slowloris: half a request, then nothing: 408 after request_timeout, and closed.
    t0 = time.monotonic()
    out = hub.raw(b"GET /devices/x?api-version=2021-04-12 HTTP/1.1\r\nHost: a\r\n", read_timeout=8)
    assert out.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in out, out
    assert 1.5 < time.monotonic() - t0 < 7.5
    # Pipelining: two requests in one write, answered in order on one connection.
    reqs = b"".join(f"GET /devices/{i}?api-version=2021-04-12 HTTP/1.1\r\nHost: a\r\nAuthorization: {auth}\r\n"
                    f"Request-Id: r{i}\r\n\r\n".encode() for i in ("p1", "p2"))
    out = hub.raw(reqs + b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\nAuthorization: " + auth.encode() +
                  b"\r\n\r\n")
    assert out.count(b"HTTP/1.1 404 ") == 2 and out.index(b"Request-Id: rp1") < out.index(b"Request-Id: rp2"), out
    assert b"HTTP/1.1 200 " in out and b'"healthy"' in out
    # Expect: 100-continue.
    body = b"{}"
    out = hub.raw(f"PUT /devices/cont1?api-version=2021-04-12 HTTP/1.1\r\nHost: a\r\nAuthorization: {auth}\r\n"
                  f"Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {len(body)}\r\n"
                  f"Connection: close\r\n\r\n".encode() + body)
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "), out[:200]
    # ... but not for a request whose token is refused: 401 at once, the body is never read.
    out = hub.raw(f"PUT /devices/cont2?api-version=2021-04-12 HTTP/1.1\r\nHost: a\r\nAuthorization: {token(se=1)}\r\n"
                  f"Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 100\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 401 ") and b"IotHubUnauthorized" in out and b"100 Continue" not in out, out[:300]
    # Still healthy and serving.
    assert hub.req("GET", "/devices/cont1")[0] == 200
    assert hub.daemon.alive()
    hub.finish()



def test_connection_limits():
    hub = Hub(edit=lambda t: t.replace("    request_timeout: 2s\n", "    request_timeout: 2s\n    max_connections_per_address: 3\n"))
    conns = []
    for _ in range(3):
        s = hub.ctx.wrap_socket(socket.create_connection(("127.0.0.1", hub.port)), server_hostname=HOST)
        conns.append(s)
    refused = False
    try:
        s = hub.ctx.wrap_socket(socket.create_connection(("127.0.0.1", hub.port), timeout=5), server_hostname=HOST)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        refused = s.recv(100) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError, socket.timeout):
        refused = True
    assert refused, "a fourth connection from the same address was served"
    for s in conns:
        s.close()
    time.sleep(0.3)
    assert hub.req("GET", "/health", version=None)[0] == 200
    hub.finish()


def test_curl_and_metrics():
    hub = Hub()
    assert hub.req("PUT", "/devices/k1", {})[0] == 200
    p = subprocess.run(["curl", "-sS", "--cacert", hub.ca, "--resolve", f"{HOST}:{hub.port}:127.0.0.1",
                        "-H", f"Authorization: {token()}", "-w", "\n%{http_code}",
                        f"https://{HOST}:{hub.port}/devices/k1?api-version={VERSION}"],
                       capture_output=True, text=True, timeout=30)
    body, code = p.stdout.rsplit("\n", 1)
    assert code == "200" and json.loads(body)["deviceId"] == "k1", (p.stdout, p.stderr)
    # Metrics listener: no token, only /metrics and /health.
    c = http.client.HTTPConnection("127.0.0.1", hub.mport, timeout=10)
    c.request("GET", "/metrics")
    r = c.getresponse()
    text = r.read().decode()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    assert 'fieldhub_api_requests_total{route="device_get",status="200"}' in text, text
    assert metric(text, "fieldhub_registry_devices") == 1
    for name in ("fieldhub_store_commits_total", "fieldhub_api_connections", "fieldhub_store_commit_seconds_count",
                 "fieldhub_feedback_messages"):
        assert metric(text, name) is not None, name
    c.request("GET", "/health")
    r = c.getresponse()
    assert r.status == 200 and json.loads(r.read())["status"] == "healthy"
    c.request("GET", "/devices/k1?api-version=2021-04-12")
    r = c.getresponse()
    r.read()
    assert r.status == 404
    # On the service API, /metrics and /health need a token.
    expect_error(hub.req("GET", "/metrics", tok="", version=None), 401, "IotHubUnauthorized")
    st, _, text = hub.req("GET", "/metrics", version=None)
    assert st == 200 and "fieldhub_auth_failures_total" in text
    hub.finish()



def test_config_checks():
    d = tmpdir()
    cfg = write(f"{d}/fieldhub.yaml", config(d, "").replace('listen: "127.0.0.1:0"', 'listen: "0.0.0.0:9100"'))
    p = subprocess.run([FIELDHUBD, "--check-config", "--config", cfg], capture_output=True, text=True)
    assert p.returncode == 78 and re.search(r"fieldhub\.yaml:\d+:\d+: metrics\.listen: .*loopback", p.stderr), p.stderr
    cfg = write(f"{d}/fieldhub.yaml", config(d, "feedback:\n  ttl: 5s\n").replace("max_queue_depth: 3",
                                                                                   "max_queue_depth: 0"))
    p = subprocess.run([FIELDHUBD, "--check-config", "--config", cfg], capture_output=True, text=True)
    assert p.returncode == 78
    assert re.search(r":\d+:\d+: c2d\.max_queue_depth: ", p.stderr), p.stderr
    assert re.search(r":\d+:\d+: feedback\.ttl: ", p.stderr), p.stderr
    cfg = write(f"{d}/fieldhub.yaml", config(d, "").replace('listen: ["127.0.0.1:0"]', 'listen: ["nowhere:443"]'))
    p = subprocess.run([FIELDHUBD, "--check-config", "--config", cfg], capture_output=True, text=True)
    assert p.returncode == 78 and "service_api.listen[0]" in p.stderr, p.stderr


def test_reload_keeps_serving():
    hub = Hub()
    assert hub.req("PUT", "/devices/r1", {})[0] == 200
    import signal
    hub.daemon.signal(signal.SIGHUP)
    hub.daemon.wait_log(r"Configuration reloaded")
    assert hub.req("GET", "/devices/r1")[0] == 200
    # A reload that cannot listen is rejected and the API keeps running.
    write(hub.cfg, config(hub.d, "").replace('listen: ["127.0.0.1:0"]', f'listen: ["127.0.0.1:{hub.mport}"]'))
    hub.daemon.signal(signal.SIGHUP)
    hub.daemon.wait_log(r"reload rejected")
    assert hub.req("GET", "/devices/r1")[0] == 200
    # A new metrics address is applied; the service listener (same address) keeps its port.
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    free = s.getsockname()[1]
    s.close()
    write(hub.cfg, config(hub.d, "").replace('listen: "127.0.0.1:0"', f'listen: "127.0.0.1:{free}"'))
    hub.daemon.signal(signal.SIGHUP)
    hub.daemon.wait_log(rf"Metrics endpoint listening on 127\.0\.0\.1:{free}")
    hub.daemon.wait_log(r"Configuration reloaded")
    c = http.client.HTTPConnection("127.0.0.1", free, timeout=10)
    c.request("GET", "/health")
    assert c.getresponse().status == 200
    try:
        c = http.client.HTTPConnection("127.0.0.1", hub.mport, timeout=2)
        c.request("GET", "/health")
        c.getresponse()
        raise AssertionError("the old metrics listener is still open")
    except ConnectionRefusedError:
        pass
    assert hub.req("GET", "/devices/r1")[0] == 200
    rc, _ = hub.daemon.stop()
    assert rc == 0


if __name__ == "__main__":
    main([test_device_crud, test_bulk, test_auth_and_api_version, test_twins, test_query_paging_on_1000_devices,
          test_c2d_and_feedback, test_methods, test_malformed_http, test_connection_limits, test_curl_and_metrics, test_config_checks,
          test_reload_keeps_serving])
