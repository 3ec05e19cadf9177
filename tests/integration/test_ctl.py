#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""fieldhubctl end to end: offline commands (sas-token against the reference vectors and
python's hmac, check-config) and every daemon command over the admin socket (status, device,
twin, query, c2d, method, backup / restore, monitor-events), the admin socket's robustness
(async answers to clients that left, size caps, passed descriptors), with the errors and exit
statuses an operator sees."""

import base64
import hashlib
import hmac
import json
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(__file__))
from fhlib import FIELDHUBCTL, Daemon, Notify, SRCDIR, config_text, ctl, main, tmpdir, write  # noqa: E402
from ctlcases import Ctl, Hub, exercise, usage_errors  # noqa: E402

REF_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


def offline(*args):
    return subprocess.run([FIELDHUBCTL, *args], capture_output=True, text=True, timeout=30)


def test_sas_token():
    p = offline("sas-token", "--hub", "gw.example.local", "--device", "dev1", "--key", REF_KEY, "--ttl", "1h")
    assert p.returncode == 0, p
    tok = p.stdout.strip()
    assert tok.startswith("SharedAccessSignature sr=gw.example.local%2Fdevices%2Fdev1&sig="), tok
    fields = dict(kv.split("=", 1) for kv in tok.split(" ", 1)[1].split("&"))
    se = int(fields["se"])
    assert abs(se - (time.time() + 3600)) < 5, se
    # Recompute independently with python's hmac.
    mac = hmac.new(base64.b64decode(REF_KEY), f"{fields['sr']}\n{se}".encode(), hashlib.sha256).digest()
    assert urllib.parse.unquote(fields["sig"]) == base64.b64encode(mac).decode(), (fields, mac)

    # Policy token (hub scope, skn) and a module token.
    p = offline("sas-token", "--hub", "gw.example.local", "--policy", "iothubowner", "--key", REF_KEY)
    assert p.returncode == 0 and p.stdout.strip().endswith("&skn=iothubowner") and "sr=gw.example.local&" in p.stdout, p
    p = offline("sas-token", "--hub", "gw.example.local", "--device", "dev1", "--module", "modbus", "--key", REF_KEY)
    assert "sr=gw.example.local%2Fdevices%2Fdev1%2Fmodules%2Fmodbus&" in p.stdout, p

    # Bad input: a key that is not base64 of 16..64 bytes, a bad ttl, missing arguments.
    p = offline("sas-token", "--hub", "h.x", "--device", "d", "--key", "c2hvcnQ=")
    assert p.returncode != 0 and "16 to 64 bytes" in p.stderr, p
    p = offline("sas-token", "--hub", "h.x", "--device", "d", "--key", REF_KEY, "--ttl", "forever")
    assert p.returncode == 64 and "--ttl" in p.stderr, p
    p = offline("sas-token", "--device", "d", "--key", REF_KEY)
    assert p.returncode == 64, p

    # --key-file keeps the key off the command line.
    d = tmpdir()
    kf = write(f"{d}/k", REF_KEY + "\n")
    p = offline("sas-token", "--hub", "gw.example.local", "--device", "dev1", "--key-file", kf, "--json")
    j = json.loads(p.stdout)
    assert j["sas"].startswith("SharedAccessSignature sr=gw.example.local%2Fdevices%2Fdev1&sig=") and j["expiry"] > 0


def test_check_config():
    for name in ("fieldhub.yaml", "demo.yaml"):
        p = offline("check-config", os.path.join(SRCDIR, "configs", name))
        assert p.returncode == 0 and "configuration OK" in p.stdout, p
    d = tmpdir()
    bad = write(f"{d}/bad.yaml", "hub:\n  host_nme: a.b\n")
    p = offline("check-config", bad)
    assert p.returncode == 78 and f'{bad}:2:3: hub.host_nme: unknown key "host_nme"' in p.stderr, p


def test_daemon_not_running():
    d = tmpdir()
    p = ctl(d, "status", check=False)
    assert p.returncode == 1 and "cannot reach fieldhubd" in p.stderr, p


def test_devices_over_admin_socket():
    d = tmpdir()
    hub = Hub(d)
    c = Ctl(hub)
    exercise(c)
    usage_errors(c)

    st = c.json("status")
    assert st["devices"]["total"] == 2 and st["hostName"] == "gw.test.local" and st["store"]["healthy"], st
    human = c("status").stdout
    assert "2 total" in human and "healthy" in human, human
    hub.fh.wait_log(r"Device identity off-1 deleted")

    # Persistence: a restart keeps the registry.
    hub.stop()
    hub.start()
    assert "x509-1" in c("device", "list").stdout
    hub.stop()


def _admin(d, line, fds=None):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(f"{d}/admin.sock")
    if fds:
        socket.send_fds(s, [line], fds)
    else:
        s.sendall(line)
    return s


def _read_line(s, timeout=10):
    s.settimeout(timeout)
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return json.loads(buf.split(b"\n")[0]) if buf else None


def test_admin_socket_robustness():
    d = tmpdir()
    hub = Hub(d)
    c = Ctl(hub)
    c("device", "create", "dev1")

    # A raw api call answers with status, headers and body.
    s = _admin(d, b'{"cmd":"api","args":{"method":"GET","target":"/devices/dev1"}}\n')
    j = _read_line(s)
    s.close()
    assert j["ok"] and j["result"]["status"] == 200 and json.loads(j["result"]["body"])["deviceId"] == "dev1", j

    # A client that leaves before its asynchronous answer (a method call waiting for the
    # device to connect) does not hurt the daemon.
    body = json.dumps({"methodName": "m", "payload": None, "responseTimeoutInSeconds": 5,
                       "connectTimeoutInSeconds": 1})
    for _ in range(5):
        s = _admin(d, json.dumps({"cmd": "api", "args": {"method": "POST", "target": "/twins/dev1/methods",
                                                         "body": body}}).encode() + b"\n")
        s.close()
    # Two requests on one connection are answered in order, one of them asynchronous.
    s = _admin(d, json.dumps({"cmd": "api", "args": {"method": "POST", "target": "/twins/dev1/methods",
                                                     "body": body}}).encode() + b"\n" +
               b'{"cmd":"api","args":{"method":"GET","target":"/statistics/devices"}}\n')
    s.settimeout(10)
    buf = b""
    while buf.count(b"\n") < 2:
        chunk = s.recv(65536)
        assert chunk, buf
        buf += chunk
    first, second = [json.loads(x) for x in buf.split(b"\n")[:2]]
    s.close()
    assert first["result"]["status"] == 404 and "DeviceNotOnline" in first["result"]["body"], first
    assert second["result"]["status"] == 200 and json.loads(second["result"]["body"])["totalDeviceCount"] == 1
    time.sleep(1.5)  # the abandoned calls complete now
    assert hub.fh.alive()

    # Bad api requests get a clear error; an oversize line closes the connection.
    for bad, why in ((b'{"cmd":"api","args":{"method":"GET","target":"devices"}}', "target"),
                     (b'{"cmd":"api","args":{"method":"GET","target":"/x","headers":{"a":1}}}', "header a"),
                     (b'{"cmd":"api","args":{"method":"GET","target":"/x","body":5}}', "body"),
                     (b'{"cmd":"backup","args":{}}', "no file descriptor"),
                     (b'not json', "malformed request")):
        s = _admin(d, bad + b"\n")
        j = _read_line(s)
        s.close()
        assert not j["ok"] and why in j["error"], (bad, j)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(f"{d}/admin.sock")
    try:
        s.sendall(b'{"cmd":"api","args":{"method":"PUT","target":"/devices/x","body":"' + b"a" * (5 << 20))
        assert _read_line(s, timeout=10) is None
    except (ConnectionResetError, BrokenPipeError):
        pass  # closed by the daemon while we were still sending
    s.close()
    hub.fh.wait_log("Admin request over")

    # backup refuses a descriptor that others could read, or one open read-only.
    f = f"{d}/open.db"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    os.fchmod(fd, 0o644)
    s = _admin(d, b'{"cmd":"backup","args":{}}\n', [fd])
    j = _read_line(s)
    assert not j["ok"] and "must not be accessible" in j["error"], j
    os.close(fd)
    os.chmod(f, 0o600)
    fd = os.open(f, os.O_RDONLY)
    s = _admin(d, b'{"cmd":"backup","args":{}}\n', [fd])
    j = _read_line(s)
    assert not j["ok"] and "not open for writing" in j["error"], j
    os.close(fd)
    assert c.json("status")["devices"]["total"] == 1
    hub.stop()


def test_backup_restore():
    d = tmpdir()
    hub = Hub(d)
    c = Ctl(hub)
    c("device", "create", "before-1")
    c("twin", "update", "before-1", "--tags", '{"k": "v"}')
    bak = f"{d}/backups/fh.db"
    os.mkdir(f"{d}/backups", 0o755)
    old = os.umask(0o022)
    try:
        j = c.json("backup", bak)
    finally:
        os.umask(old)
    assert j["file"] == bak and j["bytes"] > 0 and j["schemaVersion"] >= 1, j
    st = os.stat(bak)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert st.st_size == j["bytes"]
    assert not [x for x in os.listdir(f"{d}/backups") if "partial" in x]
    with open(bak, "rb") as f:
        assert f.read(16) == b"SQLite format 3\x00"
    p = c("backup", bak, expect_rc=1)
    assert "exists; use --force" in p.stderr, p.stderr
    assert "backup written to" in c("backup", bak, "--force").stdout
    c("--json", "backup", bak, "--force")

    # Changes after the backup.
    c("device", "create", "after-1")
    c("device", "delete", "before-1")

    # restore refuses while the daemon runs, garbage, a newer schema, a non-fieldhub database.
    p = c("restore", bak, "--state-dir", f"{d}/state", expect_rc=1)
    assert "fieldhubd is running" in p.stderr, p.stderr
    hub.stop()
    garbage = write(f"{d}/garbage.db", "this is not a database" * 100)
    p = c("restore", garbage, "--state-dir", f"{d}/state", expect_rc=65)
    assert "not an SQLite database" in p.stderr, p.stderr
    newer = f"{d}/newer.db"
    shutil.copy(bak, newer)
    con = sqlite3.connect(newer)
    con.execute("UPDATE schema_version SET version = 999")
    con.commit()
    con.close()
    p = c("restore", newer, "--state-dir", f"{d}/state", expect_rc=65)
    assert "newer fieldhub (schema 999" in p.stderr, p.stderr
    other = f"{d}/other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    p = c("restore", other, "--state-dir", f"{d}/state", expect_rc=65)
    assert "not a fieldhub store" in p.stderr, p.stderr
    p = c("restore", f"{d}/missing.db", "--state-dir", f"{d}/state", expect_rc=1)
    assert "No such file" in p.stderr, p.stderr
    # Nothing was touched by the refusals.
    assert not os.path.exists(f"{d}/state/fieldhub.db.before-restore")
    assert not [x for x in os.listdir(f"{d}/state") if x.startswith(".restore")]

    # The real restore, reading the state directory from the configuration.
    out = c.json("restore", bak, "--config", hub.cfg)
    assert out["store"] == f"{d}/state/fieldhub.db" and out["previous"].endswith(".before-restore"), out
    st = os.stat(f"{d}/state/fieldhub.db")
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.stat(f"{d}/state").st_uid
    assert not os.path.exists(f"{d}/state/fieldhub.db-wal")
    p = c("restore", bak, "--state-dir", f"{d}/state", expect_rc=1)
    assert "from an earlier restore" in p.stderr, p.stderr

    hub.start()
    ids = [x["deviceId"] for x in c.json("device", "list")]
    assert ids == ["before-1"], ids
    assert c.json("twin", "show", "before-1")["tags"] == {"k": "v"}
    hub.fh.wait_log("quick_check|unclean|opened")
    hub.stop()


def test_monitor_events():
    d = tmpdir()
    hub = Hub(d)
    c = Ctl(hub)
    c("device", "create", "dev1")
    c("device", "create", "dev2")
    e = dict(os.environ)
    base = [FIELDHUBCTL, "--socket", f"{d}/admin.sock", "monitor-events", "--timeout", "4s"]
    p_all = subprocess.Popen(base + ["--json", "--properties"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=e)
    p_one = subprocess.Popen(base + ["--device", "dev2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=e)
    time.sleep(1.0)
    c("twin", "update", "dev1", "--desired", '{"a": 1}')
    c("twin", "update", "dev2", "--tags", '{"b": 2}')
    out_all, err_all = p_all.communicate(timeout=30)
    out_one, err_one = p_one.communicate(timeout=30)
    assert p_all.returncode == 0 and p_one.returncode == 0, (err_all, err_one)
    events = [json.loads(line)["event"] for line in out_all.splitlines()]
    assert [ev["origin"] for ev in events] == ["dev1", "dev2"], events
    ev = events[0]
    assert ev["module"] == "" and ev["interface"] == "" and ev["component"] == ""
    assert ev["payload"]["properties"]["desired"]["a"] == 1, ev
    assert ev["properties"]["system"]["iothub-message-source"] == "twinChangeEvents", ev
    assert "application" in ev["properties"]
    # Human output: indented JSON without properties, only dev2.
    assert "Starting event monitor" in err_one
    assert '"origin": "dev2"' in out_one and '"origin": "dev1"' not in out_one and '"properties": {' not in \
        out_one.split('"payload"')[0], out_one
    # --after replays what the stream holds after a position: from the first event's position,
    # exactly the second one; from 0, both (and nothing new arrives within the timeout).
    seqs = [ev["annotations"]["x-opt-sequence-number"] for ev in events]
    assert all(isinstance(s, int) for s in seqs) and seqs[0] < seqs[1], seqs
    replay = lambda after: [json.loads(line)["event"] for line in subprocess.run(
        [FIELDHUBCTL, "--socket", f"{d}/admin.sock", "monitor-events", "--timeout", "2s", "--json", "--properties",
         "--after", str(after)], capture_output=True, text=True, env=e, timeout=30, check=True).stdout.splitlines()]
    assert [ev["annotations"]["x-opt-sequence-number"] for ev in replay(seqs[0])] == seqs[1:]
    # From 0: everything kept, in order, the device creations' lifecycle events before them.
    full = replay(0)
    full_seqs = [ev["annotations"]["x-opt-sequence-number"] for ev in full]
    assert full_seqs == sorted(full_seqs) and full_seqs[-2:] == seqs and len(full) > 2, full
    assert {ev["properties"]["system"].get("iothub-message-source") for ev in full[:-2]} == \
        {"deviceLifecycleEvents"}, full
    p = c("monitor-events", "--after", "-1", expect_rc=64)
    assert "--after: expected a sequence number" in p.stderr, p.stderr
    p = c("--hub", "127.0.0.1:1", "--connection-string", hub.connection_string(), "monitor-events", expect_rc=1)
    assert "only over the admin socket" in p.stderr, p.stderr
    hub.stop()


def test_peer_credentials_checked():
    if os.geteuid() != 0:
        return
    d = tmpdir()
    os.chmod(d, 0o755)
    n = Notify(d)
    cfg = write(f"{d}/fieldhub.yaml", config_text(d))
    fh = Daemon(cfg, notify=n)
    n.wait_for("READY", "1")
    os.chmod(f"{d}/admin.sock", 0o666)  # even with the file opened up, the peer check refuses
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", FIELDHUBCTL,
                        "--socket", f"{d}/admin.sock", "status"], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0, p
    fh.wait_log("refused a client")
    fh.stop()


if __name__ == "__main__":
    main([test_sas_token, test_check_config, test_daemon_not_running, test_devices_over_admin_socket,
          test_admin_socket_robustness, test_backup_restore, test_monitor_events, test_peer_credentials_checked])
