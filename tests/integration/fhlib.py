# SPDX-License-Identifier: MIT
"""Shared helpers for fieldhub's integration tests: start the real fieldhubd on a
temporary configuration and state directory, listen on NOTIFY_SOCKET, read its log,
stop it by pid. Each test script is a plain python3 program: it exits 0 on success,
non-zero on failure (an uncaught AssertionError), 77 when it must be skipped."""

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

FIELDHUBD = os.environ.get("FIELDHUBD", "fieldhubd")
FIELDHUBCTL = os.environ.get("FIELDHUBCTL", "fieldhubctl")
SRCDIR = os.environ.get("FIELDHUB_SRCDIR", os.path.join(os.path.dirname(__file__), "..", ".."))

_cleanups = []


def at_exit(fn):
    _cleanups.append(fn)


def run_cleanups():
    while _cleanups:
        fn = _cleanups.pop()
        try:
            fn()
        except Exception as e:  # cleanup must go on
            print(f"cleanup failed: {e}", file=sys.stderr)


def main(tests):
    """Runs test functions in order, prints each name, cleans up whatever happens."""
    failed = 0
    try:
        for t in tests:
            print(f"== {t.__name__}", flush=True)
            t0 = time.monotonic()
            try:
                t()
            except Skip as s:
                print(f"   skipped: {s}", flush=True)
                continue
            except Exception:
                import traceback
                traceback.print_exc()
                failed += 1
                print(f"   FAILED {t.__name__}", flush=True)
            else:
                print(f"   ok ({time.monotonic() - t0:.2f}s)", flush=True)
            finally:
                run_cleanups()
    finally:
        run_cleanups()
    sys.exit(1 if failed else 0)


class Skip(Exception):
    pass


def tmpdir():
    d = tempfile.mkdtemp(prefix="fieldhub-it-")
    at_exit(lambda: subprocess.run(["rm", "-rf", d]))
    return d


def pty_pair(d, name):
    """A socat pseudo-terminal pair under d: (our end for fieldhubd, the slave's end); socat is
    stopped at exit. Skips the test when socat is not installed."""
    if not shutil.which("socat"):
        raise Skip("socat is not installed")
    a, b = os.path.join(d, name + "-gw"), os.path.join(d, name + "-slave")
    p = subprocess.Popen(["socat", "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop():
        if p.poll() is None:
            p.terminate()
            p.wait(timeout=3)
    at_exit(stop)
    end = time.monotonic() + 5
    while not (os.path.exists(a) and os.path.exists(b)):
        assert time.monotonic() < end, "socat did not create the pty pair"
        time.sleep(0.02)
    return a, b


def write(path, text, mode=0o600):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def config_text(d, extra="", host="gw.test.local", level="info"):
    return f"""hub:
  host_name: {host}
state_dir: {d}/state
log:
  level: {level}
  target: stderr
admin:
  socket: {d}/admin.sock
{extra}"""


class Notify:
    """A NOTIFY_SOCKET listener (what systemd's service manager provides). A thread drains
    the socket continuously, as systemd does: an unread datagram queue would block the
    daemon's sd_notify() once it holds net.unix.max_dgram_qlen messages."""

    def __init__(self, d):
        self.path = os.path.join(d, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        at_exit(self.close)

    def _run(self):
        while not self._stop:
            r, _, _ = select.select([self.sock], [], [], 0.1)
            if not r:
                continue
            try:
                data = self.sock.recv(65536).decode()
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.split("\n") if "=" in line)
            with self._cond:
                self.messages.append(fields)
                self._cond.notify_all()

    def close(self):
        self._stop = True
        self._thread.join()
        self.sock.close()

    def poll(self, timeout=0.0):
        """Waits timeout seconds; messages keep arriving in self.messages meanwhile."""
        time.sleep(timeout)

    def wait_for(self, key, value=None, timeout=10.0, after=0):
        """Waits for a message with key (=value) at index >= after; returns its index."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.messages)):
                    m = self.messages[i]
                    if key in m and (value is None or m[key] == value):
                        return i
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {key}={value} from sd_notify within {timeout}s; got {self.messages[after:]}")
                self._cond.wait(left)


class Daemon:
    def __init__(self, config_path, args=(), env=None, notify=None, stderr_file=None):
        self.config_path = config_path
        e = dict(os.environ)
        e.pop("JOURNAL_STREAM", None)
        e.pop("NOTIFY_SOCKET", None)
        if notify:
            e["NOTIFY_SOCKET"] = notify.path
        if env:
            e.update(env)
        self.logpath = stderr_file or config_path + ".stderr"
        self.logf = open(self.logpath, "wb")
        self.proc = subprocess.Popen([FIELDHUBD, "--config", config_path, *args], env=e,
                                     stdout=subprocess.DEVNULL, stderr=self.logf)
        self.pid = self.proc.pid
        at_exit(self.kill)

    def log(self):
        with open(self.logpath, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_log(self, pattern, timeout=10.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if re.search(pattern, self.log()):
                return
            if self.proc.poll() is not None and not re.search(pattern, self.log()):
                raise AssertionError(f"fieldhubd exited ({self.proc.returncode}) before logging /{pattern}/:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"no log line matching /{pattern}/ within {timeout}s:\n{self.log()}")

    def alive(self):
        return self.proc.poll() is None

    def signal(self, sig):
        os.kill(self.pid, sig)

    def stop(self, timeout=2.0):
        """SIGTERM; returns (exit status, seconds it took)."""
        t0 = time.monotonic()
        self.signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout + 3)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("fieldhubd did not stop on SIGTERM")
        return rc, time.monotonic() - t0

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.logf.close()


def ctl(d, *args, check=True, input=None):
    """Runs fieldhubctl against the daemon whose admin socket is in d."""
    p = subprocess.run([FIELDHUBCTL, "--socket", os.path.join(d, "admin.sock"), *args],
                       capture_output=True, text=True, input=input, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"fieldhubctl {' '.join(args)} failed ({p.returncode}): {p.stderr}")
    return p


def monitor_args(d, device, seconds):
    """The command line of `fieldhubctl monitor-events` for device's events, for seconds."""
    return [FIELDHUBCTL, "--socket", os.path.join(d, "admin.sock"), "--json", "monitor-events",
            "--device", device, "--properties", "--timeout", f"{seconds}s"]


def telemetry_events(d, device, seconds):
    """Telemetry of device seen by `fieldhubctl monitor-events` within seconds:
    [(payload, properties)]."""
    p = subprocess.run(monitor_args(d, device, seconds), capture_output=True, text=True, timeout=seconds + 20)
    return telemetry_of(p.stdout)


def telemetry_of(text):
    """The telemetry events in the output of monitor_args(): [(payload, properties)]."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        ev = json.loads(line)["event"]
        if ev["properties"]["system"].get("iothub-message-source") == "Telemetry":
            payload = ev["payload"]
            if isinstance(payload, str):    # a body the tool could not re-encode (uint64 > 2^63)
                payload = json.loads(payload)
            out.append((payload, ev["properties"]))
    return out


def reported(d, device):
    """The device twin's reported properties, through fieldhubctl."""
    return json.loads(ctl(d, "--json", "twin", "show", device).stdout)["properties"]["reported"]


def wait_for(fn, timeout=10.0, what="condition"):
    """fn() until it returns something true (assertion and lookup errors count as not yet)."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = fn()
            if last:
                return last
        except (AssertionError, KeyError, ValueError, TypeError) as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout}s (last: {last})")
