#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""Logs reach a real, standalone systemd-journald with the structured fields.

journald's socket path is fixed (/run/systemd/journal/socket), so the test runs in a
private mount namespace with its own /run (unshare -m): the machine's /run and any
journald on it are never touched. Inside, it starts /lib/systemd/systemd-journald,
runs fieldhubd twice (log.target: journal, and auto-detected through JOURNAL_STREAM on a
real journal stream socket), and reads everything back with `journalctl -o json`."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from fhlib import Daemon, Notify, Skip, config_text, main, tmpdir, write  # noqa: E402

JOURNALD = "/lib/systemd/systemd-journald"
IDS = {}
with open(os.path.join(os.path.dirname(__file__), "..", "..", "gateway", "log-ids.h")) as f:
    for line in f:
        if line.startswith("#define GW_MSG_"):
            parts = line.split()
            IDS[parts[1][len("GW_MSG_"):]] = parts[2].strip('"')


def journal_entries(since_pid=None):
    p = subprocess.run(["journalctl", "-D", "/run/log/journal", "-o", "json", "--no-pager"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    out = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    if since_pid:
        out = [e for e in out if e.get("_PID") == str(since_pid)]
    return out


def wait_entries(pid, pred, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        es = [e for e in journal_entries(pid) if pred(e)]
        if es:
            return es
        time.sleep(0.2)
    raise AssertionError(f"no journal entry from {pid} matched; got {[e.get('MESSAGE') for e in journal_entries(pid)]}")


jpid = None


def start_journald():
    global jpid
    if jpid:
        return
    if not os.path.exists(JOURNALD):
        raise Skip("systemd-journald not installed")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run"], check=True)
    os.makedirs("/run/systemd/journal", exist_ok=True)
    os.makedirs("/run/log/journal", exist_ok=True)
    jpid = subprocess.Popen([JOURNALD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
    for _ in range(100):
        if os.path.exists("/run/systemd/journal/socket"):
            break
        time.sleep(0.05)
    assert os.path.exists("/run/systemd/journal/socket"), "journald did not come up"


def stop_journald():
    if jpid:
        os.kill(jpid, signal.SIGTERM)
        os.waitpid(jpid, 0)


def test_structured_fields():
    start_journald()
    d = tmpdir()
    key = base64.b64encode(os.urandom(32)).decode()
    kf = write(f"{d}/own.key", key)
    cfg_text = config_text(d).replace("target: stderr", "target: journal").replace(
        "hub:\n  host_name: gw.test.local\n",
        f"hub:\n  host_name: gw.test.local\n  policies:\n    - name: iothubowner\n      key_file: {kf}\n")
    cfg = write(f"{d}/fieldhub.yaml", cfg_text)
    n = Notify(d)
    fh = Daemon(cfg, notify=n)
    n.wait_for("READY", "1")

    es = wait_entries(fh.pid, lambda e: e.get("MESSAGE_ID") == IDS["STARTED"])
    e = es[0]
    assert e["SYSLOG_IDENTIFIER"] == "fieldhubd", e
    assert e["PRIORITY"] == "5", e
    assert e["FIELDHUB_EVENT"] == "started", e
    assert e["CODE_FILE"].endswith("daemon.c") and int(e["CODE_LINE"]) > 0 and e["CODE_FUNC"], e
    wait_entries(fh.pid, lambda e: e.get("MESSAGE_ID") == IDS["STORE_OPENED"] and e.get("FIELDHUB_COMPONENT") == "store")

    # A rejected reload: each error its own entry, then the operator event.
    write(cfg, cfg_text + "nonsense: [\n")
    fh.signal(signal.SIGHUP)
    es = wait_entries(fh.pid, lambda e: e.get("MESSAGE_ID") == IDS["RELOAD_FAILED"])
    assert es[0]["PRIORITY"] == "3" and es[0]["FIELDHUB_EVENT"] == "reload-failed", es[0]
    errs = wait_entries(fh.pid, lambda e: e.get("FIELDHUB_COMPONENT") == "config")
    assert any(cfg in e["MESSAGE"] for e in errs), [e["MESSAGE"] for e in errs]
    assert fh.alive()

    rc, _ = fh.stop()
    assert rc == 0
    wait_entries(fh.pid, lambda e: e.get("MESSAGE_ID") == IDS["STOPPED"])
    for e in journal_entries(fh.pid):
        assert key not in json.dumps(e), "secret in the journal"


def test_auto_detects_journal_stream():
    start_journald()
    d = tmpdir()
    cfg = write(f"{d}/fieldhub.yaml", config_text(d).replace("target: stderr", "target: auto"))
    # What systemd does for StandardError=journal: a stream socket to journald, its
    # dev:ino in JOURNAL_STREAM.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("/run/systemd/journal/stdout")
    s.sendall(b"fieldhubd\n\n6\n1\n0\n0\n0\n")
    st = os.fstat(s.fileno())
    n = Notify(d)
    env = dict(os.environ, NOTIFY_SOCKET=n.path, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    p = subprocess.Popen([os.environ["FIELDHUBD"], "--config", cfg], env=env, stdout=s.fileno(), stderr=s.fileno())
    s.close()
    try:
        n.wait_for("READY", "1")
        es = wait_entries(p.pid, lambda e: e.get("MESSAGE_ID") == IDS["STARTED"])
        assert es[0]["_TRANSPORT"] == "journal", es[0]  # structured, not a stdout line
    finally:
        p.terminate()
        assert p.wait(timeout=5) == 0


if __name__ == "__main__":
    if os.environ.get("FIELDHUB_IN_NS") != "1":
        if os.geteuid() != 0:
            print("needs root for a private mount namespace; skipping")
            sys.exit(77)
        env = dict(os.environ, FIELDHUB_IN_NS="1")
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, __file__], env=env)
        sys.exit(r.returncode)
    try:
        main([test_structured_fields, test_auto_detects_journal_stream])
    finally:
        stop_journald()
