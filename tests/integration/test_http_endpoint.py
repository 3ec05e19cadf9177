#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The http endpoint against a small local HTTPS receiver (python's http.server over TLS with a
certificate made here by openssl, trusted through tls.ca_file): JSON array batches of at most
batch.max_messages, headers from the config (one from a key file, never logged), 500s answered
for a while (one with Retry-After) then every message delivered once acknowledged, in order;
a 400 for one message inside a batch: the batch is split, that message is retried
client_error_tries times, counted as poison and skipped (on_client_error: skip), the others
delivered; with on_client_error: retry nothing is skipped and the message goes through once the
receiver accepts it."""

import http.server
import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_mqtt  # noqa: E402
from test_routing import endpoints, publish  # noqa: E402
from fhlib import main, write  # noqa: E402

SECRET = "s3cr3t-api-key-value"


class Receiver:
    """An HTTPS server recording each request: (headers, parsed JSON body, status answered)."""

    def __init__(self, d):
        self.cert, self.key = f"{d}/recv.crt", f"{d}/recv.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", self.key, "-out", self.cert], check=True, capture_output=True)
        self.lock = threading.Lock()
        self.requests = []      # (headers dict, body list, status)
        self.fail_next = 0      # answer 500 to this many requests
        self.retry_after = None # seconds, on the next failure
        self.refuse = set()     # bodyText values whose presence in a batch gets 400
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(n))
                with outer.lock:
                    texts = {m.get("bodyText") for m in body}
                    if outer.fail_next > 0:
                        outer.fail_next -= 1
                        status, extra = 500, {}
                        if outer.retry_after is not None:
                            extra = {"Retry-After": str(outer.retry_after)}
                            outer.retry_after = None
                    elif texts & outer.refuse:
                        status, extra = 400, {}
                    else:
                        status, extra = 200, {}
                    outer.requests.append((dict(self.headers), body, status, time.monotonic()))
                answer = b'{"error":"no"}' if status != 200 else b"{}"
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        self.srv.socket = ctx.wrap_socket(self.srv.socket, server_side=True)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def delivered(self):
        """bodyText of every message in a 200 answer, in arrival order."""
        with self.lock:
            return [m.get("bodyText") for h, b, st, t in self.requests if st == 200 for m in b]

    def close(self):
        self.srv.shutdown()


def config(port, cert, keyfile, logs, policy, tries=2):
    return f"""logs_dir: {logs}
endpoints:
  - name: hook
    type: http
    url: https://127.0.0.1:{port}/ingest
    headers:
      - name: X-Api-Key
        value_file: {keyfile}
      - name: X-Site
        value: berlin
    tls: {{ca_file: {cert}}}
    batch: {{max_messages: 5, max_delay: 100ms}}
    retry: {{initial: 100ms, max: 300ms}}
    on_client_error: {policy}
    client_error_tries: {tries}
routes:
  - name: all
    condition: "true"
    endpoint: hook
"""


def wait_delivered(rc, want, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = rc.delivered()
        if all(w in got for w in want):
            return got
        time.sleep(0.05)
    raise AssertionError(f"not delivered: {[w for w in want if w not in rc.delivered()]}; got {rc.delivered()}")


def first_occurrences(seq):
    seen, out = set(), []
    for x in seq:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def test_http_skip():
    d = tempfile.mkdtemp(prefix="fieldhub-test-http-")
    logs = f"{d}/logs"
    os.makedirs(logs)
    rc = Receiver(d)
    keyfile = write(f"{d}/api.key", SECRET + "\n")
    os.chmod(keyfile, 0o600)
    hub = test_mqtt.Hub(config(rc.port, rc.cert, keyfile, logs, "skip"))
    hub.daemon.wait_log(r"Endpoint hook connected")
    dev = hub.device("dev1")
    c1 = test_mqtt.connect(hub, "dev1", hub.key(dev))

    # 500 for three requests (the first with Retry-After: 2): nothing lost, order kept.
    with rc.lock:
        rc.fail_next, rc.retry_after = 3, 2
    t0 = time.monotonic()
    N = 23
    for i in range(N):
        publish(c1, "dev1", f"m{i}".encode())
    got = wait_delivered(rc, [f"m{i}" for i in range(N)])
    assert first_occurrences([x for x in got if x and x.startswith("m")]) == [f"m{i}" for i in range(N)], got
    with rc.lock:
        reqs = list(rc.requests)
    fails = [r for r in reqs if r[2] == 500]
    assert len(fails) == 3, [r[2] for r in reqs]
    # Retry-After: 2 honoured: the request after the first 500 came at least ~2 s later.
    i500 = reqs.index(fails[0])
    assert reqs[i500 + 1][3] - reqs[i500][3] >= 1.9, (reqs[i500 + 1][3] - reqs[i500][3])
    for h, body, st, t in reqs:
        assert 1 <= len(body) <= 5, len(body)
        assert h.get("X-Api-Key") == SECRET and h.get("X-Site") == "berlin", h
        assert h.get("Content-Type") == "application/json", h
        for m in body:
            assert m["endpoint"] == "hook" and m["deviceId"] == "dev1" and isinstance(m["sequenceNumber"], int), m
    hub.daemon.wait_log(r"Endpoint hook is unreachable \(HTTP 500, Retry-After 2s")
    hub.daemon.wait_log(r"Endpoint hook is reachable again")
    print(f"{N} messages through 3 HTTP 500s in {time.monotonic() - t0:.2f} s, {len(reqs)} requests",
          file=sys.stderr)

    # A message the receiver refuses (400) inside a batch: split, retried twice, skipped as
    # poison; its neighbours are delivered in order.
    with rc.lock:
        rc.refuse = {"bad"}
    msgs = ["p0", "p1", "bad", "p2", "p3"]
    for x in msgs:
        publish(c1, "dev1", x.encode())
    got = wait_delivered(rc, ["p0", "p1", "p2", "p3"])
    assert "bad" not in got
    assert first_occurrences([x for x in got if x and x.startswith("p")]) == ["p0", "p1", "p2", "p3"], got
    test_mqtt.wait_for(lambda: endpoints(hub)["hook"]["poison"] == 1, timeout=10, what="poison count")
    with rc.lock:
        singles = [b for h, b, st, t in rc.requests if st == 400 and len(b) == 1]
    assert len(singles) == 2, len(singles)  # client_error_tries: 2
    hub.daemon.wait_log(r"the receiver refused message \d+ \(HTTP 400.*skipping it")
    hub.daemon.wait_log(r"refused message \d+ for good \(HTTP 400\); it is skipped")
    # The receiver records a batch before fieldhubd reads its answer: wait for the cursor.
    test_mqtt.wait_for(lambda: endpoints(hub)["hook"]["backlog"]["count"] == 0, timeout=10, what="empty backlog")
    ep = endpoints(hub)["hook"]
    assert ep["state"] == "up" and ep["backlog"]["count"] == 0 and ep["type"] == "http", ep
    assert SECRET not in hub.daemon.log()
    # The same per endpoint in the Prometheus metrics.
    import http.client
    mc = http.client.HTTPConnection("127.0.0.1", hub.mport, timeout=10)
    mc.request("GET", "/metrics")
    text = mc.getresponse().read().decode()
    mc.close()
    lbl = '{endpoint="hook",type="http"}'
    assert f"fieldhub_endpoint_poison_total{lbl} 1\n" in text, text
    assert f"fieldhub_endpoint_up{lbl} 1\n" in text and f"fieldhub_endpoint_backlog_messages{lbl} 0\n" in text
    delivered = int(re.search(r"fieldhub_endpoint_delivered_total" + re.escape(lbl) + r" (\d+)", text).group(1))
    assert delivered >= N + 4, delivered
    c1.close()
    hub.finish()
    rc.close()


def test_http_retry():
    """on_client_error: retry (the default): a refused message holds the endpoint (never
    dropped) until the receiver accepts it."""
    d = tempfile.mkdtemp(prefix="fieldhub-test-http-")
    logs = f"{d}/logs"
    os.makedirs(logs)
    rc = Receiver(d)
    keyfile = write(f"{d}/api.key", SECRET + "\n")
    hub = test_mqtt.Hub(config(rc.port, rc.cert, keyfile, logs, "retry"))
    hub.daemon.wait_log(r"Endpoint hook connected")
    dev = hub.device("dev1")
    c1 = test_mqtt.connect(hub, "dev1", hub.key(dev))
    with rc.lock:
        rc.refuse = {"bad"}
    for x in ["r0", "bad", "r1"]:
        publish(c1, "dev1", x.encode())
    wait_delivered(rc, ["r0"])
    test_mqtt.wait_for(lambda: sum(1 for r in rc.requests if r[2] == 400 and len(r[1]) == 1) >= 3,
                       timeout=15, what="repeated 400s")
    assert "r1" not in rc.delivered()  # in order: nothing overtakes the refused message
    ep = endpoints(hub)["hook"]
    assert ep["poison"] == 0 and ep["backlog"]["count"] >= 2, ep
    hub.daemon.wait_log(r"retrying until it is accepted \(on_client_error: retry\)")
    with rc.lock:
        rc.refuse = set()
    got = wait_delivered(rc, ["bad", "r1"])
    assert first_occurrences([x for x in got if x in ("r0", "bad", "r1")]) == ["r0", "bad", "r1"], got
    # Messages not routed here (the disconnect's connection-state event) are passed over at
    # once: the backlog empties although nothing more is sent.
    c1.close()
    test_mqtt.wait_for(lambda: endpoints(hub)["hook"]["backlog"]["count"] == 0, timeout=10, what="empty backlog")
    hub.finish()
    rc.close()


def test_http_config_errors():
    """Plain http:// only to loopback; bad keys are config errors with their position."""
    from fhlib import FIELDHUBD
    d = tempfile.mkdtemp(prefix="fieldhub-test-http-")
    cases = [
        ("url: http://example.com/x", "plain http:// only to"),
        ("url: ftp://127.0.0.1/x", "expected an https:// URL"),
        ("url: https://127.0.0.1/x\n    on_client_error: drop", "on_client_error"),
    ]
    for line, want in cases:
        cfg = write(f"{d}/c.yaml", f"""hub:
  host_name: hub.test.local
state_dir: {d}/state
endpoints:
  - name: hook
    type: http
    {line}
""")
        out = subprocess.run([FIELDHUBD, "--check-config", "--config", cfg], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode != 0 and want in out.stderr, (line, out.returncode, out.stderr)
    cfg = write(f"{d}/c.yaml", f"""hub:
  host_name: hub.test.local
state_dir: {d}/state
endpoints:
  - name: hook
    type: http
    url: http://127.0.0.1:8080/x
""")
    out = subprocess.run([FIELDHUBD, "--check-config", "--config", cfg], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


if __name__ == "__main__":
    main([test_http_config_errors, test_http_skip, test_http_retry])
