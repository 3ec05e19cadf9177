#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""fieldhubctl over HTTPS: the same commands as over the admin socket, through the service REST
API with a shared access policy (connection string, $FIELDHUB_CONNECTION_STRING, or --policy
and --key-file), trusting the hub's generated CA; connection-string and credential errors; the
admin-only commands refused."""

import base64
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from fhlib import SRCDIR, Skip, main, tmpdir, write  # noqa: E402
from ctlcases import KEY, Ctl, Hub, exercise, usage_errors  # noqa: E402


def need_api():
    if not os.path.exists(os.path.join(SRCDIR, "gateway", "api", "api.h")):
        raise Skip("this tree has no service API (gateway/api/api.h)")


def test_commands_over_https():
    need_api()
    d = tmpdir()
    hub = Hub(d)
    c = Ctl(hub, https=True)
    exercise(c)
    usage_errors(c)

    st = c.json("status")
    assert st["hostName"] == "gw.test.local" and st["devices"]["totalDeviceCount"] == 2, st
    assert "2 total" in c("status").stdout
    # The requests really went over the network, signed with the policy.
    hub.fh.wait_log(r"Service API request")
    # What only the box itself may do.
    for args, why in ((["reload", "--wait"], "admin socket"), (["backup", f"{d}/b.db"], "admin socket"),
                      (["restore", f"{d}/b.db", "--state-dir", d], "no --hub"),
                      (["monitor-events"], "admin socket")):
        p = c(*args, expect_rc=1)
        assert why in p.stderr, (args, p.stderr)
    assert not os.path.exists(f"{d}/b.db")
    hub.stop()


def test_credentials():
    need_api()
    d = tmpdir()
    hub = Hub(d, aliases=["127.0.0.1"])
    base = Ctl(hub)
    base("device", "create", "dev1")
    hubarg = ["--hub", f"127.0.0.1:{hub.port}", "--cafile", hub.ca]

    # $FIELDHUB_CONNECTION_STRING
    env = Ctl(hub, env={"FIELDHUB_CONNECTION_STRING": hub.connection_string()})
    assert env.json(*hubarg, "device", "show", "dev1")["deviceId"] == "dev1"
    # --policy and --key-file: the token is scoped to the --hub host (here an alias).
    assert base.json(*hubarg, "--policy", "iothubowner", "--key-file", hub.key_file, "device", "show",
                     "dev1")["deviceId"] == "dev1"
    # Options may also follow the command.
    assert base.json("device", "show", "dev1", *hubarg, "--connection-string",
                     hub.connection_string())["deviceId"] == "dev1"

    # A wrong key, an unknown policy: 401 from the hub, in one line.
    wrong = base64.b64encode(b"\x01" * 32).decode()
    p = base(*hubarg, "--connection-string", hub.connection_string(key=wrong), "device", "list", expect_rc=1)
    assert "IotHubUnauthorized" in p.stderr and "(HTTP 401)" in p.stderr, p.stderr
    p = base(*hubarg, "--connection-string", f"HostName=gw.test.local;SharedAccessKeyName=service;SharedAccessKey={KEY}",
             "device", "list", expect_rc=1)
    assert "(HTTP 401)" in p.stderr, p.stderr
    p = base(*hubarg, "--connection-string", hub.connection_string(key="c2hvcnQ="), "device", "list", expect_rc=1)
    assert "16 to 64 bytes" in p.stderr, p.stderr

    # Malformed connection strings: exit 64 with the reason.
    for cs, why in (("HostName=gw.test.local;SharedAccessKey=" + KEY, "SharedAccessKeyName (the policy) is missing"),
                    ("SharedAccessKeyName=iothubowner;SharedAccessKey=" + KEY, "HostName is missing"),
                    ("HostName=gw;SharedAccessKeyName=iothubowner;SharedAccessKey=" + KEY, "must contain a dot"),
                    ("hostname=gw.test.local;SharedAccessKeyName=iothubowner;SharedAccessKey=" + KEY,
                     'unknown name "hostname"'),
                    ("HostName=gw.test.local;DeviceId=d;SharedAccessKey=" + KEY, "device connection string"),
                    ("HostName=gw.test.local;SharedAccessKeyName=iothubowner;SharedAccessKey", "not Name=Value"),
                    ("HostName=a.b;HostName=a.b;SharedAccessKeyName=x;SharedAccessKey=" + KEY, "appears twice"),
                    ("HostName=gw.test.local;SharedAccessKeyName=iothubowner;SharedAccessKey=", "empty value")):
        p = base(*hubarg, "--connection-string", cs, "device", "list", expect_rc=64)
        assert why in p.stderr and len(p.stderr.splitlines()) == 1, (cs, p.stderr)
    # A key ending in "=" survives the split at the first "=" (reference §1.1).
    assert KEY.endswith("=")
    p = base("--hub", f"127.0.0.1:{hub.port}", "device", "list", expect_rc=64)
    assert "needs credentials" in p.stderr, p.stderr
    p = base("--connection-string", hub.connection_string(), "device", "list", expect_rc=64)
    assert "need --hub" in p.stderr, p.stderr
    p = base("--hub", "127.0.0.1:99999", "--connection-string", hub.connection_string(), "status", expect_rc=64)
    assert "1..65535" in p.stderr, p.stderr
    p = base("--hub", "127.0.0.1:1", "--insecure", "status", expect_rc=64)

    # TLS: without the generated CA the hub is not trusted; a closed port fails clearly.
    p = base("--hub", f"127.0.0.1:{hub.port}", "--connection-string", hub.connection_string(), "device", "list",
             expect_rc=1)
    assert "certificate" in p.stderr.lower(), p.stderr
    other_ca = write(f"{d}/other.crt", open("/etc/ssl/certs/ca-certificates.crt").read()) \
        if os.path.exists("/etc/ssl/certs/ca-certificates.crt") else None
    if other_ca:
        p = base("--hub", f"127.0.0.1:{hub.port}", "--cafile", other_ca, "--connection-string",
                 hub.connection_string(), "device", "list", expect_rc=1)
    port = hub.port
    hub.stop()
    p = base("--hub", f"127.0.0.1:{port}", "--cafile", hub.ca, "--connection-string", hub.connection_string(),
             "device", "list", expect_rc=1)
    assert f"127.0.0.1:{port}" in p.stderr, p.stderr


if __name__ == "__main__":
    main([test_commands_over_https, test_credentials])
