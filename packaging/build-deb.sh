#!/bin/sh
# Builds the fieldhub binary package from a clean copy of the work tree.
#
#   packaging/build-deb.sh [--version VERSION] [--outdir DIR]
#
# debian/ lives in packaging/debian/; this copies the work tree as it is (tracked and
# untracked files, uncommitted changes included; never .git, build*/ or anything else
# .gitignore excludes) into a temporary directory, puts debian/ at its top and runs
# `dpkg-buildpackage -us -uc -b`. The .deb (with .buildinfo and .changes) lands in
# packaging/out/ or DIR. --version adds a changelog entry with that version to the copy
# (the tests build an "upgrade" package this way); the source tree is never changed.
set -eu

usage() { sed -n '2,12s/^# \{0,1\}//p' "$0"; }

version=""
srcdir=$(cd "$(dirname "$0")/.." && pwd)
outdir="$srcdir/packaging/out"
while [ $# -gt 0 ]; do
    case "$1" in
        --version) [ $# -ge 2 ] || { echo "build-deb.sh: --version needs a value" >&2; exit 2; }
                   version=$2; shift 2 ;;
        --outdir)  [ $# -ge 2 ] || { echo "build-deb.sh: --outdir needs a value" >&2; exit 2; }
                   outdir=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "build-deb.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done

for tool in dpkg-buildpackage dh; do
    command -v "$tool" >/dev/null || {
        echo "build-deb.sh: $tool not found; run packaging/install-deps.sh" >&2; exit 1; }
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fieldhub-deb.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM
tree="$tmp/fieldhub"
mkdir -p "$tree"

# Copy the work tree as it is.
if git -C "$srcdir" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Tracked + untracked-but-not-ignored files that exist (a deleted tracked file is skipped).
    (cd "$srcdir" && git ls-files -z --cached --others --exclude-standard) |
        (cd "$srcdir" && xargs -0 sh -c 'for f; do [ -e "$f" ] || [ -L "$f" ] && printf "%s\0" "$f"; done; exit 0' sh) |
        tar -C "$srcdir" --null -T - -cf - |
        tar -C "$tree" -xf -
else
    (cd "$srcdir" && find . -mindepth 1 \( -path './.git' -o -path './build*' -o -path './packaging/out' \) -prune -o \( -type f -o -type l \) -print0) |
        tar -C "$srcdir" --null -T - -cf - |
        tar -C "$tree" -xf -
fi

# debian/ at the top; symbolic links (fieldhub.sysusers) become files.
rm -rf "$tree/debian"
cp -rL "$srcdir/packaging/debian" "$tree/debian"

if [ -n "$version" ]; then
    old=$(cat "$tree/debian/changelog")
    {
        printf 'fieldhub (%s) unstable; urgency=medium\n\n' "$version"
        printf '  * Build %s from packaging/build-deb.sh --version.\n\n' "$version"
        printf ' -- fieldhub maintainers <fieldhub@example.org>  %s\n\n' "$(date -R)"
        printf '%s\n' "$old"
    } > "$tree/debian/changelog"
fi

jobs=$(nproc 2>/dev/null || echo 1)
(
    cd "$tree"
    DEB_BUILD_OPTIONS="${DEB_BUILD_OPTIONS:-} parallel=$jobs" \
        dpkg-buildpackage -us -uc -b
) || { echo "build-deb.sh: dpkg-buildpackage failed" >&2; exit 1; }

mkdir -p "$outdir"
found=0
for f in "$tmp"/*.deb "$tmp"/*.buildinfo "$tmp"/*.changes; do
    [ -e "$f" ] || continue
    cp "$f" "$outdir/"
    case "$f" in *.deb) found=1; echo "build-deb.sh: $outdir/$(basename "$f")" ;; esac
done
[ "$found" = 1 ] || { echo "build-deb.sh: no .deb was produced" >&2; exit 1; }
