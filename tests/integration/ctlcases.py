# SPDX-License-Identifier: MIT
"""fieldhubctl end-to-end cases shared by test_ctl.py (admin socket) and test_ctl_https.py
(HTTPS service API with a policy connection string): one daemon with the service API on a
loopback port and an iothubowner policy key, and every REST-backed command run through a
given transport."""

import base64
import json
import os
import socket
import subprocess

from fhlib import FIELDHUBCTL, Daemon, Notify, write

KEY = base64.b64encode(bytes(range(100, 132))).decode()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Hub:
    """A running fieldhubd with an admin socket and the service API on 127.0.0.1:port."""

    def __init__(self, d, aliases=()):
        self.d = d
        self.port = free_port()
        self.key_file = write(f"{d}/owner.key", KEY + "\n")
        self.cfg = write(f"{d}/fieldhub.yaml", f"""hub:
  host_name: gw.test.local
{"  host_aliases: [" + ", ".join(f'"{a}"' for a in aliases) + "]" if aliases else ""}
  policies:
    - name: iothubowner
      key_file: {self.key_file}
state_dir: {d}/state
log:
  level: info
  target: stderr
admin:
  socket: {d}/admin.sock
service_api:
  listen: ["127.0.0.1:{self.port}"]
""")
        self.notify = Notify(d)
        self.start()

    def start(self):
        self.fh = Daemon(self.cfg, notify=self.notify)
        self.notify.wait_for("READY", "1", after=len(self.notify.messages))

    def stop(self):
        rc, _ = self.fh.stop()
        assert rc == 0, rc

    @property
    def ca(self):
        return f"{self.d}/state/ca.crt"

    def connection_string(self, key=KEY, host="gw.test.local"):
        return f"HostName={host};SharedAccessKeyName=iothubowner;SharedAccessKey={key}"


class Ctl:
    """Runs fieldhubctl over one transport."""

    def __init__(self, hub, https=False, env=None):
        self.hub = hub
        self.https = https
        self.env = env

    def args(self):
        a = ["--socket", f"{self.hub.d}/admin.sock"]
        if self.https:
            a += ["--hub", f"127.0.0.1:{self.hub.port}", "--cafile", self.hub.ca,
                  "--connection-string", self.hub.connection_string()]
        return a

    def __call__(self, *args, check=True, input=None, expect_rc=None):
        e = dict(os.environ)
        e.pop("FIELDHUB_CONNECTION_STRING", None)
        if self.env:
            e.update(self.env)
        p = subprocess.run([FIELDHUBCTL, *self.args(), *args], capture_output=True, text=True, input=input,
                           timeout=120, env=e)
        if expect_rc is not None:
            assert p.returncode == expect_rc, (args, p.returncode, p.stdout, p.stderr)
        elif check and p.returncode != 0:
            raise AssertionError(f"fieldhubctl {' '.join(args)} failed ({p.returncode}): {p.stderr}")
        if p.returncode != 0:
            # Every error is one line naming the reason.
            lines = [ln for ln in p.stderr.splitlines() if ln.startswith("fieldhubctl: ")]
            assert lines, p.stderr
        return p

    def json(self, *args):
        return json.loads(self(*args, "--json").stdout)


def exercise(ctl):
    """Every REST-backed command, its --json output and its errors."""
    # device create / show / list
    dev = ctl.json("device", "create", "sensor-1")
    assert dev["deviceId"] == "sensor-1" and dev["status"] == "enabled", dev
    assert dev["authentication"]["type"] == "sas"
    pk = dev["authentication"]["symmetricKey"]["primaryKey"]
    sk = dev["authentication"]["symmetricKey"]["secondaryKey"]
    assert len(base64.b64decode(pk)) == 32 and pk != sk
    assert dev["etag"] and dev["generationId"] and dev["connectionState"] == "Disconnected"

    p = ctl("device", "create", "sensor-1", expect_rc=1)
    assert "DeviceAlreadyExists" in p.stderr and "(HTTP 409)" in p.stderr, p.stderr
    p = ctl("device", "create", "bad/id", expect_rc=1)
    assert "(HTTP 4" in p.stderr, p.stderr
    ctl("device", "create", "x509-1", "--auth", "selfSigned", "--primary-thumbprint", "A" * 40)
    ctl("device", "create", "off-1", "--disabled")

    lines = ctl("device", "list").stdout.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "STATUS", "CONNECTION"] and len(lines) == 4, lines
    ids = [d["deviceId"] for d in ctl.json("device", "list")]
    assert sorted(ids) == ["off-1", "sensor-1", "x509-1"], ids
    assert len(ctl.json("device", "list", "--top", "1")) == 1
    assert ctl.json("device", "show", "x509-1")["authentication"]["type"] == "selfSigned"
    assert "status:            enabled" in ctl("device", "show", "sensor-1").stdout

    cs = ctl("device", "show-connection-string", "sensor-1").stdout.strip()
    assert cs == f"HostName=gw.test.local;DeviceId=sensor-1;SharedAccessKey={pk}", cs
    cs2 = ctl.json("device", "show-connection-string", "sensor-1", "--secondary")["connectionString"]
    assert cs2.endswith(f"SharedAccessKey={sk}"), cs2
    assert ctl("device", "show-connection-string", "x509-1").stdout.strip() == \
        "HostName=gw.test.local;DeviceId=x509-1;x509=true"

    # update: status and reason; a stale etag is refused
    etag = ctl.json("device", "show", "sensor-1")["etag"]
    d = ctl.json("device", "update", "sensor-1", "--status", "disabled", "--status-reason", "maintenance",
                 "--etag", etag)
    assert d["status"] == "disabled" and d["statusReason"] == "maintenance" and d["etag"] != etag, d
    p = ctl("device", "update", "sensor-1", "--status", "enabled", "--etag", etag, expect_rc=1)
    assert "PreconditionFailed" in p.stderr and "(HTTP 412)" in p.stderr, p.stderr
    assert ctl.json("device", "update", "sensor-1", "--status", "enabled")["status"] == "enabled"
    ctl("device", "update", "sensor-1", "--status", "sleeping", expect_rc=64)
    ctl("device", "update", "sensor-1", expect_rc=64)

    # regenerate-key: primary changes, secondary kept; swap exchanges them
    d = ctl.json("device", "regenerate-key", "sensor-1", "--key", "primary")
    k = d["authentication"]["symmetricKey"]
    assert k["primaryKey"] != pk and k["secondaryKey"] == sk and len(base64.b64decode(k["primaryKey"])) == 32, k
    d = ctl.json("device", "regenerate-key", "sensor-1", "--key", "swap")
    k2 = d["authentication"]["symmetricKey"]
    assert k2["primaryKey"] == sk and k2["secondaryKey"] == k["primaryKey"], k2
    d = ctl.json("device", "regenerate-key", "sensor-1", "--key", "secondary")
    assert d["authentication"]["symmetricKey"]["secondaryKey"] not in (k["primaryKey"], sk)
    p = ctl("device", "regenerate-key", "x509-1", "--key", "primary", expect_rc=1)
    assert "does not use SAS keys" in p.stderr, p.stderr
    ctl("device", "regenerate-key", "sensor-1", "--key", "tertiary", expect_rc=64)

    # twins
    t = ctl.json("twin", "update", "sensor-1", "--desired", '{"interval": 5}', "--tags", '{"site": "north"}')
    assert t["tags"] == {"site": "north"} and t["properties"]["desired"]["interval"] == 5, t
    t2 = ctl.json("twin", "show", "sensor-1")
    assert t2["etag"] == t["etag"] and t2["properties"]["desired"]["$version"] >= 2, t2
    p = ctl("twin", "update", "sensor-1", "--desired", '{"interval": 6}', "--etag", '"AAAAAAAAAAA="', expect_rc=1)
    assert "PreconditionFailed" in p.stderr, p.stderr
    t3 = ctl.json("twin", "update", "sensor-1", "--desired", '{"interval": null}', "--etag", t["etag"])
    assert "interval" not in t3["properties"]["desired"], t3
    p = ctl("twin", "update", "sensor-1", "--desired", "{nope", expect_rc=64)
    assert "--desired: not JSON" in p.stderr, p.stderr
    ctl("twin", "update", "sensor-1", "--desired", "[1]", expect_rc=64)
    p = ctl("twin", "show", "ghost", expect_rc=1)
    assert "DeviceNotFound" in p.stderr and "(HTTP 404)" in p.stderr, p.stderr

    # query, paged by one item: every page is followed
    rows = ctl.json("query", "SELECT deviceId FROM devices", "--page-size", "1")
    assert sorted(r["deviceId"] for r in rows) == ["off-1", "sensor-1", "x509-1"], rows
    assert len(ctl.json("query", "SELECT * FROM devices", "--page-size", "1", "--max-items", "2")) == 2
    rows = ctl.json("query", "SELECT * FROM devices WHERE tags.site = 'north'")
    assert [r["deviceId"] for r in rows] == ["sensor-1"], rows
    json.loads(ctl("query", "SELECT COUNT() AS n FROM devices").stdout)  # human output is JSON too
    p = ctl("query", "SELECT * FROM", expect_rc=1)
    assert "(HTTP 400)" in p.stderr, p.stderr
    ctl("query", expect_rc=64)

    # c2d send / purge / feedback
    out = ctl.json("c2d", "send", "sensor-1", "--body", "hello", "--property", "k=v", "--message-id", "m-1",
                   "--ack", "full", "--ttl", "5min")
    assert out["messageId"] == "m-1" and out["deviceId"] == "sensor-1", out
    bf = write(f"{ctl.hub.d}/body.json", '{"cmd":"on"}')
    out = ctl.json("c2d", "send", "sensor-1", "--body-file", bf)
    assert out["messageId"], out  # generated when not given
    assert "sent message" in ctl("c2d", "send", "sensor-1").stdout
    assert ctl.json("device", "show", "sensor-1")["cloudToDeviceMessageCount"] == 3
    p = ctl("c2d", "send", "ghost", "--body", "x", expect_rc=1)
    assert "DeviceNotFound" in p.stderr, p.stderr
    ctl("c2d", "send", "sensor-1", "--ack", "sometimes", expect_rc=64)
    ctl("c2d", "send", "sensor-1", "--property", "novalue", expect_rc=64)
    assert ctl.json("c2d", "purge", "sensor-1")["totalMessagesPurged"] == 3
    assert "purged 0 message(s) from sensor-1" in ctl("c2d", "purge", "sensor-1").stdout
    fb = json.loads(ctl("c2d", "feedback", "--json").stdout)
    assert isinstance(fb, list)

    # methods: nobody is connected
    p = ctl("method", "invoke", "sensor-1", "reboot", "--payload", '{"delay": 1}', "--timeout", "5s", expect_rc=1)
    assert "DeviceNotOnline" in p.stderr and "(HTTP 404)" in p.stderr, p.stderr
    ctl("method", "invoke", "sensor-1", "reboot", "--payload", "{x", expect_rc=64)
    ctl("method", "invoke", "sensor-1", expect_rc=64)

    # delete with a wrong etag, then for real
    p = ctl("device", "delete", "off-1", "--etag", '"bm9wZQ=="', expect_rc=1)
    assert "PreconditionFailed" in p.stderr, p.stderr
    assert "deleted off-1" in ctl("device", "delete", "off-1").stdout
    p = ctl("device", "show", "off-1", expect_rc=1)
    assert "DeviceNotFound" in p.stderr, p.stderr


def usage_errors(ctl):
    """Exit 64 and a one-line reason on usage errors; --help per command."""
    for args in (["device"], ["device", "frobnicate", "x"], ["device", "show"], ["twin"], ["c2d"],
                 ["c2d", "purge"], ["method"], ["query", "a", "b"], ["frobnicate"], ["--bogus", "status"],
                 ["backup"], ["restore"], ["device", "list", "--top", "0"], ["status", "extra"]):
        p = ctl(*args, expect_rc=64)
        assert p.stderr.startswith("fieldhubctl: ") and len(p.stderr.splitlines()) == 1, (args, p.stderr)
    for cmd in ("device", "twin", "query", "c2d", "method", "backup", "restore", "monitor-events", "status",
                "reload", "sas-token", "check-config"):
        p = ctl(cmd, "--help")
        assert p.stdout.startswith("Usage: fieldhubctl") and cmd in p.stdout, (cmd, p.stdout)
