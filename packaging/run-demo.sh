#!/bin/sh
# The README's first command: installs the build dependencies, builds fieldhub, and runs
# fieldhubd in the foreground on configs/demo.yaml (state in /tmp/fieldhub-demo, created
# on start). Stop it with Ctrl-C. While it runs, in another shell:
#   ./build-demo/gateway/fieldhubctl --socket /tmp/fieldhub-demo/admin.sock status
set -eu
cd "$(dirname "$0")/.."
packaging/install-deps.sh --build
if [ -d build-demo/meson-private ]; then
        meson setup --reconfigure build-demo -Dtests=false >/dev/null
else
        meson setup build-demo -Dtests=false --buildtype=release >/dev/null
fi
ninja -C build-demo >/dev/null
echo "fieldhubd: starting on configs/demo.yaml; Ctrl-C stops it." >&2
echo "In another shell: ./build-demo/gateway/fieldhubctl --socket /tmp/fieldhub-demo/admin.sock status" >&2
exec ./build-demo/gateway/fieldhubd --config configs/demo.yaml
