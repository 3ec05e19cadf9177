#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The HTTPS 1.1 device interface (reference §3) on the service API's listener: D2C (single,
batch, module), every system-property header, C2D with the ETag lock (complete, reject,
abandon, lock timeout, the exact response headers of §3.4), feedback, authentication (device
SAS, policy, X.509 thumbprint and CA), file upload (single put, block list, quota, limits,
notification in the event stream), throttling, bad input, and kill -9 with every
204-acknowledged message kept. Uses python http.client and curl over TLS against the
generated CA."""

import base64
import hashlib
import hmac
import http.client
import json
import os
import random
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(__file__))
import test_api  # noqa: E402
from fhlib import Daemon, main, tmpdir, write  # noqa: E402
from test_api import HOST, VERSION, expect_error, token  # noqa: E402

NO_LIMIT = """http_device:
  limits:
    max_messages_per_second: 0
"""


def sas(dev_id, key, se=None, host=HOST, module=None):
    se = int(time.time()) + 3600 if se is None else se
    res = f"{host}/devices/{dev_id}" + (f"/modules/{module}" if module else "")
    sr = urllib.parse.quote(res, safe="")
    sig = base64.b64encode(hmac.new(base64.b64decode(key), f"{sr}\n{se}".encode(), hashlib.sha256).digest()).decode()
    return f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={se}"


class Hub(test_api.Hub):
    def __init__(self, extra=NO_LIMIT, hub_extra=""):
        edit = None
        if hub_extra:
            def edit(text):
                return text.replace("  host_aliases: [alias.test.local]\n",
                                    "  host_aliases: [alias.test.local]\n" + hub_extra)
        super().__init__(extra, edit=edit)

    def device(self, dev_id, body=None):
        st, _, dev = self.req("PUT", f"/devices/{dev_id}", body or {"deviceId": dev_id})
        assert st == 200, dev
        return dev

    def key(self, dev):
        return dev["authentication"]["symmetricKey"]["primaryKey"]

    def dev(self, method, path, body=None, headers=None, tok=None, ctx=None, raw_headers=False, version=VERSION):
        """One device request on its own connection: (status, headers, body bytes). headers
        keep their case when raw_headers (a list of (name, value))."""
        c = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx or self.ctx, timeout=30)
        h = dict(headers or {})
        if tok:
            h["Authorization"] = tok
        if version:
            path += ("&" if "?" in path else "?") + "api-version=" + version
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        elif isinstance(body, str):
            body = body.encode()
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        hdrs = r.getheaders() if raw_headers else {k.lower(): v for k, v in r.getheaders()}
        c.close()
        return r.status, hdrs, data


def jerr(resp):
    st, h, body = resp
    return st, h, json.loads(body) if body else None


def read_events(hub, device=None, quiet=1.0):
    """Every event the stream still holds (admin socket monitor-events from seq 0)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.path.join(hub.d, "admin.sock"))
    args = {"after": 0}
    if device:
        args["device"] = device
    s.sendall((json.dumps({"cmd": "monitor-events", "args": args}) + "\n").encode())
    s.settimeout(quiet)
    buf = b""
    try:
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            buf += b
    except socket.timeout:
        pass
    s.close()
    lines = [json.loads(x) for x in buf.split(b"\n") if x.strip()]
    assert lines and lines[0].get("ok"), lines[:1]
    return [x["event"] for x in lines[1:]]


def telemetry(events):
    return [e for e in events if e["properties"]["system"].get("iothub-message-source") == "Telemetry"]


def curl(*args):
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60)


# ---- D2C ----------------------------------------------------------------------------------


def test_events_single_batch_module():
    hub = Hub()
    key = hub.key(hub.device("d1"))
    tok = sas("d1", key)
    st, _, body = hub.dev("POST", "/devices/d1/messages/events", b'{"t":21.5}', tok=tok, headers={
        "iothub-app-temp": "21", "IoTHub-MessageId": "m1", "iothub-correlationid": "c1", "iothub-userid": "u1",
        "iothub-contenttype": "application/json", "iothub-contentencoding": "utf-8",
        "iothub-creationtimeutc": "2024-02-20T16:24:48Z", "iothub-to": "/devices/d1/messages/events",
        "Content-Type": "application/octet-stream", "User-Agent": "iothubclient/1.0"})
    assert st == 204, body
    # Content-Type alone sets contentType; lower-case devicebound-style paths are matched too.
    st, _, _ = hub.dev("POST", "/devices/d1/Messages/Events", b"plain", tok=tok,
                       headers={"Content-Type": "text/plain", "iothub-messageid": "m2"})
    assert st == 204
    # curl, as the reference's "curl for HTTP"
    p = curl("--cacert", hub.ca, "--resolve", f"{HOST}:{hub.port}:127.0.0.1", "-o", "/dev/null", "-w", "%{http_code}",
             "-H", f"Authorization: {tok}", "-H", "iothub-app-src: curl", "-H", "iothub-messageid: m3",
             "--data-binary", "from curl",
             f"https://{HOST}:{hub.port}/devices/d1/messages/events?api-version={VERSION}")
    assert p.stdout == "204", (p.stdout, p.stderr)

    batch = [
        {"body": base64.b64encode(b"\xff\xfebinary").decode(), "properties": {"iothub-app-k": "v", "iothub-messageid": "b1"}},
        {"body": {"any": "json"}, "base64Encoded": False, "properties": {"iothub-messageid": "b2",
                                                                         "iothub-contenttype": "application/json"}},
        {"body": "raw text", "base64Encoded": False, "properties": {"iothub-messageid": "b3"}},
    ]
    st, _, body = hub.dev("POST", "/devices/d1/messages/events", json.dumps(batch), tok=tok,
                          headers={"Content-Type": "application/vnd.microsoft.iothub.json"})
    assert st == 204, body

    # Module messages with a policy token (DeviceConnect) acting for the device.
    st, _, body = hub.dev("POST", "/devices/d1/modules/mod1/messages/events", b"from module", tok=token(),
                          headers={"iothub-messageid": "mm1"})
    assert st == 204, body

    evs = {e["properties"]["system"].get("message-id"): e for e in telemetry(read_events(hub, "d1"))}
    for mid in ("m1", "m2", "m3", "b1", "b2", "b3", "mm1"):
        assert mid in evs, (mid, list(evs))
    s1 = evs["m1"]["properties"]["system"]
    assert evs["m1"]["payload"] == {"t": 21.5}
    assert evs["m1"]["properties"]["application"] == {"temp": "21"}, evs["m1"]
    assert s1["correlation-id"] == "c1" and s1["user-id"] == "u1"
    assert s1["content-type"] == "application/json" and s1["content-encoding"] == "utf-8"
    assert s1["iothub-creation-time-utc"] == "2024-02-20T16:24:48Z"
    assert s1["iothub-connection-device-id"] == "d1"
    assert '"type":"sas"' in s1["iothub-connection-auth-method"] and '"scope":"device"' in s1["iothub-connection-auth-method"]
    assert s1.get("iothub-connection-auth-generation-id"), s1
    assert "iothub-enqueuedtime" in s1
    assert evs["m2"]["properties"]["system"]["content-type"] == "text/plain"
    assert evs["m3"]["properties"]["application"] == {"src": "curl"}
    assert evs["b1"]["payload"] == {"hex": "fffe62696e617279"}, evs["b1"]["payload"]
    assert evs["b1"]["properties"]["application"] == {"k": "v"}
    assert evs["b2"]["payload"] == {"any": "json"} and evs["b3"]["payload"] == "raw text"
    assert evs["mm1"]["module"] == "mod1"
    assert evs["mm1"]["properties"]["system"]["iothub-connection-module-id"] == "mod1"
    assert '"scope":"hub"' in evs["mm1"]["properties"]["system"]["iothub-connection-auth-method"]

    # HTTP devices are not "connected"; their activity is recorded.
    st, _, dev = hub.req("GET", "/devices/d1")
    assert dev["connectionState"] == "Disconnected", dev
    assert not dev["lastActivityTime"].startswith("0001"), dev
    hub.finish()


def test_bad_input_and_limits():
    hub = Hub()
    key = hub.key(hub.device("d2"))
    tok = sas("d2", key)
    ev = "/devices/d2/messages/events"
    st, h, b = jerr(hub.dev("POST", ev, b"x" * (256 * 1024 + 1), tok=tok))
    expect_error((st, h, b), 413, "MessageTooLarge")
    # Properties count towards the size.
    st, h, b = jerr(hub.dev("POST", ev, b"x" * (256 * 1024 - 10), tok=tok, headers={"iothub-app-p": "y" * 100}))
    expect_error((st, h, b), 413, "MessageTooLarge")
    bj = {"Content-Type": "application/vnd.microsoft.iothub.json"}
    expect_error(jerr(hub.dev("POST", ev, b"[{", tok=tok, headers=bj)), 400, "IotHubFormatError")
    expect_error(jerr(hub.dev("POST", ev, b"[]", tok=tok, headers=bj)), 400, "ArgumentInvalid")
    expect_error(jerr(hub.dev("POST", ev, b'[{"body":"***"}]', tok=tok, headers=bj)), 400, "ArgumentInvalid")
    expect_error(jerr(hub.dev("POST", ev, b'[{"properties":{}}]', tok=tok, headers=bj)), 400, "ArgumentInvalid")
    expect_error(jerr(hub.dev("POST", ev, b'[{"body":"","properties":{"a":1}}]', tok=tok, headers=bj)), 400,
                 "ArgumentInvalid")
    big = [{"body": base64.b64encode(b"z" * 60000).decode()} for _ in range(4)]
    expect_error(jerr(hub.dev("POST", ev, json.dumps(big), tok=tok, headers=bj)), 413, "MessageTooLarge")
    expect_error(jerr(hub.dev("POST", ev, b"x", tok=tok, headers={"iothub-messageid": "m" * 129})), 400,
                 "ArgumentInvalid")
    expect_error(jerr(hub.dev("POST", ev, b"x", tok=tok, version=None)), 400, "InvalidProtocolVersion")
    expect_error(jerr(hub.dev("GET", ev, tok=tok)), 405, "MethodNotAllowed")
    expect_error(jerr(hub.dev("POST", "/devices/d2/files", b"{nope", tok=tok)), 400, "IotHubFormatError")
    expect_error(jerr(hub.dev("POST", "/devices/d2/files", {"blobName": "../etc/passwd"}, tok=tok)), 400,
                 "ArgumentInvalid")
    expect_error(jerr(hub.dev("GET", "/devices/d2/messages/deviceBound", tok=tok,
                              headers={"iothub-messagelocktimeout": "soon"})), 400, "ArgumentInvalid")
    assert re.search(r"device_events: 413 MessageTooLarge: Device d2", hub.daemon.log()), hub.daemon.log()[-3000:]
    # Other connections are unaffected; the service API still answers.
    assert hub.dev("POST", ev, b"ok", tok=tok)[0] == 204
    assert hub.req("GET", "/devices/d2")[0] == 200
    hub.finish()


def test_authentication():
    hub = Hub()
    key = hub.key(hub.device("a1"))
    hub.device("a2")
    ev = "/devices/a1/messages/events"
    assert hub.dev("POST", ev, b"x", tok=sas("a1", key))[0] == 204
    assert hub.dev("POST", ev, b"x", tok=sas("a1", key, host="alias.test.local"))[0] == 204
    m = expect_error(jerr(hub.dev("POST", ev, b"x")), 401, "IotHubUnauthorized")
    assert "no Authorization header and no client certificate" in m
    expect_error(jerr(hub.dev("POST", ev, b"x", tok=sas("a1", base64.b64encode(b"k" * 32).decode()))), 401,
                 "IotHubUnauthorized")
    m = expect_error(jerr(hub.dev("POST", ev, b"x", tok=sas("a1", key, se=int(time.time()) - 3600))), 401,
                     "IotHubUnauthorized")
    assert "expired" in m, m
    # Another device's token, for a1's path.
    expect_error(jerr(hub.dev("POST", ev, b"x", tok=sas("a2", key))), 401, "IotHubUnauthorized")
    expect_error(jerr(hub.dev("POST", "/devices/a2/messages/events", b"x", tok=sas("a1", key))), 401,
                 "IotHubUnauthorized")
    # A policy without DeviceConnect.
    expect_error(jerr(hub.dev("POST", ev, b"x", tok=token("service", test_api.SERVICE_KEY))), 401, "IotHubUnauthorized")
    # Policy with DeviceConnect, unknown device.
    expect_error(jerr(hub.dev("POST", "/devices/ghost/messages/events", b"x", tok=token())), 404, "DeviceNotFound")
    # Disabled.
    st, _, _ = hub.req("PUT", "/devices/a1", {"deviceId": "a1", "status": "disabled"}, headers={"If-Match": "*"})
    assert st == 200
    m = expect_error(jerr(hub.dev("POST", ev, b"x", tok=sas("a1", key))), 401, "IotHubUnauthorized")
    log = hub.daemon.log()
    assert re.search(r"HTTP device a1 from \S+ refused: SAS token refused: expired", log), log[-3000:]
    assert re.search(r"HTTP device a1 from \S+ refused: SAS token refused: (wrong scope|bad signature)", log), log[-3000:]
    hub.finish()


# ---- C2D ----------------------------------------------------------------------------------


def c2d_send(hub, dev_id, body, headers):
    st, _, r = hub.req("POST", f"/messages/devicebound/{dev_id}", body, headers=headers)
    assert st == 200, r
    return r


def test_c2d_lifecycle_and_feedback():
    hub = Hub()
    key = hub.key(hub.device("c1"))
    tok = sas("c1", key)
    rx = "/devices/c1/messages/deviceBound"
    assert hub.dev("GET", rx, tok=tok)[0] == 204
    c2d_send(hub, "c1", b"hello", {"iothub-messageid": "cm1", "iothub-ack": "full", "iothub-correlationid": "cc1",
                                    "iothub-userid": "svc", "iothub-app-color": "red", "Content-Type": "text/plain",
                                    "Content-Encoding": "utf-8", "Content-Type": "text/plain"})
    st, h, body = hub.dev("GET", rx, tok=tok, raw_headers=True)
    assert st == 200 and body == b"hello", (st, body)
    names = [k for k, _ in h]
    hd = dict(h)
    for exact in ("ETag", "iothub-messageid", "iothub-sequencenumber", "iothub-to", "iothub-enqueuedtime",
                  "iothub-deliverycount", "iothub-expiry", "iothub-correlationid", "iothub-userid", "iothub-ack",
                  "iothub-app-color", "ContentType", "ContentEncoding"):
        assert exact in names, (exact, names)
    assert re.fullmatch(r'"[0-9a-f-]{36}"', hd["ETag"]), hd["ETag"]
    assert hd["iothub-messageid"] == "cm1" and hd["iothub-correlationid"] == "cc1" and hd["iothub-userid"] == "svc"
    assert hd["iothub-ack"] == "full" and hd["iothub-app-color"] == "red" and hd["ContentType"] == "text/plain"
    assert hd["ContentEncoding"] == "utf-8"
    assert hd["iothub-deliverycount"] == "0" and int(hd["iothub-sequencenumber"]) >= 1
    assert hd["iothub-to"].lower() == "/devices/c1/messages/devicebound", hd["iothub-to"]
    lock = hd["ETag"].strip('"')

    # Abandon: redelivered with deliverycount 1 (lower-case path, as Node and C write it).
    st, _, b = hub.dev("POST", f"/devices/c1/messages/devicebound/{lock}/abandon", b"", tok=tok)
    assert st == 204, b
    expect_error(jerr(hub.dev("DELETE", f"{rx}/{lock}", tok=tok)), 412, "DeviceMessageLockLost")
    st, h, _ = hub.dev("GET", "/devices/c1/messages/devicebound", tok=tok)
    assert st == 200 and h["iothub-deliverycount"] == "1" and h["iothub-messageid"] == "cm1", h
    # Reject (value-less query parameter) -> dead-lettered, negative feedback.
    st, _, b = hub.dev("DELETE", f"{rx}/{h['etag'].strip(chr(34))}?reject", tok=tok, headers={"If-Match": h["etag"]})
    assert st == 204, b
    assert hub.dev("GET", rx, tok=tok)[0] == 204

    # Complete -> positive feedback.
    c2d_send(hub, "c1", b"second", {"iothub-messageid": "cm2", "iothub-ack": "positive"})
    st, h, _ = hub.dev("GET", rx, tok=tok)
    assert st == 200 and "iothub-correlationid" not in h and "iothub-userid" not in h, h
    assert hub.dev("DELETE", f"{rx}/{h['etag'].strip(chr(34))}", tok=tok)[0] == 204
    expect_error(jerr(hub.dev("DELETE", f"{rx}/{h['etag'].strip(chr(34))}", tok=tok)), 412, "DeviceMessageLockLost")
    expect_error(jerr(hub.dev("POST", f"{rx}/00000000-0000-0000-0000-000000000000/abandon", b"", tok=tok)), 412,
                 "DeviceMessageLockLost")
    # Another device's lock token is not ours.
    key2 = hub.key(hub.device("c2"))
    c2d_send(hub, "c2", b"for c2", {"iothub-messageid": "x2"})
    st, h2, _ = hub.dev("GET", "/devices/c2/messages/deviceBound", tok=sas("c2", key2))
    assert st == 200
    expect_error(jerr(hub.dev("DELETE", f"{rx}/{h2['etag'].strip(chr(34))}", tok=tok)), 412, "DeviceMessageLockLost")

    # Feedback through the service route (batched: up to 15 s).
    records = {}
    deadline = time.time() + 30
    while time.time() < deadline and len(records) < 2:
        st, fh, fb = hub.req("GET", "/messages/serviceBound/feedback")
        if st == 200:
            for rec in (fb if isinstance(fb, list) else json.loads(fb)):
                records[rec["originalMessageId"]] = rec
            assert hub.req("DELETE", f"/messages/serviceBound/feedback/{fh['etag'].strip(chr(34))}")[0] == 204
        else:
            time.sleep(1)
    assert records.get("cm1", {}).get("statusCode") == "Rejected", records
    assert records.get("cm2", {}).get("statusCode") == "Success", records
    hub.finish()


def test_c2d_lock_timeout():
    hub = Hub()
    key = hub.key(hub.device("l1"))
    tok = sas("l1", key)
    rx = "/devices/l1/messages/deviceBound"
    c2d_send(hub, "l1", b"m", {"iothub-messageid": "lm1"})
    st, h, _ = hub.dev("GET", rx, tok=tok, headers={"iothub-messagelocktimeout": "5"})
    assert st == 200
    assert hub.dev("GET", rx, tok=tok)[0] == 204          # locked
    time.sleep(6.5)
    st, h2, _ = hub.dev("GET", rx + "?iothub-messagelocktimeout=5", tok=tok)
    assert st == 200 and h2["iothub-messageid"] == "lm1", (st, h2)
    assert h2["iothub-deliverycount"] == "0"               # a lock expiry does not count
    assert h2["etag"] != h["etag"]
    expect_error(jerr(hub.dev("DELETE", f"{rx}/{h['etag'].strip(chr(34))}", tok=tok)), 412, "DeviceMessageLockLost")
    assert hub.dev("DELETE", f"{rx}/{h2['etag'].strip(chr(34))}", tok=tok)[0] == 204
    hub.finish()


# ---- X.509 --------------------------------------------------------------------------------


def make_cert(d, name, cn, ca=None):
    key, crt = f"{d}/{name}.key", f"{d}/{name}.crt"
    subprocess.run(["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", key], check=True,
                   capture_output=True)
    if ca is None:
        subprocess.run(["openssl", "req", "-new", "-x509", "-key", key, "-out", crt, "-subj", f"/CN={cn}", "-days", "30"],
                       check=True, capture_output=True)
    else:
        csr = f"{d}/{name}.csr"
        subprocess.run(["openssl", "req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={cn}"], check=True,
                       capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
                        "-out", crt, "-days", "30"], check=True, capture_output=True)
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
    c2, k2, _ = make_cert(d, "x2", "x2")
    c3, k3, _ = make_cert(d, "x3", "x3", ca=(f"{d}/ca.crt", cakey))
    c4, k4, _ = make_cert(d, "x4", "other", ca=(f"{d}/ca.crt", cakey))
    hub.device("x1", {"deviceId": "x1", "authentication": {"type": "selfSigned", "x509Thumbprint": {
        "primaryThumbprint": hashlib.sha256(der1).hexdigest().upper(), "secondaryThumbprint": None}}})
    hub.device("x3", {"deviceId": "x3", "authentication": {"type": "certificateAuthority"}})

    def ctx(cert):
        c = ssl.create_default_context(cafile=hub.ca)
        c.load_cert_chain(cert[0], cert[1])
        return c

    ev = "/devices/{}/messages/events"
    assert hub.dev("POST", ev.format("x1"), b"x509", ctx=ctx((c1, k1)), headers={"iothub-messageid": "xm1"})[0] == 204
    m = expect_error(jerr(hub.dev("POST", ev.format("x1"), b"x", ctx=ctx((c2, k2)))), 401, "IotHubUnauthorized")
    assert "thumbprint" in m, m
    assert hub.dev("POST", ev.format("x3"), b"ca", ctx=ctx((c3, k3)))[0] == 204
    m = expect_error(jerr(hub.dev("POST", ev.format("x3"), b"x", ctx=ctx((c4, k4)))), 401, "IotHubUnauthorized")
    assert "CN" in m, m
    # x1's certificate does not open x3's path.
    expect_error(jerr(hub.dev("POST", ev.format("x3"), b"x", ctx=ctx((c1, k1)))), 401, "IotHubUnauthorized")
    # curl with the client certificate, C2D receive.
    c2d_send(hub, "x1", b"to x509", {"iothub-messageid": "xc1"})
    p = curl("--cacert", hub.ca, "--cert", c1, "--key", k1, "-D", "-", "--resolve", f"{HOST}:{hub.port}:127.0.0.1",
             f"https://{HOST}:{hub.port}/devices/x1/messages/devicebound?api-version={VERSION}")
    assert p.stdout.startswith("HTTP/1.1 200") and "iothub-messageid: xc1" in p.stdout and p.stdout.endswith("to x509"), \
        (p.stdout, p.stderr)
    evs = {e["properties"]["system"].get("message-id"): e for e in telemetry(read_events(hub, "x1"))}
    assert '"type":"x509"' in evs["xm1"]["properties"]["system"]["iothub-connection-auth-method"], evs
    assert re.search(r"HTTP device x3 from \S+ refused: X.509: the client certificate's subject CN", hub.daemon.log())
    hub.finish()


# ---- file upload --------------------------------------------------------------------------


UPLOAD = NO_LIMIT + """file_upload:
  quota: 200KiB
  max_file: 100KiB
  sas_ttl: 1h
  max_concurrent: 2
"""


def blob_put(hub, info, data, headers=None, query="", name=None):
    """PUT to the URL the hub gave (hostName/containerName/blobName + sasToken)."""
    host, port = info["hostName"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) == hub.port, info
    blob = name or info["blobName"]
    path = "/" + info["containerName"] + "/" + urllib.parse.quote(blob) + info["sasToken"] + query
    c = http.client.HTTPSConnection("127.0.0.1", hub.port, context=hub.ctx, timeout=30)
    c.request("PUT", path, body=data, headers=headers or {"x-ms-blob-type": "BlockBlob", "x-ms-version": "2020-04-08"})
    r = c.getresponse()
    body = r.read()
    h = {k.lower(): v for k, v in r.getheaders()}
    c.close()
    return r.status, h, body


def test_file_upload():
    hub = Hub(UPLOAD)
    key = hub.key(hub.device("f1"))
    tok = sas("f1", key)
    st, _, b = hub.dev("POST", "/devices/f1/files", {"blobName": "logs/day 1.txt"}, tok=tok)
    assert st == 200, b
    info = json.loads(b)
    assert set(info) == {"correlationId", "hostName", "containerName", "blobName", "sasToken"}, info
    assert info["containerName"] == "uploads" and info["blobName"] == "f1/logs/day 1.txt"
    assert info["sasToken"].startswith("?sv=") and "&sr=b&" in info["sasToken"] and "&sp=rw" in info["sasToken"]
    data = os.urandom(30000)
    st, h, body = blob_put(hub, info, data)
    assert st == 201, body
    for k in ("etag", "last-modified", "x-ms-request-id", "x-ms-version"):
        assert k in h, (k, h)
    stored = f"{hub.d}/state/uploads/f1/logs/day%201.txt"
    assert open(stored, "rb").read() == data
    # A tampered token, a token for another blob, no blob type.
    bad = dict(info, sasToken=info["sasToken"].replace("sig=", "sig=AA"))
    st, h, body = blob_put(hub, bad, b"x")
    assert st == 403 and h["x-ms-error-code"] == "AuthenticationFailed" and b"<Code>AuthenticationFailed" in body
    st, h, _ = blob_put(hub, info, b"x", name="f1/other.txt")
    assert st == 403 and h["x-ms-error-code"] == "AuthenticationFailed"
    st, h, _ = blob_put(hub, info, b"x", headers={"x-ms-version": "2020-04-08"})
    assert st == 400 and h["x-ms-error-code"] == "MissingRequiredHeader"

    # The notification: 204, then a fileNotifications event with the §5.8 body, seen by
    # `fieldhubctl monitor-events` too.
    mon = subprocess.Popen([os.environ.get("FIELDHUBCTL", "fieldhubctl"), "--socket", f"{hub.d}/admin.sock",
                            "monitor-events", "--device", "f1", "--json", "--properties", "--timeout", "4s"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    st, _, b = hub.dev("POST", "/devices/f1/files/notifications", {
        "correlationId": info["correlationId"], "isSuccess": True, "statusCode": 200,
        "statusDescription": "File uploaded successfully"}, tok=tok)
    assert st == 204, b
    notes = [e for e in read_events(hub, "f1")
             if e["properties"]["system"].get("iothub-message-source") == "fileNotifications"]
    assert len(notes) == 1, notes
    n = notes[0]["payload"]
    assert n["deviceId"] == "f1" and n["blobName"] == "f1/logs/day 1.txt" and n["blobSizeInBytes"] == 30000, n
    assert n["blobUri"] == f"https://127.0.0.1:{hub.port}/uploads/f1/logs/day 1.txt", n
    assert "lastUpdatedTime" in n and "enqueuedTimeUtc" in n
    out, err = mon.communicate(timeout=30)
    assert mon.returncode == 0, err
    seen = [json.loads(line)["event"] for line in out.splitlines()]
    assert [e["payload"]["blobName"] for e in seen] == ["f1/logs/day 1.txt"], out
    assert seen[0]["properties"]["system"]["iothub-message-source"] == "fileNotifications"

    # Block list upload.
    st, _, b = hub.dev("POST", "/devices/f1/files", {"blobName": "big.bin"}, tok=tok)
    info2 = json.loads(b)
    blocks = [os.urandom(20000), os.urandom(20000), os.urandom(5000)]
    ids = [base64.b64encode(f"block-{i:04d}".encode()).decode() for i in range(3)]
    for bid, blk in zip(ids, blocks):
        st, h, body = blob_put(hub, info2, blk, query=f"&comp=block&blockid={urllib.parse.quote(bid, safe='')}",
                               headers={"x-ms-version": "2020-04-08"})
        assert st == 201 and "x-ms-request-id" in h, body
    xml = ('<?xml version="1.0" encoding="utf-8"?><BlockList>' +
           "".join(f"<Latest>{i}</Latest>" for i in ids) + "</BlockList>").encode()
    st, h, body = blob_put(hub, info2, xml, query="&comp=blocklist", headers={"x-ms-version": "2020-04-08"})
    assert st == 201 and "etag" in h, body
    assert open(f"{hub.d}/state/uploads/f1/big.bin", "rb").read() == b"".join(blocks)
    assert not os.listdir(f"{hub.d}/state/uploads/.blocks"), os.listdir(f"{hub.d}/state/uploads/.blocks")
    bad = ('<BlockList><Latest>' + base64.b64encode(b"missing").decode() + '</Latest></BlockList>').encode()
    st, h, _ = blob_put(hub, info2, bad, query="&comp=blocklist", headers={"x-ms-version": "2020-04-08"})
    assert st == 400 and h["x-ms-error-code"] == "InvalidBlockList"

    # Two active uploads at most (file_upload.max_concurrent: 2): info2 is active.
    st, _, b = hub.dev("POST", "/devices/f1/files", {"blobName": "c.bin"}, tok=tok)
    assert st == 200
    info3 = json.loads(b)
    expect_error(jerr(hub.dev("POST", "/devices/f1/files", {"blobName": "d.bin"}, tok=tok)), 403,
                 "DeviceMaximumActiveFileUploadLimitExceeded")
    # The legacy notification (correlation id in the path), failure: frees the slot, no event.
    st, _, b = hub.dev("POST", "/devices/f1/files/notifications/" + urllib.parse.quote(info2["correlationId"], safe=""),
                       {"isSuccess": False, "statusCode": 500, "statusDescription": "aborted"}, tok=tok)
    assert st == 204, b
    # Another device cannot notify f1's upload.
    key9 = hub.key(hub.device("f9"))
    expect_error(jerr(hub.dev("POST", "/devices/f9/files/notifications", {
        "correlationId": info3["correlationId"], "isSuccess": True}, tok=sas("f9", key9))), 400, "ArgumentInvalid")

    # Limits: max_file 100 KiB, quota 200 KiB (30000 + 45000 used).
    st, h, _ = blob_put(hub, info3, os.urandom(101 * 1024))
    assert st == 413 and h["x-ms-error-code"] == "RequestBodyTooLarge", (st, h)
    st, h, _ = blob_put(hub, info3, os.urandom(90 * 1024))
    assert st == 201
    st, _, b = hub.dev("POST", "/devices/f1/files", {"blobName": "e.bin"}, tok=tok)
    info4 = json.loads(b)
    st, h, body = blob_put(hub, info4, os.urandom(90 * 1024))
    assert st == 409 and h["x-ms-error-code"] == "QuotaExceeded", (st, h, body)
    assert re.search(r"File upload of device f1: 409 QuotaExceeded", hub.daemon.log())
    # Overwriting a blob replaces its size in the quota.
    st, h, _ = blob_put(hub, info3, os.urandom(80 * 1024))
    assert st == 201
    hub.finish()

    # Tokens and correlation ids survive a restart (the upload key is in the state directory).
    hub.daemon = Daemon(hub.cfg)
    hub.daemon.wait_log(r"Metrics endpoint listening")
    hub.port = int(re.search(r"Service API listening on \S+ \(port (\d+), TLS\)", hub.daemon.log()).group(1))
    hub._conn = None
    st, _, b = hub.dev("POST", "/devices/f1/files/notifications", {
        "correlationId": info3["correlationId"], "isSuccess": True, "statusCode": 200, "statusDescription": "ok"},
        tok=tok)
    assert st == 204, b
    hub.finish()


def test_file_upload_large():
    """Default limits: a 24 MiB single put (over service_api.limits.max_body_bytes, which only
    the blob endpoint may exceed) and the same blob in 8 MiB blocks."""
    hub = Hub()
    key = hub.key(hub.device("big"))
    tok = sas("big", key)
    st, _, b = hub.dev("POST", "/devices/big/files", {"blobName": "large.bin"}, tok=tok)
    info = json.loads(b)
    data = os.urandom(24 << 20)
    st, _, body = blob_put(hub, info, data)
    assert st == 201, body
    assert os.path.getsize(f"{hub.d}/state/uploads/big/large.bin") == len(data)
    ids = [base64.b64encode(b"%08d" % i).decode() for i in range(3)]
    for i, bid in enumerate(ids):
        st, _, body = blob_put(hub, info, data[i * (8 << 20):(i + 1) * (8 << 20)],
                               query="&comp=block&blockid=" + urllib.parse.quote(bid, safe=""),
                               headers={"x-ms-version": "2020-04-08"})
        assert st == 201, body
    xml = "<BlockList>" + "".join(f"<Uncommitted>{i}</Uncommitted>" for i in ids) + "</BlockList>"
    st, _, body = blob_put(hub, info, xml.encode(), query="&comp=blocklist", headers={"x-ms-version": "2020-04-08"})
    assert st == 201, body
    assert open(f"{hub.d}/state/uploads/big/large.bin", "rb").read() == data
    # The service routes keep their own limit (256 KiB in this configuration).
    st, _, _ = hub.req("PUT", "/devices/huge", b'{"deviceId":"huge","x":"' + b"y" * (300 << 10) + b'"}')
    assert st == 413, st
    hub.finish()


# ---- throttling ---------------------------------------------------------------------------


def test_throttling():
    hub = Hub("""http_device:
  limits:
    max_messages_per_second: 5
    max_shaping_delay: 500ms
""")
    key = hub.key(hub.device("t1"))
    tok = sas("t1", key)
    c = http.client.HTTPSConnection("127.0.0.1", hub.port, context=hub.ctx, timeout=30)
    t0 = time.monotonic()
    codes = []
    for i in range(15):
        c.request("POST", f"/devices/t1/messages/events?api-version={VERSION}", body=b"x",
                  headers={"Authorization": tok})
        r = c.getresponse()
        r.read()
        codes.append(r.status)
    took = time.monotonic() - t0
    assert codes == [204] * 15, codes                  # shaped, not refused
    assert took >= 1.5, took                          # 5 in the bucket, then 5/s
    batch = json.dumps([{"body": ""}] * 20)
    st, h, b = jerr(hub.dev("POST", "/devices/t1/messages/events", batch, tok=tok,
                            headers={"Content-Type": "application/vnd.microsoft.iothub.json"}))
    expect_error((st, h, b), 429, "ThrottlingException")
    assert re.search(r"HTTP device t1 sends more than 5 messages/s", hub.daemon.log())
    # Another device is not slowed down.
    key2 = hub.key(hub.device("t2"))
    t0 = time.monotonic()
    for i in range(4):
        assert hub.dev("POST", "/devices/t2/messages/events", b"x", tok=sas("t2", key2))[0] == 204
    assert time.monotonic() - t0 < 3
    hub.finish()


# ---- kill -9 ------------------------------------------------------------------------------


def test_kill9_loses_nothing_acknowledged():
    hub = Hub()
    devs = [(f"k9-{i}", hub.key(hub.device(f"k9-{i}"))) for i in range(4)]
    acked = set()
    lock = threading.Lock()
    stop = threading.Event()

    def run(dev_id, key):
        tok = sas(dev_id, key)
        c = None
        n = 0
        while not stop.is_set():
            mid = f"{dev_id}-{n}"
            n += 1
            try:
                if c is None:
                    c = http.client.HTTPSConnection("127.0.0.1", hub.port, context=hub.ctx, timeout=5)
                c.request("POST", f"/devices/{dev_id}/messages/events?api-version={VERSION}", body=mid.encode(),
                          headers={"Authorization": tok, "iothub-messageid": mid})
                r = c.getresponse()
                r.read()
                if r.status == 204:
                    with lock:
                        acked.add(mid)
            except Exception:
                c = None
                time.sleep(0.05)

    threads = [threading.Thread(target=run, args=dk) for dk in devs]
    for t in threads:
        t.start()
    time.sleep(random.uniform(1.5, 3.0))
    hub.daemon.kill()
    with lock:
        snapshot = set(acked)
    stop.set()
    for t in threads:
        t.join()
    assert len(snapshot) > 20, len(snapshot)
    hub.daemon = Daemon(hub.cfg)
    hub.daemon.wait_log(r"Metrics endpoint listening")
    got = {e["properties"]["system"].get("message-id") for e in telemetry(read_events(hub, quiet=8.0))}
    missing = snapshot - got
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
    print(f"   {len(snapshot)} acknowledged before kill -9, all {len(snapshot)} in the events stream")
    hub.finish()


if __name__ == "__main__":
    main([
        test_events_single_batch_module,
        test_bad_input_and_limits,
        test_authentication,
        test_c2d_lifecycle_and_feedback,
        test_c2d_lock_timeout,
        test_x509,
        test_file_upload,
        test_file_upload_large,
        test_throttling,
        test_kill9_loses_nothing_acknowledged,
    ])
