#!/bin/bash
# Plain `debootstrap --variant=minbase trixie` tree at
# $DUALROOT_CACHE/trixie-minbase (input of a benchmark). An existing
# directory is left alone, whoever made it.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT="$DUALROOT_CACHE/trixie-minbase"
if [ -d "$OUT" ]; then echo "$OUT"; exit 0; fi
WORK="$DUALROOT_CACHE/trixie-minbase.build.$$"
mkdir -p "$DUALROOT_CACHE/debs/trixie"
T0=$(date +%s)
debootstrap --variant=minbase --cache-dir="$DUALROOT_CACHE/debs/trixie" \
    trixie "$WORK" "$DEBIAN_MIRROR" >"$WORK.log" 2>&1 \
    || { tail -n 30 "$WORK.log" >&2; rm -rf --one-file-system "$WORK"; die "debootstrap failed"; }
if [ -d "$OUT" ]; then
    log "$OUT appeared meanwhile; keeping it"
    rm -rf --one-file-system "$WORK"
else
    mv "$WORK" "$OUT"
fi
rm -f "$WORK.log"
log "trixie-minbase ready in $(($(date +%s) - T0)) s"
echo "$OUT"
