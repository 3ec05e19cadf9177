#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""By-hand benchmark of the service API: registry GET and twin PATCH requests per second over
keep-alive HTTPS with N concurrent clients (processes), and query latency over a seeded
registry. Not part of CI.

    FIELDHUBD=build/gateway/fieldhubd python3 tests/bench/bench-api.py [--clients 50] [--seconds 10]
        [--devices 10000]

The client is python (one process per connection): on a small box it is itself a limit, so
compare with the same client against a ceiling (e.g. nginx serving a static JSON file) when one
is available; GET /health (same HTTP, TLS and token path, no store read) is measured as the
HTTP-layer ceiling of this client."""

import argparse
import json
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
import fhlib  # noqa: E402
import test_api  # noqa: E402


def worker(port, ca, seconds, kind, n_devices, idx, q):
    import http.client
    import ssl
    ctx = ssl.create_default_context(cafile=ca)
    c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx)
    tok = test_api.token()
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        dev = f"bench-{(idx * 7919 + n) % n_devices:06d}"
        if kind == "health":
            c.request("GET", "/health", headers={"Authorization": tok})
        elif kind == "get":
            c.request("GET", f"/devices/{dev}?api-version=2021-04-12", headers={"Authorization": tok})
        else:
            body = json.dumps({"properties": {"desired": {"n": n}}})
            c.request("PATCH", f"/twins/{dev}?api-version=2021-04-12", body=body,
                      headers={"Authorization": tok, "Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        if r.status != 200:
            raise SystemExit(f"unexpected {r.status}")
        n += 1
    q.put(n)


def run(hub, kind, clients, seconds, n_devices):
    q = multiprocessing.Queue()
    ps = [multiprocessing.Process(target=worker, args=(hub.port, hub.ca, seconds, kind, n_devices, i, q))
          for i in range(clients)]
    for p in ps:
        p.start()
    total = sum(q.get() for _ in ps)
    for p in ps:
        p.join()
    return total / seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--devices", type=int, default=10000)
    a = ap.parse_args()
    hub = test_api.Hub(extra="")
    try:
        for start in range(0, a.devices, 100):
            entries = [{"id": f"bench-{i:06d}", "importMode": "create"}
                       for i in range(start, min(a.devices, start + 100))]
            assert hub.req("POST", "/devices", entries)[0] == 200
        for i in range(0, a.devices, 10):
            hub.req("PATCH", f"/twins/bench-{i:06d}", {"tags": {"site": "x" if i % 100 == 0 else "y"}})
        print(f"GET /health  : {run(hub, 'health', a.clients, a.seconds, a.devices):8.0f} req/s "
              f"(HTTP + TLS + token check, no store read: the HTTP-layer ceiling)")
        print(f"registry GET : {run(hub, 'get', a.clients, a.seconds, a.devices):8.0f} req/s "
              f"({a.clients} keep-alive HTTPS clients)")
        print(f"twin PATCH   : {run(hub, 'patch', a.clients, a.seconds, a.devices):8.0f} req/s")
        q = "SELECT * FROM devices WHERE tags.site = 'x'"
        t0 = time.monotonic()
        rows, cont = [], None
        while True:
            h = {"x-ms-max-item-count": "1000"}
            if cont:
                h["x-ms-continuation"] = cont
            st, hh, r = hub.req("POST", "/devices/query", {"query": q}, headers=h)
            rows += r
            cont = hh.get("x-ms-continuation")
            if not cont:
                break
        print(f"query        : {(time.monotonic() - t0) * 1000:8.1f} ms for {len(rows)} rows over "
              f"{a.devices} twins ({q})")
    finally:
        fhlib.run_cleanups()


if __name__ == "__main__":
    main()
