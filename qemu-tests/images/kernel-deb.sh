#!/bin/bash
# A second kernel package for the new OS (Debian 13): the `cloud` flavour,
# whose version string differs from the installed generic kernel's, so an
# in-slot kernel update is visible (`uname -r`, `slot status`). Downloaded with
# the host's apt pointed at trixie (the guests have no network). Prints the
# .deb path; cached under $DUALROOT_CACHE/debs/extra.
# Usage: kernel-deb.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

OUT_DIR="$DUALROOT_CACHE/debs/extra"
mkdir -p "$OUT_DIR"
found="$(ls "$OUT_DIR"/linux-image-*-cloud-amd64_*.deb 2>/dev/null | grep -v -- '-dbg' | sort -V | tail -n1 || true)"
if [ -n "$found" ]; then echo "$found"; exit 0; fi

APT="$OUT_DIR/.apt"
rm -rf "$APT"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial"
echo "deb $DEBIAN_MIRROR trixie main" >"$APT/sources.list"
opts=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache"
      -o "APT::Architecture=amd64" -o "Acquire::Languages=none" -q)
apt-get "${opts[@]}" update >"$APT/update.log" 2>&1 \
    || { tail -n 20 "$APT/update.log" >&2; die "apt-get update (trixie) failed"; }
# The versioned package the metapackage points at (e.g. linux-image-6.12.57+deb13-cloud-amd64).
pkg="$(apt-cache "${opts[@]}" depends linux-image-cloud-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1)"
[ -n "$pkg" ] || die "no versioned linux-image-*-cloud-amd64 in trixie"
(cd "$OUT_DIR" && apt-get "${opts[@]}" download "$pkg" >"$APT/download.log" 2>&1) \
    || { tail -n 20 "$APT/download.log" >&2; die "apt-get download $pkg failed"; }
rm -rf "$APT"
found="$(ls "$OUT_DIR"/"$pkg"_*.deb | tail -n1)"
log "kernel package ready: $found"
echo "$found"
