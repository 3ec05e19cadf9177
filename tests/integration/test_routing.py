#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Routing and store-and-forward against a real mosquitto (started here, own config, loopback
port, stopped by pid): routing by application property and by $body, the fallback, enrichments
(seen in the file endpoint's JSON lines), the mqtt endpoint's topics and payloads checked by a
paho subscriber, an outage while messages arrive (every message delivered in order per device
after the broker is back), kill -9 of fieldhubd during the drain (nothing lost), file rotation,
and `fieldhubctl endpoints`."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paho.mqtt.client as mqtt  # noqa: E402

import test_mqtt  # noqa: E402
from fhlib import FIELDHUBCTL, Daemon, at_exit, main, write  # noqa: E402

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Broker:
    def __init__(self, d, port):
        self.d, self.port = d, port
        # As root, mosquitto drops to the mosquitto user, who cannot write its persistence file
        # into this private directory: the subscriber's session (and what was queued for it)
        # would not survive a restart, and a gateway that drains at once would "lose" messages.
        user = "user root\n" if os.geteuid() == 0 else ""
        self.cfg = write(f"{d}/mosquitto.conf", f"{user}listener {port} 127.0.0.1\nallow_anonymous true\n"
                                                f"persistence true\npersistence_location {d}/\n"
                                                "max_queued_messages 0\nmax_inflight_messages 0\n")
        self.proc = None
        at_exit(self.stop)  # whatever happens to the test, the broker is stopped by pid
        self.start()

    def start(self):
        self.proc = subprocess.Popen([MOSQUITTO, "-c", self.cfg], stdout=subprocess.DEVNULL,
                                     stderr=open(f"{self.d}/mosquitto.log", "ab"))
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("mosquitto did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


class Sub:
    """A paho subscriber on the broker, recording (topic, payload)."""

    def __init__(self, port, topic="fh/#"):
        self.msgs, self.lock, self.ready = [], threading.Lock(), threading.Event()
        self.c = mqtt.Client(client_id=f"sub-{os.getpid()}", clean_session=False, protocol=mqtt.MQTTv311)
        self.c.on_connect = lambda c, u, f, rc: (c.subscribe(topic, 1), self.ready.set())
        self.c.on_message = self._msg
        self.c.reconnect_delay_set(0.1, 0.5)
        self.c.connect("127.0.0.1", port, 30)
        self.c.loop_start()
        assert self.ready.wait(10)
        time.sleep(0.2)

    def _msg(self, c, u, m):
        with self.lock:
            self.msgs.append((m.topic, m.payload))

    def wait(self, n, timeout=30):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if len(self.msgs) >= n:
                    return list(self.msgs)
            time.sleep(0.05)
        with self.lock:
            raise AssertionError(f"expected {n} messages on the broker, got {len(self.msgs)}")

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def endpoints(hub):
    out = subprocess.run([FIELDHUBCTL, "--socket", f"{hub.d}/admin.sock", "--json", "endpoints"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return {e["name"]: e for e in json.loads(out.stdout)}


def config(port, logs, extra_ep="", extra_routes=""):
    return f"""logs_dir: {logs}
endpoints:
  - name: broker
    type: mqtt
    address: tcp://127.0.0.1:{port}
    topic: "fh/{{deviceId}}/{{severity}}"
    retry: {{initial: 100ms, max: 500ms}}
    queue: {{max_messages: 100000}}
    inflight: 50
  - name: archive
    type: file
    file: archive.jsonl
    max_size: 8KiB
    max_files: 3
{extra_ep}
routes:
  - name: alarms
    condition: "severity = 'high'"
    endpoint: broker
  - name: hot
    condition: "$body.temp > 30"
    endpoint: broker
  - name: everything
    condition: "true"
    endpoint: archive
  - name: twins
    source: TwinChangeEvents
    endpoint: archive
    enabled: false
{extra_routes}
enrichments:
  - key: site
    value: berlin
    endpoints: [archive, broker]
  - key: hub
    value: $iothubname
    endpoints: [archive]
  - key: loc
    value: $twin.tags.location
    endpoints: [archive]
"""


def publish(cl, dev, body, props="", n=1):
    for _ in range(n):
        info = cl.c.publish(f"devices/{dev}/messages/events/{props}", body, qos=1)
        info.wait_for_publish(10)
        assert info.is_published()


def archive_lines(logs):
    lines = []
    for name in sorted(os.listdir(logs)):
        if name.startswith("archive.jsonl"):
            with open(f"{logs}/{name}") as f:
                lines += [json.loads(x) for x in f if x.strip()]
    return lines


def test_routing():
    import tempfile
    d = tempfile.mkdtemp(prefix="fieldhub-test-routing-")
    logs = f"{d}/logs"
    os.makedirs(logs)
    port = free_port()
    broker = Broker(d, port)
    hub = test_mqtt.Hub(config(port, logs))
    hub.daemon.wait_log(r"Endpoint broker connected")
    sub = Sub(port)
    dev = hub.device("dev1")
    dev2 = hub.device("dev2")
    c1 = test_mqtt.connect(hub, "dev1", hub.key(dev))
    c2 = test_mqtt.connect(hub, "dev2", hub.key(dev2))

    # By application property, by $body (JSON content type + encoding), and neither.
    publish(c1, "dev1", b"alarm!", "severity=high")
    publish(c1, "dev1", b'{"temp": 35}', "%24.ct=application%2Fjson&%24.ce=utf-8&severity=low")
    publish(c1, "dev1", b'{"temp": 35}', "severity=low")          # no content type: $body undefined
    publish(c1, "dev1", b'{"temp": 10}', "%24.ct=application%2Fjson&%24.ce=utf-8")
    got = sub.wait(2)
    time.sleep(0.5)
    got = sub.msgs
    assert got == [("fh/dev1/high", b"alarm!"), ("fh/dev1/low", b'{"temp": 35}')], got

    # The file endpoint saw all four, enriched; the literal path where the twin has no tag.
    test_mqtt.wait_for(lambda: len(archive_lines(logs)) >= 4, what="archive lines")
    lines = archive_lines(logs)
    assert [x["deviceId"] for x in lines[:4]] == ["dev1"] * 4
    assert lines[0]["properties"]["site"] == "berlin" and lines[0]["properties"]["loc"] == "$twin.tags.location"
    assert lines[0]["properties"]["hub"] == test_mqtt.HOST, lines[0]
    assert lines[1]["body"] == {"temp": 35}, lines[1]
    assert lines[0]["bodyText"] == "alarm!"

    # Outage: the broker stops while messages arrive; all delivered, in order per device.
    broker.stop()
    hub.daemon.wait_log(r"Endpoint broker is unreachable")
    N = 300
    for i in range(N):
        publish(c1, "dev1", f"a{i}".encode(), "severity=high")
        publish(c2, "dev2", f"b{i}".encode(), "severity=high")
    eps = endpoints(hub)
    assert eps["broker"]["state"] in ("down", "connecting") and eps["broker"]["backlog"]["count"] >= 2 * N, eps["broker"]
    t0 = time.monotonic()
    broker.start()
    got = sub.wait(2 + 2 * N, timeout=60)
    print(f"drain of {2 * N} after reconnect: {time.monotonic() - t0:.2f} s", file=sys.stderr)
    hub.daemon.wait_log(r"Endpoint broker is reachable again")
    for dv, pfx in (("dev1", "a"), ("dev2", "b")):
        seq = [p.decode() for t, p in got[2:] if t == f"fh/{dv}/high"]
        assert seq == [f"{pfx}{i}" for i in range(N)], seq[:10]

    # kill -9 in the middle of the drain, restart: nothing lost (duplicates allowed, counted).
    # A backlog of M messages and a window of 50 (the endpoint's `inflight`) make the drain
    # take many round trips; the kill comes as soon as the gateway's cursor moved (the
    # endpoint reconnects within ~0.1 s of the broker's return, before the subscriber's own
    # reconnect: the broker queues for its persistent session), and the test checks that the
    # drain had really not finished then.
    broker.stop()
    hub.daemon.wait_log(r"Endpoint broker is unreachable")
    M = 6000
    for i in range(M):
        c1.c.publish(f"devices/dev1/messages/events/severity=high", f"k{i}".encode(), qos=1)
    end = time.monotonic() + 60
    while endpoints(hub)["broker"]["backlog"]["count"] < M and time.monotonic() < end:
        time.sleep(0.1)
    assert endpoints(hub)["broker"]["backlog"]["count"] >= M
    c1.close()
    c2.close()
    before = len(sub.msgs)
    d0 = endpoints(hub)["broker"]["delivered"]
    broker.start()
    end = time.monotonic() + 30
    while time.monotonic() < end and endpoints(hub)["broker"]["delivered"] == d0:
        pass
    hub.daemon.proc.kill()
    hub.daemon.proc.wait()
    # What the broker had already received reaches the subscriber (once it reconnected).
    at_kill, end = -1, time.monotonic() + 15
    while time.monotonic() < end:
        time.sleep(0.5)
        with sub.lock:
            n = len({p for t, p in sub.msgs[before:] if p.startswith(b"k")})
        if n == at_kill and n > 0:
            break
        at_kill = n
    assert 0 < at_kill < M, f"the kill was not in the middle of the drain ({at_kill} of {M} delivered)"
    hub.daemon = Daemon(hub.cfg)
    hub.daemon.wait_log(r"Endpoint broker connected")
    end = time.monotonic() + 60
    while time.monotonic() < end:
        with sub.lock:
            seen = {p.decode() for t, p in sub.msgs[before:]}
        if all(f"k{i}" in seen for i in range(M)):
            break
        time.sleep(0.1)
    with sub.lock:
        ks = [p.decode() for t, p in sub.msgs[before:] if p.startswith(b"k")]
    missing = [i for i in range(M) if f"k{i}" not in set(ks)]
    assert not missing, f"lost after kill -9: {missing[:20]}"
    dups = len(ks) - M
    print(f"kill -9 during drain: killed after {at_kill} of {M} delivered; all {M} delivered after the restart, "
          f"{dups} duplicates (the unconfirmed window resent)", file=sys.stderr)
    # Only messages delivered before the kill (whose cursor move was not yet durable) come again.
    assert 0 <= dups <= at_kill, (dups, at_kill)
    # Order: the first occurrence of each message is in order.
    firsts, seen_set = [], set()
    for k in ks:
        if k not in seen_set:
            seen_set.add(k)
            firsts.append(k)
    assert firsts == [f"k{i}" for i in range(M)]

    # File rotation: max_size 8 KiB, max_files 3: archive.jsonl, .1, .2 and no more.
    files = sorted(x for x in os.listdir(logs) if x.startswith("archive.jsonl"))
    assert files == ["archive.jsonl", "archive.jsonl.1", "archive.jsonl.2"], files
    for x in files:
        assert os.path.getsize(f"{logs}/{x}") <= 8192

    eps = endpoints(hub)
    assert eps["broker"]["state"] == "up" and eps["broker"]["backlog"]["count"] == 0, eps
    sub.close()
    hub.finish()
    broker.stop()


def test_overflow_and_ttl():
    """drop-oldest counted; reject-new: no PUBACK and the connection closed (MQTT 3.1.1 has no
    negative acknowledgement: the device keeps the message and publishes it again after it
    reconnects, as IoT Hub SDKs do after a throttling disconnect); TTL expiry counted; each
    logged. The counters move at once, the log lines on the uplink's next one-second tick: the
    test waits for each line (reading the log once right after the counters raced the tick)."""
    import tempfile
    d = tempfile.mkdtemp(prefix="fieldhub-test-routing-")
    logs = f"{d}/logs"
    os.makedirs(logs)
    port = free_port()  # no broker: the endpoints stay down
    extra = """  - name: dropper
    type: mqtt
    address: tcp://127.0.0.1:{port}
    topic: "x/{{deviceId}}"
    queue: {{max_messages: 10, overflow: drop-oldest}}
  - name: rejecter
    type: mqtt
    address: tcp://127.0.0.1:{port}
    topic: "y/{{deviceId}}"
    queue: {{max_messages: {cap}, overflow: reject-new}}
  - name: shortlived
    type: mqtt
    address: tcp://127.0.0.1:{port}
    topic: "z/{{deviceId}}"
    queue: {{ttl: 1s}}
"""
    routes = """  - name: d
    condition: "true"
    endpoint: dropper
  - name: r
    condition: "true"
    endpoint: rejecter
  - name: s
    condition: "true"
    endpoint: shortlived
"""
    hub = test_mqtt.Hub(config(port, logs, extra.format(port=port, cap=20), routes))
    dev = hub.device("dev1")
    c1 = test_mqtt.connect(hub, "dev1", hub.key(dev))
    c1.c.reconnect_delay_set(0.1, 0.5)
    # The outbox also holds the hub's own events (lifecycle, connection state): they count
    # toward every endpoint's backlog too. Publish until reject-new refuses (no PUBACK).
    acked, refused = 0, None
    for i in range(25):
        info = c1.c.publish("devices/dev1/messages/events/", f"m{i}".encode(), qos=1)
        info.wait_for_publish(3)
        if not info.is_published():
            refused = (i, info)
            break
        acked += 1
    assert refused is not None and 10 < acked < 20, acked
    hub.daemon.wait_log(r"MQTT.*dev1.*the hub's message store is full")  # the connection was closed
    eps = endpoints(hub)
    # Everything stored is in the rejecter's backlog (it never drops): exactly its capacity.
    assert eps["rejecter"]["backlog"]["count"] == 20 and eps["rejecter"]["rejected"] >= 1, eps["rejecter"]
    assert eps["dropper"]["backlog"]["count"] == 10 and eps["dropper"]["drops"] == 10, eps["dropper"]
    test_mqtt.wait_for(lambda: endpoints(hub)["shortlived"]["expiries"] >= 20, timeout=10, what="expiries")
    hub.daemon.wait_log(r"Endpoint dropper is over capacity: dropped the \d+ oldest messages", timeout=5)
    hub.daemon.wait_log(r"Endpoint rejecter is full: refused \d+ new messages", timeout=5)
    hub.daemon.wait_log(r"Endpoint shortlived: \d+ messages expired \(TTL\)", timeout=5)
    assert not refused[1].is_published()
    # The publisher kept its copy: once the rejecter has room (a reload raises its capacity),
    # paho's re-publish after its reconnect is accepted.
    write(hub.cfg, open(hub.cfg).read().replace("max_messages: 20, overflow: reject-new",
                                                "max_messages: 100, overflow: reject-new"))
    hub.daemon.proc.send_signal(signal.SIGHUP)
    hub.daemon.wait_log(r"Configuration reloaded")
    refused[1].wait_for_publish(20)
    assert refused[1].is_published()
    test_mqtt.wait_for(lambda: endpoints(hub)["rejecter"]["backlog"]["count"] > 20, timeout=10, what="re-publish")
    c1.c.disconnect()
    c1.c.loop_stop()
    hub.finish()


if __name__ == "__main__":
    main([test_routing, test_overflow_and_ttl])
