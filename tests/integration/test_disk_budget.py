#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The store's disk budget (store.max_size) and a really full disk.

test_budget: a 2 MiB budget, an mqtt endpoint whose broker (mosquitto, started here) is down:
MQTT publishes (paho, 2 KB each) fill the budget until the hub refuses (no PUBACK, the
connection closed), the daemon keeps running and says so once (MESSAGE_ID STORE_ERROR, "The
store is full"), the files stay within the budget; the broker comes back, the endpoint drains,
the outbox collection frees the rows and publishes are accepted again ("The store has space
again"); the freed pages are reused (the database file does not grow on the second fill).

test_tmpfs_full: as root, in a private mount namespace (unshare -m), the state directory is a
4 MiB tmpfs and there is no budget: the same fill ends in a real ENOSPC from the file system.
The daemon keeps running, says so, nothing half-written (every acknowledged message is
delivered after the broker returns, the store passes its integrity check on the next start),
and it accepts messages again once delivered ones are collected."""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_mqtt  # noqa: E402
from fhlib import Daemon, main  # noqa: E402
from test_routing import Broker, endpoints, free_port  # noqa: E402

BODY = b"x" * 2000


def config(port, budget=None):
    store = f"store:\n  max_size: {budget}\n" if budget else ""
    return store + f"""endpoints:
  - name: broker
    type: mqtt
    address: tcp://127.0.0.1:{port}
    topic: "fh/{{deviceId}}"
    retry: {{initial: 100ms, max: 300ms}}
routes:
  - name: all
    condition: "true"
    endpoint: broker
"""


def fill(hub, dev, key, limit=5000):
    """Publishes until the hub refuses one (no PUBACK within the time). Returns (the number
    acknowledged, the client, the refused message's info)."""
    c = test_mqtt.connect(hub, dev, key)
    c.c.reconnect_delay_set(0.2, 0.5)
    acked = 0
    for i in range(limit):
        info = c.c.publish(f"devices/{dev}/messages/events/", BODY + str(i).encode(), qos=1)
        info.wait_for_publish(3)
        if not info.is_published():
            return acked, c, info
        acked += 1
    raise AssertionError(f"{limit} messages accepted: no refusal")


def files_size(state):
    return sum(os.path.getsize(f"{state}/{f}") for f in os.listdir(state) if f.startswith("fieldhub.db"))


def budget_run(hub, state, budget=None):
    port = hub.broker_port
    dev = hub.device("dev1")
    key = hub.key(dev)

    acked, c, refused = fill(hub, "dev1", key)
    print(f"first fill: {acked} messages of {len(BODY)} bytes accepted, then refused", file=sys.stderr)
    assert acked > 100, acked
    hub.daemon.wait_log(r"The store is full", timeout=10)
    assert hub.daemon.proc.poll() is None
    time.sleep(2)  # further refusals (paho re-publishes) must not log it again
    assert len(re.findall(r"The store is full \(", hub.daemon.log())) == 1, hub.daemon.log()[-3000:]
    ep = endpoints(hub)["broker"]  # the daemon still answers
    assert ep["backlog"]["count"] >= acked, ep
    if budget:
        assert files_size(state) <= budget, (files_size(state), budget)
    size_full = os.path.getsize(f"{state}/fieldhub.db")

    # The broker returns: everything acknowledged is delivered, the rows are collected, and the
    # refused message (paho kept it) is accepted.
    broker = Broker(hub.d, port)
    refused.wait_for_publish(60)
    assert refused.is_published()
    hub.daemon.wait_log(r"The store has space again", timeout=30)
    test_mqtt.wait_for(lambda: endpoints(hub)["broker"]["backlog"]["count"] == 0, timeout=60, what="drain")
    c.close()

    # Space reused: a second fill after the drain accepts about as much again, and the file does
    # not grow past what the first fill made.
    broker.stop()
    time.sleep(1.5)  # gc has run: what was delivered is deleted
    acked2, c2, refused2 = fill(hub, "dev1", key)
    print(f"second fill: {acked2} accepted", file=sys.stderr)
    assert acked2 > acked // 2, (acked, acked2)
    assert os.path.getsize(f"{state}/fieldhub.db") <= size_full + 64 * 1024, (size_full,
                                                                           os.path.getsize(f"{state}/fieldhub.db"))
    assert len(re.findall(r"The store is full \(", hub.daemon.log())) == 2
    c2.c.disconnect()
    c2.c.loop_stop()
    return acked


class Hub(test_mqtt.Hub):
    def __init__(self, budget=None, state_mount=None):
        self.broker_port = free_port()
        edit = None
        if state_mount:
            def edit(text):
                state = re.search(r"^state_dir: (\S+)$", text, re.M).group(1)
                state_mount(state)
                return text
        test_mqtt.test_api.Hub.__init__(self, test_mqtt.mqtt_extra(config(self.broker_port, budget)), edit=edit)
        self.daemon.wait_log(r"MQTT listening on")
        self.mport_mqtt = int(re.search(r"MQTT listening on \S+ \(port (\d+), TLS\)", self.daemon.log()).group(1))


def test_budget():
    budget = 2 * 1024 * 1024
    hub = Hub(budget="2MiB")
    state = f"{hub.d}/state"
    budget_run(hub, state, budget)
    hub.finish()


def test_tmpfs_full():
    if os.geteuid() != 0 or os.environ.get("FIELDHUB_IN_NS") != "1":
        print("   (needs root and a private mount namespace: run by main below)")
        return

    def mount(state):
        os.makedirs(state, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", state], check=True)

    hub = Hub(state_mount=mount)
    state = f"{hub.d}/state"
    try:
        budget_run(hub, state)
    except Exception:
        if os.environ.get("FIELDHUB_KEEP_LOG"):
            with open(os.environ["FIELDHUB_KEEP_LOG"], "w") as f:
                f.write(hub.daemon.log())
        print("\n".join(x for x in hub.daemon.log().splitlines()
                        if not re.search(r"connected \(SAS|disconnected \(|could not be stored|peer did not", x))[-6000:],
              file=sys.stderr)
        raise
    log = hub.daemon.log()
    assert "No space left on device" in log, log[-2000:]
    # Nothing half-written: a kill and a restart with a forced integrity check pass.
    hub.daemon.proc.kill()
    hub.daemon.proc.wait()
    hub.daemon = Daemon(hub.cfg)
    hub.daemon.wait_log(r"store .* passed its integrity check|MQTT listening on", timeout=30)
    db = sqlite3.connect(f"file:{state}/fieldhub.db?mode=ro", uri=True)
    assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    db.close()
    hub.finish()
    subprocess.run(["umount", state], check=False)


if __name__ == "__main__":
    if os.geteuid() == 0 and os.environ.get("FIELDHUB_IN_NS") != "1" and subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "true"]).returncode == 0:
        env = dict(os.environ, FIELDHUB_IN_NS="1")
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, __file__], env=env)
        sys.exit(r.returncode)
    main([test_budget, test_tmpfs_full])
