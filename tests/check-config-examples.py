#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Every configs/examples/*.yaml passes `fieldhubd --check-config`.

The examples name key files under /etc/fieldhub and systemd credentials, which do not exist
on a build machine; check-config rightly refuses a missing secret. So each example is checked
as a copy in which every absolute *_file path that does not exist here points to a file made here (a random base64
key) and CREDENTIALS_DIRECTORY holds every named credential. Everything else is checked as
shipped. Usage: check-config-examples.py FIELDHUBD SRCDIR"""

import base64
import glob
import os
import re
import subprocess
import sys
import tempfile


def main():
    fieldhubd, src = sys.argv[1], sys.argv[2]
    files = sorted(glob.glob(os.path.join(src, "configs", "examples", "*.yaml")))
    assert files, "no examples"
    failed = 0
    for path in files:
        text = open(path).read()
        with tempfile.TemporaryDirectory(prefix="fieldhub-example-") as d:
            creds = os.path.join(d, "credentials")
            os.makedirs(creds)
            key = base64.b64encode(os.urandom(32)).decode() + "\n"

            def file_repl(m):
                if os.path.exists(m.group(2)):
                    return m.group(0)  # a file every machine has (the system CA bundle)
                target = os.path.join(d, "files", m.group(2).lstrip("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                if not os.path.exists(target):
                    with open(target, "w") as f:
                        f.write(key)
                    os.chmod(target, 0o600)
                return m.group(1) + target

            # key_file: /etc/..., value_file: ..., password_file: ..., x509_ca_files: [/etc/...]
            text2 = re.sub(r"(_file:\s*)(/[^\s,}\]]+)", file_repl, text)
            text2 = re.sub(r"(_files:\s*\[\s*)(/[^\],\s]+)", file_repl, text2)
            for name in re.findall(r"_credential:\s*([\w.@-]+)", text2):
                with open(os.path.join(creds, name), "w") as f:
                    f.write(key)
                os.chmod(os.path.join(creds, name), 0o600)
            # State and log directories must not be the machine's.
            text2 = re.sub(r"^state_dir:.*$", f"state_dir: {d}/state", text2, flags=re.M)
            cfg = os.path.join(d, os.path.basename(path))
            with open(cfg, "w") as f:
                f.write(text2)
            env = dict(os.environ, CREDENTIALS_DIRECTORY=creds)
            r = subprocess.run([fieldhubd, "--check-config", "--config", cfg], capture_output=True, text=True,
                               env=env, timeout=60)
            status = "ok" if r.returncode == 0 else f"FAILED ({r.returncode})"
            print(f"{os.path.relpath(path, src)}: {status}")
            if r.returncode != 0:
                failed += 1
                print(r.stdout + r.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
