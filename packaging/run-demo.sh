#!/bin/sh
# The README's first command: installs the build dependencies, builds fieldhub, and runs
# fieldhubd in the foreground on configs/demo.yaml with a state directory under ./demo-state.
# Stop it with Ctrl-C. While it runs, in another shell:
#   ./build-demo/gateway/fieldhubctl --socket ./demo-state/admin.sock status
set -eu
cd "$(dirname "$0")/.."
top=$(pwd)
packaging/install-deps.sh --build
if [ -d build-demo/meson-private ]; then
        meson setup --reconfigure build-demo -Dtests=false >/dev/null
else
        meson setup build-demo -Dtests=false --buildtype=release >/dev/null
fi
ninja -C build-demo >/dev/null
mkdir -p "$top/demo-state"
chmod 0700 "$top/demo-state"
echo "fieldhubd: starting on configs/demo.yaml (state in $top/demo-state); Ctrl-C stops it" >&2
exec ./build-demo/gateway/fieldhubd --config configs/demo.yaml --state-dir "$top/demo-state/store"
