#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""fieldhubctl end to end: offline commands (sas-token against the reference vectors and
python's hmac, check-config) and daemon commands over the admin socket (status, device
create/show/list/delete/show-connection-string), with the errors an operator sees."""

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(__file__))
from fhlib import FIELDHUBCTL, Daemon, Notify, SRCDIR, config_text, ctl, main, tmpdir, write  # noqa: E402

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
    n = Notify(d)
    cfg = write(f"{d}/fieldhub.yaml", config_text(d))
    fh = Daemon(cfg, notify=n)
    n.wait_for("READY", "1")

    p = ctl(d, "device", "create", "sensor-1", "--json")
    dev = json.loads(p.stdout)
    assert dev["deviceId"] == "sensor-1" and dev["status"] == "enabled", dev
    assert dev["authentication"]["type"] == "sas"
    pk = dev["authentication"]["symmetricKey"]["primaryKey"]
    assert len(base64.b64decode(pk)) == 32
    assert dev["etag"] and dev["generationId"] and dev["connectionState"] == "Disconnected"

    p = ctl(d, "device", "create", "sensor-1", check=False)
    assert p.returncode == 1 and "DeviceAlreadyExists" in p.stderr, p
    p = ctl(d, "device", "create", "bad/id", check=False)
    assert p.returncode == 1 and "ArgumentInvalid" in p.stderr, p
    thumb = "A" * 40
    ctl(d, "device", "create", "x509-1", "--auth", "selfSigned", "--primary-thumbprint", thumb)

    p = ctl(d, "device", "list")
    lines = p.stdout.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "STATUS", "CONNECTION"] and len(lines) == 3, lines
    assert ctl(d, "device", "show", "x509-1", "--json").stdout.count("selfSigned") == 1

    cs = ctl(d, "device", "show-connection-string", "sensor-1").stdout.strip()
    assert cs == f"HostName=gw.test.local;DeviceId=sensor-1;SharedAccessKey={pk}", cs
    assert ctl(d, "device", "show-connection-string", "x509-1").stdout.strip() == "HostName=gw.test.local;DeviceId=x509-1;x509=true"

    st = json.loads(ctl(d, "status", "--json").stdout)
    assert st["devices"]["total"] == 2 and st["hostName"] == "gw.test.local" and st["store"]["healthy"], st
    human = ctl(d, "status").stdout
    assert "2 total" in human and "healthy" in human, human

    p = ctl(d, "device", "delete", "sensor-1", "--etag", '"bm9wZQ=="', check=False)
    assert p.returncode == 1 and "PreconditionFailed" in p.stderr, p
    ctl(d, "device", "delete", "sensor-1")
    p = ctl(d, "device", "show", "sensor-1", check=False)
    assert p.returncode == 1 and "DeviceNotFound" in p.stderr, p
    fh.wait_log(r"Device identity sensor-1 deleted")

    # Persistence: a restart keeps the registry.
    fh.stop()
    fh = Daemon(cfg, notify=n)
    n.wait_for("READY", "1", after=len(n.messages))
    assert "x509-1" in ctl(d, "device", "list").stdout
    fh.stop()


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
          test_peer_credentials_checked])
