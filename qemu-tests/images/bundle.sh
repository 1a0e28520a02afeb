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
#   bundle.sh grow   version "<v>.3", its payload padded to about 1.5x the
#                    first (/opt/pad: a few large files, random and text, and
#                    thousands of small ones): the lifecycle scenario's slot must
#                    grow to hold it
#   bundle.sh huge   version "<v>.4", 1400 MiB of zeros as padding: more
#                    than the slot and its reserve hold (refused, the bundle is
#                    small)
#   bundle.sh scale  version "<v>.5", the field's size: padded with 1400 MiB
#                    of random data (32 MiB files), 1100 MiB of log-like text
#                    and 40000 small files, so about 1.8 GB compressed and
#                    3.3 GB unpacked (the scale scenario and the unpack bench)
set -euo pipefail
VARIANT="${1:-}"
case "$VARIANT" in "" | v2 | dracut | devicesfile | grow | huge | scale) ;; *) echo "unknown bundle variant $VARIANT" >&2; exit 2 ;; esac
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
# pad_tree DIR RANDOM_MIB TEXT_MIB SMALL_FILES: files of the shapes an
# appliance's OS image has beyond the base system (seeded, so a rebuild makes
# the same tree): RANDOM_MIB of incompressible data in 32 MiB files (firmware,
# compressed archives, JARs), TEXT_MIB of log-like text in 64 MiB files, and
# SMALL_FILES files of 1-16 KiB (scripts, configs, locale data) in 100 dirs.
pad_tree() {
    python3 - "$@" <<'PY'
import os, random, sys
d, rnd, text, small = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
r = random.Random(25)
os.makedirs(d, exist_ok=True)
M = 1 << 20
def chunks(total, size):
    n = 0
    while total > 0:
        yield n, min(size, total)
        total -= size
        n += 1
for n, mib in chunks(rnd, 32):
    with open(f"{d}/blob-{n:03}.bin", "wb") as f:
        for _ in range(mib):
            f.write(r.randbytes(M))
words = [b"request", b"handled", b"status=200", b"user", b"session", b"GET", b"/api/v1/items", b"cache", b"miss", b"hit"]
for n, mib in chunks(text, 64):
    with open(f"{d}/log-{n:03}.txt", "wb") as f:
        written, i = 0, 0
        while written < mib * M:
            line = b"2026-12-07T12:%02d:%02d app[%d]: %s %s in %d ms\n" % (i // 60 % 60, i % 60, r.randrange(1, 99999), r.choice(words), r.choice(words), r.randrange(1, 900))
            f.write(line)
            written += len(line)
            i += 1
for n in range(small):
    sub = f"{d}/small/{n % 100:02}"
    os.makedirs(sub, exist_ok=True)
    size = r.randrange(1024, 16384)
    body = b"".join(r.choice(words) + b" " for _ in range(size // 6))[:size]
    with open(f"{sub}/f{n:06}.conf", "wb") as f:
        f.write(body)
PY
}

if [ "$VARIANT" = grow ] || [ "$VARIANT" = huge ] || [ "$VARIANT" = scale ]; then
    ROOTFS="$DUALROOT_CACHE/bundles/.$VARIANT-root.$$"
    trap 'rm -rf "$ROOTFS"' EXIT
    cp -a "$TREE/root" "$ROOTFS"
    BASE_MIB=$(($(du -sm --apparent-size "$ROOTFS" | cut -f1)))
    if [ "$VARIANT" = grow ]; then
        VERSION="$VERSION.3"
        # Half the base again: a third random, the rest text and small files.
        PAD=$((BASE_MIB / 2))
        pad_tree "$ROOTFS/opt/pad" $((PAD / 3)) $((PAD / 2)) 6000
    elif [ "$VARIANT" = scale ]; then
        VERSION="$VERSION.5"
        pad_tree "$ROOTFS/opt/pad" 1400 1100 40000
    else
        VERSION="$VERSION.4"
        # Zeros: the refusal comes before the payload is read, so only the
        # manifest's size matters, and the bundle stays small.
        mkdir -p "$ROOTFS/opt/pad"
        for n in 0 1 2 3; do head -c $((350 << 20)) /dev/zero >"$ROOTFS/opt/pad/zero-$n.img"; done
    fi
    printf '%s\n' "$VERSION" >"$ROOTFS/etc/dualroot-test-version"
    log "$VARIANT: base tree $BASE_MIB MiB, padded to $(du -sm --apparent-size "$ROOTFS" | cut -f1) MiB"
fi
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
