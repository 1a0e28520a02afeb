#!/bin/bash
# New OS tree with dracut instead of initramfs-tools (EL9's way): the newos.sh
# tree, dracut installed, and a HOST-ONLY initramfs made in the image-build
# chroot, as an EL9 build machine makes it. That image describes the build host
# (its root device, its drivers), so a slot booting it as shipped would never
# find VA: the migration and `slot install` must rebuild it on the appliance.
# Prints the cache directory holding
#   root/         the tree, ready for `dualroot bundle create`
#   build-info    recipe hash, kernel, test version and build timings
# Usage: newos-dracut.sh [--print-dir]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SUITE=trixie
HASH="$(recipe_hash "$IMAGES_DIR/lib.sh" "$IMAGES_DIR/newos.sh" "$IMAGES_DIR/newos-dracut.sh")"
OUT="$DUALROOT_CACHE/newos-dracut-$SUITE-$HASH"
if [ "${1:-}" = "--print-dir" ]; then echo "$OUT"; exit 0; fi
if [ -d "$OUT/root/etc" ] && [ -s "$OUT/build-info" ]; then echo "$OUT"; exit 0; fi

# newos.sh under its own lock: a test or another recipe may be building it.
BASE="$(flock "$DUALROOT_CACHE/.newos.sh.lock" bash "$IMAGES_DIR/newos.sh" | tail -n1)"
WORK="$OUT.partial"
ROOT="$WORK/root"
trap 'chroot_umount' EXIT
chroot_umount
safe_rm_tree "$WORK"
mkdir -p "$WORK"
T0=$(date +%s)
cp -a "$BASE/root" "$ROOT"

chroot_mount "$ROOT" "$DUALROOT_CACHE/debs/$SUITE"
log "replacing initramfs-tools with dracut in the chroot"
{ in_chroot "$ROOT" apt-get update -q && in_chroot "$ROOT" apt-get install -y --no-install-recommends \
    dracut initramfs-tools-; } >"$WORK/apt.log" 2>&1 \
    || { tail -n 40 "$WORK/apt.log" >&2; die "installing dracut failed"; }
KVER="$(basename "$(ls -d "$ROOT"/lib/modules/* | sort -V | tail -n1)")"
rm -f "$ROOT"/boot/initrd.img-*
log "host-only initramfs of $KVER made in the build chroot"
# Host-only on a build machine whose root is not on LVM: no lvm module (said
# explicitly, since this chroot's host-only probing cannot see the build
# machine's devices the way an EL9 build host's dracut does).
in_chroot "$ROOT" dracut --force --hostonly --hostonly-cmdline --omit lvm --kver "$KVER" \
    "/boot/initrd.img-$KVER" >"$WORK/dracut.log" 2>&1 \
    || { tail -n 30 "$WORK/dracut.log" >&2; die "dracut failed"; }
[ -s "$ROOT/boot/initrd.img-$KVER" ] || die "no initramfs for $KVER"
printf '%s\n' "$(cat "$ROOT/etc/dualroot-test-version")-dracut" >"$ROOT/etc/dualroot-test-version"
chroot_umount
rm -f "$ROOT/usr/sbin/policy-rc.d"
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/log/*.log
T1=$(date +%s)

cat >"$WORK/build-info" <<INFO
recipe_hash=$HASH
suite=$SUITE
kernel=$KVER
test_version=$(cat "$ROOT/etc/dualroot-test-version")
initramfs=dracut host-only (build chroot)
initramfs_kib=$(du -k "$ROOT/boot/initrd.img-$KVER" | cut -f1)
total_s=$((T1 - T0))
INFO
rm -rf "$OUT"
mv "$WORK" "$OUT"
log "new OS tree with dracut ready in $((T1 - T0)) s: $OUT"
echo "$OUT"
