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
#   bundle.sh devicesfile
#                    the new OS as a tree taken from an installed EL9 machine
#                    has it: /etc/lvm/devices/system.devices naming that
#                    machine's PV (not the appliance's) and use_devicesfile = 1
#                    in /etc/lvm/lvm.conf; version "<v>-devicesfile". Unless
#                    the migration rewrites the file, the new OS does not see
#                    VG VA. The foreign file is also kept next to the bundle,
#                    <bundle>.system.devices, for the scenario to compare.
set -euo pipefail
VARIANT="${1:-}"
case "$VARIANT" in "" | v2 | dracut | devicesfile) ;; *) echo "unknown bundle variant $VARIANT" >&2; exit 2 ;; esac
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

# The tree's recipe under its own lock: a test may be building it too.
TREE_RECIPE=newos.sh
[ "$VARIANT" = dracut ] && TREE_RECIPE=newos-dracut.sh
TREE="$(flock "$DUALROOT_CACHE/.$TREE_RECIPE.lock" bash "$IMAGES_DIR/$TREE_RECIPE" | tail -n1)"
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
DEVICES="$OUT.system.devices"
if [ -s "$OUT" ] && { [ "$VARIANT" != devicesfile ] || [ -s "$DEVICES" ]; }; then echo "$OUT"; exit 0; fi
mkdir -p "$DUALROOT_CACHE/bundles"
T0=$(date +%s)
ROOTFS="$TREE/root"
if [ "$VARIANT" = v2 ] || [ "$VARIANT" = devicesfile ]; then
    if [ "$VARIANT" = v2 ]; then VERSION="$VERSION.2"; else VERSION="$VERSION-devicesfile"; fi
    ROOTFS="$DUALROOT_CACHE/bundles/.$VARIANT-root.$$"
    trap 'rm -rf "$ROOTFS"' EXIT
    cp -a "$TREE/root" "$ROOTFS"
    printf '%s\n' "$VERSION" >"$ROOTFS/etc/dualroot-test-version"
fi
if [ "$VARIANT" = devicesfile ]; then
    # An EL9 devices file naming a PV of the machine the tree was taken from
    # (a SAN disk's WWID, /dev/sda2): the appliance has no such PV.
    PVID="$(head -c 1024 /dev/urandom | tr -dc 'A-Za-z0-9' | cut -c1-32)"
    [ "${#PVID}" = 32 ] || die "could not make a PVID"
    WWID="naa.6000c29$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' | cut -c1-25)"
    mkdir -p "$ROOTFS/etc/lvm/devices"
    cat >"$ROOTFS/etc/lvm/devices/system.devices" <<DEVICES
# LVM uses devices listed in this file.
# Created by LVM command vgimportdevices pid 1187 at Tue Jun  4 09:12:44 2024
VERSION=1.1.1
IDTYPE=sys_wwid IDNAME=$WWID DEVNAME=/dev/sda2 PVID=$PVID PART=2
DEVICES
    chmod 644 "$ROOTFS/etc/lvm/devices/system.devices"
    # use_devicesfile = 1 in the devices section, whatever the file said before
    CONF="$ROOTFS/etc/lvm/lvm.conf"
    grep -q '^devices {' "$CONF" || die "no devices section in $CONF"
    sed -i -e '/^[[:space:]]*use_devicesfile[[:space:]]*=/d' -e '/^devices {/a \	use_devicesfile = 1' "$CONF"
    if command -v lvmconfig >/dev/null; then
        LVM_SUPPRESS_FD_WARNINGS=1 LVM_SYSTEM_DIR="$ROOTFS/etc/lvm" lvmconfig devices/use_devicesfile | grep -qx 'use_devicesfile=1' \
            || die "use_devicesfile = 1 is not in effect in $CONF"
    fi
    cp "$ROOTFS/etc/lvm/devices/system.devices" "$DEVICES.partial"
    mv "$DEVICES.partial" "$DEVICES"
fi
"$BIN" bundle create --rootfs "$ROOTFS" --os-id debian --version "$VERSION" \
    --model va-7 --requires-cpu x86-64-v2 --key "$KEYS/test.key" \
    --out "$OUT.partial" >&2
mv "$OUT.partial" "$OUT"
# keep the two newest bundles of this variant (and their devices files)
ls -t "$DUALROOT_CACHE"/bundles/"$NAME"-*.bundle | tail -n +3 | while read -r old; do
    rm -f "$old" "$old.system.devices"
done
log "bundle ready in $(($(date +%s) - T0)) s: $OUT ($(du -h "$OUT" | cut -f1))"
echo "$OUT"
