#!/bin/bash
# Signed bundle of the new OS tree (newos.sh), made with the workspace's
# `dualroot bundle create`, requiring x86-64-v2. Needs the binary:
#   cargo build -p initrd-tool --release   (or set DUALROOT_BIN)
# Keys live in $DUALROOT_CACHE/keys: test.key (+ .pub, also in keyring/),
# and wrong.key, a second key that is NOT in the keyring (refusal tests).
# Prints the bundle path; cached by tree recipe, binary and key.
#
#   bundle.sh        the new OS as built (migration target)
#   bundle.sh v2     the same OS with another version marker (version
#                    "<v>.2", /etc/dualroot-test-version "<v>.2"): the A/B
#                    upgrade scenarios install it into the inactive slot
#   bundle.sh dracut the new OS with dracut and a host-only initramfs made on
#                    the build machine (newos-dracut.sh): the slot_native
#                    scenarios prove it is rebuilt on the appliance
set -euo pipefail
VARIANT="${1:-}"
case "$VARIANT" in "" | v2 | dracut) ;; *) echo "unknown bundle variant $VARIANT" >&2; exit 2 ;; esac
source "$(dirname "$0")/lib.sh"

WS="$(cd "$IMAGES_DIR/../.." && pwd)"
BIN="${DUALROOT_BIN:-$WS/target/release/dualroot}"
[ -x "$BIN" ] || die "no dualroot binary at $BIN: run 'cargo build -p initrd-tool --release' or set DUALROOT_BIN"

KEYS="$DUALROOT_CACHE/keys"
mkdir -p "$KEYS/keyring"
for k in test wrong; do
    if [ ! -s "$KEYS/$k.key" ]; then
        rm -f "$KEYS/$k.key" "$KEYS/$k.key.pub"
        "$BIN" key generate --out "$KEYS/$k.key" --comment "dualroot-harness-$k" >&2
    fi
done
cp "$KEYS/test.key.pub" "$KEYS/keyring/test.pub"

if [ "$VARIANT" = dracut ]; then
    TREE="$(bash "$IMAGES_DIR/newos-dracut.sh" | tail -n1)"
else
    TREE="$(bash "$IMAGES_DIR/newos.sh" | tail -n1)"
fi
VERSION="$(sed -n 's/^test_version=//p' "$TREE/build-info")"
# Keyed by the bundle code's sources when present (the binary changes with
# every unrelated commit), else by the binary itself.
format_src() {
    local src="$WS/initrd-tool/src"
    if [ -d "$src/bundle" ]; then
        find "$src/bundle" "$src/keys.rs" -type f -name '*.rs' 2>/dev/null | sort | xargs cat
    else
        cat "$BIN"
    fi
}
HASH="$( { cat "$TREE/build-info" "$KEYS/test.key.pub" "$IMAGES_DIR/bundle.sh"; echo "$VARIANT"; format_src | sha256sum; } | sha256sum | cut -c1-16)"
NAME="newos${VARIANT}"
OUT="$DUALROOT_CACHE/bundles/$NAME-$HASH.bundle"
if [ -s "$OUT" ]; then echo "$OUT"; exit 0; fi
mkdir -p "$DUALROOT_CACHE/bundles"
T0=$(date +%s)
ROOTFS="$TREE/root"
if [ "$VARIANT" = v2 ]; then
    VERSION="$VERSION.2"
    ROOTFS="$DUALROOT_CACHE/bundles/.v2-root.$$"
    trap 'rm -rf "$ROOTFS"' EXIT
    cp -a "$TREE/root" "$ROOTFS"
    printf '%s\n' "$VERSION" >"$ROOTFS/etc/dualroot-test-version"
fi
"$BIN" bundle create --rootfs "$ROOTFS" --os-id debian --version "$VERSION" \
    --model va-7 --requires-cpu x86-64-v2 --key "$KEYS/test.key" \
    --out "$OUT.partial" >&2
mv "$OUT.partial" "$OUT"
# keep the two newest bundles of this variant
ls -t "$DUALROOT_CACHE"/bundles/"$NAME"-*.bundle | tail -n +3 | xargs -r rm -f
log "bundle ready in $(($(date +%s) - T0)) s: $OUT ($(du -h "$OUT" | cut -f1))"
echo "$OUT"
