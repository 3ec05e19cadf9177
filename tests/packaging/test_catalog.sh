#!/bin/sh
# Every MESSAGE_ID in gateway/log-ids.h has an entry in the journald catalog, every catalog
# entry belongs to an id (no stale entries), each entry has Subject/Defined-By/Support and a
# text, and journalctl accepts the file (--update-catalog into a scratch root).
#   tests/packaging/test_catalog.sh [SRCDIR]
set -eu
src=${1:-${FIELDHUB_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}}
ids_h="$src/gateway/log-ids.h"
catalog="$src/packaging/systemd/fieldhub.catalog"
fail=0

ids=$(sed -n 's/^#define GW_MSG_[A-Z0-9_]* "\([0-9a-f]\{32\}\)".*/\1/p' "$ids_h")
[ -n "$ids" ] || { echo "no MESSAGE_ID found in $ids_h" >&2; exit 1; }
n_defines=$(grep -c '^#define GW_MSG_' "$ids_h")
[ "$(echo "$ids" | wc -l)" -eq "$n_defines" ] || {
    echo "log-ids.h: some GW_MSG_ defines are not 32 lower-case hex digits" >&2; fail=1; }
dups=$(echo "$ids" | sort | uniq -d)
[ -z "$dups" ] || { echo "log-ids.h: duplicate ids: $dups" >&2; fail=1; }

for id in $ids; do
    name=$(grep "\"$id\"" "$ids_h" | sed 's/^#define \(GW_MSG_[A-Z0-9_]*\).*/\1/')
    if ! grep -qx -- "-- $id" "$catalog"; then
        echo "catalog: no entry for $name ($id)" >&2; fail=1; continue
    fi
    # The entry: from its header to the next header.
    entry=$(awk -v id="$id" '$0 == "-- " id { on = 1; next } /^-- [0-9a-f]{32}$/ { on = 0 } on' "$catalog")
    for field in Subject Defined-By Support; do
        echo "$entry" | grep -q "^$field: ." || { echo "catalog: $name ($id) has no $field:" >&2; fail=1; }
    done
    words=$(echo "$entry" | grep -v '^[A-Za-z-]*: ' | wc -w)
    [ "$words" -ge 20 ] || { echo "catalog: $name ($id) explains too little ($words words)" >&2; fail=1; }
done

for id in $(sed -n 's/^-- \([0-9a-f]\{32\}\)$/\1/p' "$catalog"); do
    echo "$ids" | grep -qx "$id" || { echo "catalog: entry $id is not in log-ids.h" >&2; fail=1; }
done

if command -v journalctl >/dev/null; then
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root/usr/lib/systemd/catalog" "$root/var/lib/systemd/catalog"
    cp "$catalog" "$root/usr/lib/systemd/catalog/"
    if ! journalctl --root="$root" --update-catalog; then
        echo "journalctl --update-catalog rejected $catalog" >&2; fail=1
    else
        listed=$(journalctl --root="$root" --list-catalog | wc -l)
        [ "$listed" -eq "$n_defines" ] || {
            echo "journalctl lists $listed entries, log-ids.h has $n_defines" >&2; fail=1; }
    fi
fi

[ "$fail" -eq 0 ] && echo "catalog: $n_defines ids documented"
exit "$fail"
