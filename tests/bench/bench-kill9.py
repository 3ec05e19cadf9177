#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""Zero loss over kill -9 cycles (issue 6): store-and-forward through fieldhubd while it is
killed with SIGKILL and restarted again and again.

- a mosquitto sink on loopback (plain TCP, persistence on) with a paho subscriber (QoS 1,
  clean_session false, fixed client id) recording every (device, seq) it receives;
- fieldhubd (release build, state under /var/tmp) with N devices, a route of DeviceMessages to
  an `mqtt` endpoint on the sink (QoS 1) and the built-in `events` fallback, the MQTT device
  listener with TLS on a fixed loopback port;
- one paho publisher per device (TLS, SAS token, QoS 1, a window of in-flight messages, as fast
  as they go), recording every seq whose PUBACK arrived; paho reconnects when fieldhubd is gone
  and publishes the unacknowledged window again;
- C cycles: wait 0.5-3 s, kill -9 fieldhubd by pid, restart it at once on the same state
  directory, wait until it listens again. Some cycles also stop the sink for 1-3 s first (a
  backlog builds up): either the sink comes back just before the kill (the kill hits the
  drain) or only after fieldhubd is back (the backlog crosses the restart);
- at the end: stop the publishers, wait for the sink's backlog to reach 0, then check that every
  PUBACKed (device, seq) reached the sink subscriber (zero loss), count duplicates, check the
  order per device of first deliveries, and replay the `events` stream over the admin socket
  (monitor-events from the oldest event kept) to check that it holds every PUBACKed message.

With `--sink upstream` the sink is a second fieldhubd playing the cloud IoT hub (own state
directory, config and CA, MQTT/TLS on a fixed loopback port, the N devices created there) and
the route goes to an `upstream` endpoint (every local device connects to the cloud as itself
with the same key, gateway/uplink/endpoint-upstream.c). "Stopping the sink" is a SIGTERM of the
cloud by pid and a restart on the same state directory (it keeps its events). A reader process
follows the cloud's event stream over its admin socket (monitor-events, resuming after the
last seq it saw when the cloud comes back) for the progress column; the verdict comes from a
full replay of the cloud's event stream at the end (after=0: every telemetry event it kept),
with the same figures as the mqtt mode (lost, duplicates, delivered without PUBACK, reordered
first deliveries per device), plus the gateway's own `events` stream as in the mqtt mode.

Exit status 0: no loss; 1: loss (or a check failed); 2: the harness itself failed.

    python3 tests/bench/bench-kill9.py [BUILDDIR] [--sink mqtt|upstream] [--cycles 20] [--devices 10] [--seed N]
"""

import argparse
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRCDIR = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(SRCDIR, "tests", "integration"))

try:
    import paho.mqtt.client as mqtt
except ImportError:
    if sys.executable != "/usr/bin/python3" and os.path.exists("/usr/bin/python3"):
        os.execv("/usr/bin/python3", ["/usr/bin/python3"] + sys.argv)
    sys.exit("bench-kill9: python3-paho-mqtt is not installed")

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
HOST = "gw.bench.local"
API = "2021-04-12"

# ---- process bookkeeping: everything started here is stopped by pid ----------------------

_procs = []  # Popen objects


def spawn(args, **kw):
    p = subprocess.Popen(args, **kw)
    _procs.append(p)
    return p


def reap(p, sig=signal.SIGTERM, timeout=10):
    if p.poll() is None:
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
    if p in _procs:
        _procs.remove(p)


def reap_all():
    for p in list(_procs):
        try:
            reap(p)
        except Exception as e:  # cleanup goes on
            print(f"cleanup of pid {p.pid} failed: {e}", file=sys.stderr)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.01)
    return False


def start_loop(client):
    """Like loop_start(), but survives paho 1.6's loop letting ssl.SSLEOFError (and other
    OSErrors from send) escape when the peer is killed: it reconnects by hand and goes on (paho
    then publishes its unacknowledged messages again, with DUP)."""
    def run():
        while True:
            try:
                client.loop_forever(retry_first_connection=True)
                return  # disconnect() was called
            except Exception:
                pass
            while not client._thread_terminate:
                try:
                    client.reconnect()
                    break
                except Exception:
                    time.sleep(0.05)
            if client._thread_terminate:
                return
    t = threading.Thread(target=run, daemon=True)
    client._sockpairR, client._sockpairW = mqtt._socketpair_compat()  # as loop_start() does
    client._thread = t  # publish() from other threads then only wakes this one up
    client._thread_terminate = False
    t.start()
    return t


def stop_loop(client, thread):
    try:
        client.disconnect()
    except Exception:
        pass
    client._thread_terminate = True
    thread.join(5)


# ---- the sink: mosquitto + a recording subscriber ------------------------------------------


class Sink:
    def __init__(self, d, port):
        self.d, self.port = d, port
        self.cfg = f"{d}/mosquitto.conf"
        with open(self.cfg, "w") as f:
            # `user`: mosquitto started as root drops to the `mosquitto` user by default, which
            # cannot write its persistence file here: the subscriber's session and its queued
            # messages would then be lost with every stop of the sink (a loss of the harness).
            f.write(f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
                    f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {d}/\nmax_queued_messages 0\nmax_inflight_messages 0\n")
        self.proc = None
        self.start()

    def start(self):
        self.proc = spawn([MOSQUITTO, "-c", self.cfg], stdout=subprocess.DEVNULL,
                          stderr=open(f"{self.d}/mosquitto.log", "ab"))
        if not wait_port(self.port):
            raise RuntimeError("mosquitto did not start")

    def stop(self):
        if self.proc:
            reap(self.proc)
            self.proc = None
        with open(f"{self.d}/mosquitto.log", "rb") as f:
            if b"Error saving in-memory database" in f.read():
                raise RuntimeError(f"mosquitto could not save its persistence file (see {self.d}/mosquitto.log)")

    def up(self):
        return self.proc is not None


def subscriber_main(port, out_path, client_id):
    """The sink subscriber, in its own process (the publishers' threads would otherwise take the
    GIL from it and it would fall behind the sink): paho, QoS 1, clean_session false with a
    fixed client id, so that what arrives while it reconnects is queued for it by mosquitto
    (persistence on: also across a stop of the sink). Appends every payload as a line to
    out_path, flushed every 0.1 s and on SIGTERM."""
    out = open(out_path, "ab", buffering=1 << 20)
    lock = threading.Lock()
    stop = threading.Event()

    def on_connect(c, u, flags, rc):
        if rc == 0:
            c.subscribe("k9/#", 1)
            with lock:
                out.write(b"#connected\n")

    def on_message(c, u, m):
        with lock:
            out.write(m.payload + b"\n")

    c = mqtt.Client(client_id=client_id, clean_session=False, protocol=mqtt.MQTTv311)
    c.on_connect = on_connect
    c.on_message = on_message
    c.reconnect_delay_set(0.05, 0.3)
    c.connect("127.0.0.1", port, 30)
    loop = start_loop(c)
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    while not stop.wait(0.1):
        with lock:
            out.flush()
    stop_loop(c, loop)
    with lock:
        out.flush()
    return 0


def cloud_reader_main(sock_path, out_path):
    """--sink upstream: follows the cloud's event stream (admin monitor-events, from after=0),
    in its own process like the subscriber; appends every telemetry event's payload as a line
    to out_path ("#connected" for every admin connection). When the cloud goes away (its stop),
    reconnects every 0.05 s and resumes after the last seq it saw."""
    out = open(out_path, "ab", buffering=1 << 20)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    after = 0
    last_flush = time.monotonic()
    while not stop.is_set():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(2.0)
            s.connect(sock_path)
            s.sendall(json.dumps({"cmd": "monitor-events", "args": {"after": after}}).encode() + b"\n")
            s.settimeout(0.1)
            buf = b""
            first = True
            while not stop.is_set():
                if time.monotonic() - last_flush > 0.1:
                    out.flush()
                    last_flush = time.monotonic()
                try:
                    chunk = s.recv(1 << 20)
                except socket.timeout:
                    continue
                if not chunk:
                    break
                buf += chunk
                lines = buf.split(b"\n")
                buf = lines.pop()
                for ln in lines:
                    j = json.loads(ln)
                    if first:
                        first = False
                        if not j.get("ok"):
                            raise OSError(f"monitor-events: {j}")
                        out.write(b"#connected\n")
                        continue
                    ev = j.get("event")
                    if not ev:
                        continue
                    after = max(after, int(j.get("seq", after)))
                    pl = ev.get("payload")
                    if ev["properties"]["system"].get("iothub-message-source", "Telemetry") == "Telemetry" \
                            and isinstance(pl, str):
                        out.write(pl.encode() + b"\n")
        except (OSError, ValueError):
            pass
        finally:
            s.close()
        out.flush()
        stop.wait(0.05)
    out.flush()
    return 0


class Subscriber:
    """The main process's view of the subscriber process (or, --sink upstream, of the cloud's
    event reader: `cmd`): reads its output as it grows."""

    def __init__(self, d, port, cmd=None):
        self.path = f"{d}/sink-received.txt"
        open(self.path, "wb").close()
        self.f = open(self.path, "rb")
        self.partial = b""
        self.got = []  # (dev, seq) in arrival order
        self.connects = 0
        self.last = time.monotonic()
        if cmd is None:
            cmd = ["--subscriber", str(port), self.path, f"bench-kill9-sub-{os.getpid()}"]
        else:
            cmd = cmd + [self.path]
        self.proc = spawn([sys.executable, os.path.abspath(__file__), *cmd])
        end = time.monotonic() + 10
        while self.connects == 0:
            if time.monotonic() > end or self.proc.poll() is not None:
                raise RuntimeError("the sink subscriber (upstream: the cloud's event reader) did not connect")
            time.sleep(0.02)
            self.poll()

    def poll(self):
        data = self.f.read()
        if not data:
            return
        self.last = time.monotonic()
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for ln in lines:
            if ln == b"#connected":
                self.connects += 1
                continue
            dev, _, seq = ln.decode(errors="replace").partition(":")
            self.got.append((dev, int(seq) if seq.isdigit() else -1))

    def count(self):
        self.poll()
        return len(self.got)

    def close(self):
        reap(self.proc)
        self.poll()


# ---- fieldhubd ------------------------------------------------------------------------------


def daemon_config_text(host_name, d, mqtt_port):
    """What the gateway and the cloud share: hub name, state in d, logs on stderr, the admin
    socket, MQTT/TLS on a fixed loopback port."""
    return f"""hub:
  host_name: {host_name}
state_dir: {d}/state
logs_dir: {d}/logs
log:
  level: info
  target: stderr
admin:
  socket: {d}/admin.sock
mqtt:
  listen: ["127.0.0.1:{mqtt_port}"]
"""


def config_text(d, mqtt_port, sink_endpoint):
    """The gateway: MQTT/TLS for the devices, every device message routed to the endpoint
    named sink (sink_endpoint: its YAML lines after `name: sink`), the fallback to events."""
    return daemon_config_text(HOST, d, mqtt_port) + f"""endpoints:
  - name: sink
{sink_endpoint}routes:
  - name: all
    source: DeviceMessages
    condition: "true"
    endpoint: sink
fallback_route:
  enabled: true
"""


def mqtt_sink_endpoint(sink_port):
    """--sink mqtt: an `mqtt` endpoint on the mosquitto sink."""
    return f"""    type: mqtt
    address: tcp://127.0.0.1:{sink_port}
    client_id: fieldhub-bench-kill9
    qos: 1
    topic: "k9/{{deviceId}}"
    retry: {{initial: 100ms, max: 500ms}}
"""


CLOUD_HOST = "cloud.bench.local"


def upstream_sink_endpoint(d, cloud, devs):
    """--sink upstream: an `upstream` endpoint (the cloud fieldhubd), every device with its
    key file (the cloud's key: the gateway gives its local identity the same key at start)."""
    keys = "".join(f"      - {{id: {dv}, key_file: {d}/keys/{dv}.key}}\n" for dv in devs)
    return f"""    type: upstream
    host_name: {CLOUD_HOST}
    gateway_host: 127.0.0.1
    port: {cloud.port}
    tls: {{ca_file: {cloud.ca}}}
    retry: {{initial: 100ms, max: 1s}}
    devices:
{keys}"""


def cloud_config_text(d, port):
    """The cloud: a plain fieldhubd (no routes: its built-in events endpoint keeps every
    device message for its retention time, a day), MQTT/TLS on a fixed loopback port."""
    return daemon_config_text(CLOUD_HOST, d, port)


class Fieldhubd:
    def __init__(self, binary, ctl, d):
        self.binary, self.ctl_bin, self.d = binary, ctl, d
        self.cfg = f"{d}/fieldhub.yaml"
        self.proc = None
        self.n = 0
        self.logpath = None

    def start(self):
        """Starts an instance; returns at once (see wait_listening)."""
        self.n += 1
        self.logpath = f"{self.d}/fieldhubd.{self.n:02d}.log"
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("JOURNAL_STREAM", None)
        self.proc = spawn([self.binary, "--config", self.cfg], env=env, stdout=subprocess.DEVNULL,
                          stderr=open(self.logpath, "wb"))

    def log(self):
        with open(self.logpath, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_log(self, pattern, timeout=30.0, step=0.01):
        end = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < end:
            if rx.search(self.log()):
                return True
            if self.proc.poll() is not None:
                raise RuntimeError(f"fieldhubd exited ({self.proc.returncode}) before /{pattern}/; "
                                   f"log {self.logpath}:\n{self.log()[-3000:]}")
            time.sleep(step)
        return False

    def kill9(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        _procs.remove(self.proc)

    def stop(self):
        if self.proc:
            reap(self.proc, timeout=15)

    def ctl(self, *args, timeout=30):
        p = subprocess.run([self.ctl_bin, "--socket", f"{self.d}/admin.sock", "--json", *args],
                           capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"fieldhubctl {' '.join(args)}: {p.stderr.strip()}")
        return json.loads(p.stdout) if p.stdout.strip() else None

    def sink_backlog(self):
        for e in self.ctl("endpoints", timeout=5):
            if e["name"] == "sink":
                return e
        raise RuntimeError("no endpoint named sink in fieldhubctl endpoints")

    def replay_keys(self, idle=2.0, timeout=180):
        """Every event the stream still holds (admin `monitor-events` with after=0: from the
        oldest event kept), read until the stream is idle for `idle` seconds; returns the number
        of events and the (device, seq) of the bench's telemetry messages in stream order
        (payload "dev:seq" from that device): ~10^6 events kept as dicts would take gigabytes."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(f"{self.d}/admin.sock")
        s.sendall(json.dumps({"cmd": "monitor-events", "args": {"after": 0}}).encode() + b"\n")
        f = s.makefile("rb")
        first = json.loads(f.readline())
        if not first.get("ok"):
            raise RuntimeError(f"monitor-events: {first}")
        s.settimeout(idle)
        n, keys = 0, []
        end = time.monotonic() + timeout
        try:
            while time.monotonic() < end:
                line = f.readline()
                if not line:
                    break
                ev = json.loads(line).get("event")
                if not ev:
                    continue
                n += 1
                if ev["properties"]["system"].get("iothub-message-source", "Telemetry") != "Telemetry":
                    continue
                pl = ev.get("payload")
                if isinstance(pl, str) and ":" in pl:
                    dv, _, sq = pl.partition(":")
                    if sq.isdigit() and dv == ev.get("origin"):
                        keys.append((dv, int(sq)))
        except (socket.timeout, TimeoutError):
            pass
        s.close()
        if time.monotonic() >= end:
            raise RuntimeError(f"the replay of {self.d}'s event stream took more than {timeout} s")
        return n, keys


class Cloud:
    """--sink upstream: the second fieldhubd, the cloud, with the Sink's start/stop/up: stop is
    a SIGTERM by pid (a clean stop: it keeps its events), start a new instance on the same
    state directory that returns once it listens for MQTT."""

    def __init__(self, binary, ctl, d, port):
        self.d, self.port = d, port
        os.makedirs(f"{d}/logs", exist_ok=True)
        with open(f"{d}/fieldhub.yaml", "w") as f:
            f.write(cloud_config_text(d, port))
        self.hub = Fieldhubd(binary, ctl, d)
        self.ca = f"{d}/state/ca.crt"
        self.forced = []  # instances that needed a SIGKILL to stop
        self.start()

    def start(self):
        self.hub.start()
        if not self.hub.wait_log(r"MQTT listening on", timeout=30) or not wait_port(self.port):
            raise RuntimeError(f"the cloud fieldhubd did not listen within 30 s:\n{self.hub.log()[-3000:]}")

    def stop(self):
        p = self.hub.proc
        if p is None:
            return
        os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            self.forced.append(self.hub.n)
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
        if p in _procs:
            _procs.remove(p)
        self.hub.proc = None

    def up(self):
        return self.hub.proc is not None


def connected_devices(log):
    """The devices whose upstream connection came up in this gateway instance's log."""
    return set(re.findall(r"Upstream: (\S+) (?:connected to|is connected to)", log))


def wait_devices_up(hub, devs, timeout=15.0, step=0.02):
    end = time.monotonic() + timeout
    want = set(devs)
    while time.monotonic() < end:
        if want <= connected_devices(hub.log()):
            return True
        if hub.proc.poll() is not None:
            raise RuntimeError(f"fieldhubd exited ({hub.proc.returncode}); log {hub.logpath}")
        time.sleep(step)
    return False


# ---- publishers -----------------------------------------------------------------------------


def sas(dev_id, key):
    sys.path.insert(0, os.path.join(SRCDIR, "tests", "integration"))
    import test_mqtt  # noqa: E402  (sas() as the integration tests compute it)
    return test_mqtt.sas(dev_id, key, se=int(time.time()) + 24 * 3600, host=HOST)


class Publisher:
    """One device: publishes "dev:seq" QoS 1 with at most `window` unacknowledged; records the
    seqs whose PUBACK arrived. paho reconnects by itself and resends the unacknowledged window."""

    def __init__(self, dev, key, port, ca, window):
        self.dev, self.window = dev, window
        self.acked = []
        self.mid_seq = {}
        self.early = set()
        self.next_seq = 0
        self.outstanding = 0
        self.connects = 0
        self.cond = threading.Condition()
        self.stopping = False
        self.c = mqtt.Client(client_id=dev, clean_session=False, protocol=mqtt.MQTTv311)
        self.c.username_pw_set(f"{HOST}/{dev}/?api-version={API}", sas(dev, key))
        self.c.tls_set(ca_certs=ca)
        self.c.tls_insecure_set(False)
        self.c.max_inflight_messages_set(window)
        self.c.max_queued_messages_set(0)
        self.c.reconnect_delay_set(0.02, 0.25)
        self.c.on_publish = self._on_publish
        self.c.on_connect = self._on_connect
        self.c.connect_async("127.0.0.1", port, 30)
        self.loop = start_loop(self.c)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_connect(self, c, u, flags, rc):
        if rc == 0:
            self.connects += 1

    def _on_publish(self, c, u, mid):
        # Called by paho's loop thread with its message lock held: the publishing thread never
        # holds self.cond while it calls into paho (that order would deadlock).
        with self.cond:
            seq = self.mid_seq.pop(mid, None)
            if seq is None:  # the PUBACK overtook the bookkeeping of publish()
                self.early.add(mid)
                return
            self.acked.append(seq)
            self.outstanding -= 1
            self.cond.notify()

    def _run(self):
        topic = f"devices/{self.dev}/messages/events/"
        while True:
            with self.cond:
                while self.outstanding >= self.window and not self.stopping:
                    self.cond.wait(0.5)
                if self.stopping:
                    return
                seq = self.next_seq
                self.next_seq += 1
                self.outstanding += 1
            info = self.c.publish(topic, f"{self.dev}:{seq}".encode(), qos=1)
            with self.cond:
                if info.mid in self.early:
                    self.early.discard(info.mid)
                    self.acked.append(seq)
                    self.outstanding -= 1
                else:
                    self.mid_seq[info.mid] = seq

    def stop_publishing(self):
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(5)

    def wait_outstanding(self, timeout):
        end = time.monotonic() + timeout
        with self.cond:
            while self.outstanding > 0 and time.monotonic() < end:
                self.cond.wait(0.1)
            return self.outstanding

    def close(self):
        stop_loop(self.c, self.loop)


# ---- the run --------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("builddir", nargs="?", default=os.path.join(SRCDIR, "build-bench"),
                    help="release build directory (default: build-bench in the source tree)")
    ap.add_argument("--sink", choices=("mqtt", "upstream"), default="mqtt",
                    help="mqtt: a mosquitto sink (default); upstream: a second fieldhubd as the cloud IoT hub")
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock; printed)")
    ap.add_argument("--window", type=int, default=32, help="unacknowledged messages per publisher")
    ap.add_argument("--outage-every", type=float, default=0.35,
                    help="share of cycles in which the sink is stopped for 1-3 s first")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds after which the run is abandoned (exit 2; default 290, --sink upstream 600)")
    ap.add_argument("--keep", action="store_true", help="keep the state directory (always kept on a failure)")
    args = ap.parse_args()
    if args.time_limit is None:
        args.time_limit = 600 if args.sink == "upstream" else 290
    upstream = args.sink == "upstream"
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    rnd = random.Random(seed)

    fieldhubd = os.environ.get("FIELDHUBD") or os.path.join(args.builddir, "gateway", "fieldhubd")
    fieldhubctl = os.environ.get("FIELDHUBCTL") or os.path.join(args.builddir, "gateway", "fieldhubctl")
    for b in (fieldhubd, fieldhubctl) + (() if upstream else (MOSQUITTO,)):
        if not os.access(b, os.X_OK):
            sys.exit(f"bench-kill9: {b} not found (build with -Dtests=true --buildtype=release)")

    d = tempfile.mkdtemp(prefix="fieldhub-kill9-", dir="/var/tmp")
    os.makedirs(f"{d}/logs")
    print(f"bench-kill9: sink {args.sink}, seed {seed}, {args.cycles} cycles, {args.devices} devices, window {args.window}, "
          f"state {d}", flush=True)
    print(f"  fieldhubd {fieldhubd}", flush=True)

    def on_signal(sig, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started in the background (SIGINT ignored)

    class TimeLimit(Exception):
        pass

    def on_alarm(sig, frame):
        raise TimeLimit(f"time limit of {args.time_limit:.0f} s reached")
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, args.time_limit)

    t_start = time.monotonic()
    pubs, sub, sink, hub = [], None, None, None
    ok = False
    try:
        sink_port, mqtt_port = free_port(), free_port()
        devs = [f"dev-{i:02d}" for i in range(args.devices)]
        keys = {}
        if upstream:
            # The cloud first: its devices (and their keys), its CA for the gateway's config.
            sink = Cloud(fieldhubd, fieldhubctl, f"{d}/cloud", sink_port)
            os.makedirs(f"{d}/keys")
            for dv in devs:
                keys[dv] = sink.hub.ctl("device", "create", dv)["authentication"]["symmetricKey"]["primaryKey"]
                fd = os.open(f"{d}/keys/{dv}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(keys[dv] + "\n")
            sub = Subscriber(d, None, cmd=["--cloud-reader", f"{d}/cloud/admin.sock"])
            with open(f"{d}/fieldhub.yaml", "w") as f:
                f.write(config_text(d, mqtt_port, upstream_sink_endpoint(d, sink, devs)))
        else:
            sink = Sink(d, sink_port)
            sub = Subscriber(d, sink_port)
            with open(f"{d}/fieldhub.yaml", "w") as f:
                f.write(config_text(d, mqtt_port, mqtt_sink_endpoint(sink_port)))
        hub = Fieldhubd(fieldhubd, fieldhubctl, d)
        hub.start()
        if not hub.wait_log(r"MQTT listening on") or not hub.wait_log(r"Endpoint sink connected"):
            raise RuntimeError(f"fieldhubd did not come up:\n{hub.log()[-3000:]}")
        if upstream:
            # The local identities get the cloud's keys at start, before "started".
            if not hub.wait_log(r"fieldhubd \S+ started") or not wait_devices_up(hub, devs, timeout=30):
                raise RuntimeError(f"the devices did not connect to the cloud:\n{hub.log()[-3000:]}")
            for dv in devs:
                k = hub.ctl("device", "show", dv)["authentication"]["symmetricKey"]["primaryKey"]
                if k != keys[dv]:
                    raise RuntimeError(f"the gateway's identity {dv} does not have the cloud's key")
        else:
            for dv in devs:
                keys[dv] = hub.ctl("device", "create", dv)["authentication"]["symmetricKey"]["primaryKey"]
        ca = f"{d}/state/ca.crt"
        pubs = [Publisher(dv, keys[dv], mqtt_port, ca, args.window) for dv in devs]

        def acked_total():
            return sum(len(p.acked) for p in pubs)

        end = time.monotonic() + 10
        while acked_total() < 100 and time.monotonic() < end:
            time.sleep(0.05)
        if acked_total() == 0:
            raise RuntimeError(f"no PUBACK from fieldhubd within 10 s; log:\n{hub.log()[-3000:]}")

        cycles = []
        admin_failures = []
        print("listen: kill -9 -> the new fieldhubd listens; ready: -> it logged \"started\" (READY=1); sink-up: kill -9 (sink-down: the sink's "
              "restart) -> the sink endpoint is connected" + (" (upstream: every device connected to the cloud; "
                                                              "at sink: seen by the cloud's event reader)" if upstream else ""),
              flush=True)
        print(f"{'cyc':>3} {'kind':<10} {'wait':>5} {'backlog@kill':>12} {'listen':>7} {'ready':>7} {'sink-up':>8} "
              f"{'acked':>8} {'at sink':>8}", flush=True)
        for i in range(args.cycles):
            kind = "plain"
            if rnd.random() < args.outage_every:
                kind = rnd.choice(["drain", "sink-down"])
            wait = rnd.uniform(0.5, 3.0)
            if kind == "plain":
                time.sleep(wait)
            else:
                sink.stop()  # a backlog builds up
                time.sleep(rnd.uniform(1.0, 3.0))
                if kind == "drain":  # the kill hits the drain
                    sink.start()
                    wait = rnd.uniform(0.05, 0.4)
                    time.sleep(wait)
            try:
                backlog = hub.sink_backlog()["backlog"]["count"]
            except Exception as e:
                # Not expected: fieldhubd has been up for a while. Recorded, reported at the end.
                admin_failures.append((i + 1, kind, hub.n, time.strftime("%H:%M:%S"), str(e)))
                backlog = "?"
            # Where each device's seqs stood at this kill: lost or reordered seqs are traced back
            # to the cycle (and its kind) in which they were published.
            at_kill = {p.dev: p.next_seq for p in pubs}
            t_kill = time.monotonic()
            hub.kill9()
            hub.start()
            if not hub.wait_log(r"MQTT listening on", timeout=30):
                raise RuntimeError(f"fieldhubd did not listen again within 30 s (cycle {i})")
            t_listen = time.monotonic() - t_kill
            # Listening is not serving yet: the uplink and the admin socket are set up after the
            # listeners, and the event loop (MQTT CONNACKs included) runs only after "started"
            # (sd_notify READY=1).
            if not hub.wait_log(r"fieldhubd \S+ started", timeout=30):
                raise RuntimeError(f"fieldhubd did not finish starting within 30 s (cycle {i})")
            t_ready = time.monotonic() - t_kill
            t_from = t_kill
            if kind == "sink-down":
                time.sleep(rnd.uniform(0.2, 1.0))  # the backlog crossed the restart; now the sink returns
                sink.start()
                t_from = time.monotonic()
            t_sink = None
            if upstream:
                if wait_devices_up(hub, devs, timeout=15):
                    t_sink = time.monotonic() - t_from
            elif hub.wait_log(r"Endpoint sink (connected|is reachable again)", timeout=15, step=0.02):
                t_sink = time.monotonic() - t_from
            cy = dict(cycle=i + 1, kind=kind, wait=wait, backlog=backlog, listen=t_listen, ready=t_ready, sink=t_sink,
                      acked=acked_total(), at_sink=sub.count(), at_kill=at_kill)
            cycles.append(cy)
            print(f"{i + 1:>3} {kind:<10} {wait:5.2f} {str(backlog):>12} {t_listen:6.3f}s {t_ready:6.3f}s "
                  f"{(f'{t_sink:7.3f}s' if t_sink is not None else '      -'):>8} {cy['acked']:>8} {cy['at_sink']:>8}",
                  flush=True)

        # ---- the end: stop publishing, let everything drain --------------------------------
        time.sleep(1.0)
        for p in pubs:
            p.stop_publishing()
        left = sum(p.wait_outstanding(10) for p in pubs)
        for p in pubs:
            p.close()
        acked = {(p.dev, s) for p in pubs for s in p.acked}
        sent = sum(p.next_seq for p in pubs)
        t_drain = time.monotonic()
        bl = None
        while time.monotonic() - t_drain < 90:
            bl = hub.sink_backlog()["backlog"]["count"]
            if bl == 0:
                break
            time.sleep(0.2)
        drain_secs = time.monotonic() - t_drain
        # The subscriber catches up with the sink: done once it has every acknowledged message
        # and has been quiet for a second (duplicates may still come), or quiet for 10 s.
        t_catch = time.monotonic()
        missing = len(acked)
        while time.monotonic() - t_catch < 120:
            sub.poll()
            quiet = time.monotonic() - sub.last
            if quiet > 1.0:
                missing = len(acked - set(sub.got))
                if missing == 0 or quiet > 10.0:
                    break
            time.sleep(0.2)
        catch_secs = time.monotonic() - t_catch
        sub.close()
        got = list(sub.got)
        live_only = []
        if upstream:
            # The verdict comes from what the cloud kept: a replay of its whole event stream.
            live = set(got)
            t_replay = time.monotonic()
            cloud_events, got = sink.hub.replay_keys()
            replay_secs = time.monotonic() - t_replay
            live_only = sorted(live - set(got))

        def cycle_of(dv, sq):
            """The cycle during which (dv, sq) was published: "N (kind)", "end" after the last."""
            for c in cycles:
                if sq < c["at_kill"].get(dv, 0):
                    return f"{c['cycle']} ({c['kind']})"
            return "end"

        # ---- checks ------------------------------------------------------------------------
        have = set(got)
        lost = sorted(acked - have)
        dups = len(got) - len(have)
        unacked_delivered = len(have - acked)
        firsts = {}
        seen = set()
        for k in got:
            if k not in seen:
                seen.add(k)
                firsts.setdefault(k[0], []).append(k[1])
        reordered = []
        for dv, seqs in firsts.items():
            for a, b in zip(seqs, seqs[1:]):
                if b < a:
                    reordered.append((dv, a, b))

        n_events, ev_list = hub.replay_keys()
        ev_keys = set(ev_list)
        ev_lost = sorted(acked - ev_keys)

        total = time.monotonic() - t_start
        lt = sorted(c["listen"] for c in cycles)
        rt = sorted(c["ready"] for c in cycles)
        st = sorted(c["sink"] for c in cycles if c["sink"] is not None)
        print()
        print(f"summary (seed {seed}, {len(cycles)} kill -9 cycles, {args.devices} devices, {total:.0f} s):")
        print(f"  published {sent}, PUBACKed {len(acked)} ({left} still unacknowledged when publishing stopped)")
        print(f"  sink: {len(got)} deliveries, {len(have)} distinct, lost {len(lost)}, duplicates {dups}, "
              f"delivered without PUBACK {unacked_delivered}, reordered {len(reordered)}")
        if upstream:
            print(f"  sink backlog {bl} after {drain_secs:.1f} s; the cloud's event reader caught up in {catch_secs:.1f} s; "
                  f"reader (re)connects {sub.connects}; the cloud's event stream replayed in {replay_secs:.1f} s "
                  f"({cloud_events} events; seen live and missing from it: {len(live_only)})")
        else:
            print(f"  sink backlog {bl} after {drain_secs:.1f} s; the subscriber caught up in {catch_secs:.1f} s; "
                  f"subscriber (re)connects {sub.connects}")
        print(f"  events stream: {n_events} events, {len(ev_keys)} of the bench's messages, lost {len(ev_lost)}")
        if lt:
            print(f"  restart (kill -9 -> listening): median {lt[len(lt) // 2]:.3f} s, max {lt[-1]:.3f} s; "
                  f"per cycle: {' '.join(f'{x:.2f}' for x in (c['listen'] for c in cycles))}")
        if rt:
            print(f"  restart (kill -9 -> started, READY=1): median {rt[len(rt) // 2]:.3f} s, max {rt[-1]:.3f} s; "
                  f"per cycle: {' '.join(f'{x:.2f}' for x in (c['ready'] for c in cycles))}")
        if st:
            print(f"  sink endpoint connected again (see above): median {st[len(st) // 2]:.3f} s, max {st[-1]:.3f} s")
        print(f"  publisher connects: {sum(p.connects for p in pubs)}")
        oom = 0
        if not upstream:
            with open(f"{d}/mosquitto.log", "rb") as f:
                oom = f.read().count(b"disconnected due to out of memory")
        elif sink.forced:
            print(f"  note: the cloud did not stop within 20 s of its SIGTERM and was killed (instances "
                  f"{', '.join(f'cloud/fieldhubd.{n:02d}.log' for n in sink.forced)})")
        if oom:
            print(f"  note: mosquitto logged 'disconnected due to out of memory' {oom} times: its bogus message "
                  f"when a publisher vanishes before the PUBACK (the kill -9; eclipse-mosquitto/mosquitto#2627, "
                  f"#3253, fixed in 2.0.22)")
        for f in admin_failures:
            print(f"  ADMIN SOCKET: cycle {f[0]} ({f[1]}), fieldhubd instance {f[2]} (fieldhubd.{f[2]:02d}.log), "
                  f"{f[3]}: {f[4]}")
        if lost:
            print(f"LOST at the sink (first 30): {lost[:30]}")
            print(f"  published in cycle: {[cycle_of(*k) for k in lost[:30]]}")
        if ev_lost:
            print(f"LOST in the events stream (first 30): {ev_lost[:30]}")
        if live_only:
            print(f"GONE from the cloud's event stream (seen live, not in the final replay; first 30): {live_only[:30]}")
        if reordered:
            print(f"REORDERED first deliveries (device, earlier seq, later seq; first 30): {reordered[:30]}")
            print(f"  later seq published in cycle: {[cycle_of(r[0], r[2]) for r in reordered[:30]]}")
        with open(f"{d}/result.json", "w") as f:
            json.dump(dict(seed=seed, sink=args.sink, cycles=cycles, acked=len(acked), deliveries=len(got), lost=lost,
                           events_lost=ev_lost, duplicates=dups, reordered=reordered, live_only=live_only), f)
        ok = not lost and not ev_lost and not live_only and bl == 0
        print("RESULT:", "zero loss" if ok else "FAILED", flush=True)
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\nbench-kill9: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        import traceback
        traceback.print_exc()
        print(f"bench-kill9: harness failure: {e}", file=sys.stderr)
        return 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for p in pubs:
            try:
                p.stop_publishing()
                p.close()
            except Exception:
                pass
        if sub:
            sub.close()
        if hub:
            hub.stop()
        reap_all()
        if ok and not args.keep:
            shutil.rmtree(d, ignore_errors=True)
        else:
            print(f"bench-kill9: state, logs and result.json kept in {d}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--subscriber":
        sys.exit(subscriber_main(int(sys.argv[2]), sys.argv[3], sys.argv[4]))
    if len(sys.argv) == 4 and sys.argv[1] == "--cloud-reader":
        sys.exit(cloud_reader_main(sys.argv[2], sys.argv[3]))
    sys.exit(main())
