#!/bin/bash
# Legacy appliances for the migration matrix (issue 21 item 6), made from the
# legacy image (legacy.sh: same OS, accounts, keys, NICs) by a builder guest that
# lays out the new disk (the host has no device-mapper), like legacy-lvm.sh. One
# recipe, variants by argument:
#
#   generic   6 GiB. MBR; ext4 /boot (500 MiB, vda1); VG "centos" on vda2 with
#             LVs swap (256 MiB), home (XFS, 256 MiB: the old /home plus
#             /home/admin/matrix/, a few MiB of random binary and many small
#             files, their sha256 list in /var/lib/matrix-home.sha256 on the
#             root, outside /home) and root (XFS, the rest); fstab by UUID for
#             /, /boot, /home and the swap; dracut generic (hostonly="no"), the
#             initramfs made on the first boot is checked to be generic.
#   hostonly  4 GiB. legacy-lvm.sh's layout (XFS /boot on vda1, VG "centos" with
#             XFS root and swap LVs, fstab by /dev/mapper names, host-only
#             dracut, no separate /home) plus, in /etc/lvm/lvm.conf's devices
#             section, global_filter = [ "a|^/dev/vda2$|", "r|.*|" ]: only the
#             old PV is accepted, and the host-only initramfs carries that file.
#
# Both put rd.lvm.lv=centos/root rd.lvm.lv=centos/swap on the kernel line, as
# CentOS 7 does. Prints the cache directory holding
#   disk.raw      sparse raw disk, GRUB installed, boots via SeaBIOS
#   vmlinuz, initrd.img   kernel and generic initramfs (the builder boots)
#   build-info    recipe hash, variant, timings, facts about the initramfs
# Usage: legacy-matrix.sh VARIANT [--print-dir]
set -euo pipefail
VARIANT="${1:-}"
case "$VARIANT" in
    generic) DISK_MIB=6144 ;;
    hostonly) DISK_MIB=4096 ;;
    *) echo "usage: legacy-matrix.sh generic|hostonly [--print-dir]" >&2; exit 2 ;;
esac
source "$(dirname "$0")/lib.sh"

HASH="$(recipe_hash "$IMAGES_DIR/lib.sh" "$IMAGES_DIR/legacy.sh" "$IMAGES_DIR/legacy-matrix.sh")"
OUT="$DUALROOT_CACHE/legacy-matrix-$VARIANT-$HASH"
if [ "${2:-}" = "--print-dir" ]; then echo "$OUT"; exit 0; fi
if [ -s "$OUT/disk.raw" ] && [ -s "$OUT/build-info" ]; then echo "$OUT"; exit 0; fi

# legacy.sh under its own lock: a test or another recipe may be building it.
SRC="$(flock "$DUALROOT_CACHE/.legacy.sh.lock" bash "$IMAGES_DIR/legacy.sh" | tail -n1)"
[ -s "$SRC/disk.raw" ] || die "legacy.sh gave no disk"
WORK="$OUT.partial"
MNT="$WORK/mnt"
LOOP=""
cleanup() {
    mountpoint -q "$MNT" 2>/dev/null && umount "$MNT"
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
    true
}
trap cleanup EXIT
rm -rf "$WORK"
mkdir -p "$WORK" "$MNT"
T0=$(date +%s)

# The builder: the legacy disk (a copy) with a one-shot unit that lays out vdb.
cp --sparse=always "$SRC/disk.raw" "$WORK/builder.raw"
truncate -s "${DISK_MIB}M" "$WORK/disk.raw"
LOOP="$(losetup -f --show -o $((2048 * 512)) "$WORK/builder.raw")"
mount "$LOOP" "$MNT"
{
    echo '#!/bin/bash'
    echo "VARIANT=$VARIANT"
    cat <<'SCRIPT'
# Runs in the builder guest: vdb gets the variant's layout and a copy of this
# system, configured for the variant.
set -euxo pipefail
D=/dev/vdb
T=/mnt/target
if [ "$VARIANT" = generic ]; then
    # /boot 500 MiB
    printf 'label: dos\nstart=2048, size=1024000, type=83, bootable\nstart=1026048, type=8e\n' | sfdisk -q "$D"
else
    printf 'label: dos\nstart=2048, size=1048576, type=83, bootable\nstart=1050624, type=8e\n' | sfdisk -q "$D"
fi
udevadm settle
if [ "$VARIANT" = generic ]; then
    mkfs.ext4 -q -F "${D}1"
    BOOT_FS=ext4
else
    mkfs.xfs -q -f "${D}1"
    BOOT_FS=xfs
fi
pvcreate -y "${D}2"
vgcreate centos "${D}2"
lvcreate -y -L 256M -n swap centos
[ "$VARIANT" = generic ] && lvcreate -y -L 256M -n home centos
lvcreate -y -l 100%FREE -n root centos
mkswap /dev/centos/swap
mkfs.xfs -q -f /dev/centos/root
[ "$VARIANT" = generic ] && mkfs.xfs -q -f /dev/centos/home
mkdir -p "$T"
mount /dev/centos/root "$T"
mkdir -p "$T/boot" "$T/home"
mount "${D}1" "$T/boot"
[ "$VARIANT" = generic ] && mount /dev/centos/home "$T/home"
cp -ax / "$T/"
rm -f "$T/usr/local/sbin/dualroot-matrix-build" "$T/etc/systemd/system/dualroot-matrix-build.service" \
      "$T/etc/systemd/system/multi-user.target.wants/dualroot-matrix-build.service"

BOOT_UUID="$(blkid -s UUID -o value "${D}1")"
if [ "$VARIANT" = generic ]; then
    # Files on the /home LV that must arrive on the new OS: random binary files
    # of odd sizes, many small ones in nested directories, an empty one, a name
    # with spaces. Their hashes stay on the root (not in /home, not carried).
    M="$T/home/admin/matrix"
    mkdir -p "$M/bin"
    for i in 1 2 3 4; do
        head -c $((i * 393216 + i * 4099)) /dev/urandom >"$M/bin/blob-$i.bin"
    done
    for d in $(seq -w 1 16); do
        mkdir -p "$M/docs/d$d"
        for f in $(seq -w 1 24); do
            printf 'matrix file %s/%s %s\n' "$d" "$f" "$(head -c 48 /dev/urandom | base64 -w0)" \
                >"$M/docs/d$d/f$f.txt"
        done
    done
    : >"$M/docs/empty.txt"
    echo "a name with spaces" >"$M/docs/name with spaces.txt"
    chown -R 1000:1000 "$M"
    (cd "$T" && find home/admin/matrix -type f -print0 | sort -z | xargs -0 sha256sum) \
        | sed 's|^\([0-9a-f]\{64\}\)  home/|\1  /home/|' >"$T/var/lib/matrix-home.sha256"
    test "$(wc -l <"$T/var/lib/matrix-home.sha256")" -gt 300
    ROOT_UUID="$(blkid -s UUID -o value /dev/centos/root)"
    HOME_UUID="$(blkid -s UUID -o value /dev/centos/home)"
    SWAP_UUID="$(blkid -s UUID -o value /dev/centos/swap)"
    cat >"$T/etc/fstab" <<FSTAB
UUID=$ROOT_UUID / xfs defaults 0 0
UUID=$BOOT_UUID /boot $BOOT_FS defaults 1 2
UUID=$HOME_UUID /home xfs defaults 0 0
UUID=$SWAP_UUID swap swap defaults 0 0
LABEL=dualroot-payload /mnt/payload ext4 ro,nofail,x-systemd.device-timeout=3s 0 0
FSTAB
    # An image meant for several hypervisors: a generic initramfs, kept so.
    rm -f "$T/etc/dracut.conf.d/10-hostonly.conf"
    echo 'hostonly="no"' >"$T/etc/dracut.conf.d/10-generic.conf"
else
    cat >"$T/etc/fstab" <<FSTAB
/dev/mapper/centos-root / xfs defaults 0 0
UUID=$BOOT_UUID /boot $BOOT_FS defaults 0 0
/dev/mapper/centos-swap swap swap defaults 0 0
LABEL=dualroot-payload /mnt/payload ext4 ro,nofail,x-systemd.device-timeout=3s 0 0
FSTAB
    rm -f "$T/etc/dracut.conf.d/10-generic.conf"
    echo 'hostonly="yes"' >"$T/etc/dracut.conf.d/10-hostonly.conf"
    # Only the old PV is accepted: a new PV (vda3 after the migration's GPT) is
    # hidden from any lvm that reads this file.
    sed -i '/^devices {/a global_filter = [ "a|^/dev/vda2$|", "r|.*|" ]' "$T/etc/lvm/lvm.conf"
    LVM_SYSTEM_DIR="$T/etc/lvm" lvmconfig devices/global_filter | grep -F 'a|^/dev/vda2$|'
fi
sed -i 's|^GRUB_CMDLINE_LINUX=.*|GRUB_CMDLINE_LINUX="rd.lvm.lv=centos/root rd.lvm.lv=centos/swap"|' "$T/etc/default/grub"

# The first boot of the new disk: GRUB, the initramfs in the variant's dracut
# mode (legacy.sh's first boot would switch to host-only), and a check of it.
cat >"$T/usr/local/sbin/dualroot-firstboot" <<FIRSTBOOT
#!/bin/sh
VARIANT=$VARIANT
FIRSTBOOT
cat >>"$T/usr/local/sbin/dualroot-firstboot" <<'FIRSTBOOT'
KVER="$(uname -r)"
IMG="/boot/initrd.img-$KVER"
fail() {
    echo "DUALROOT-FIRSTBOOT-FAILED: $*" >/dev/ttyS0
    systemctl poweroff --no-block
    exit 1
}
grub-install /dev/vda || fail "grub-install"
dracut -f "$IMG" "$KVER" || fail "dracut"
update-grub || fail "update-grub"
LIST="$(lsinitrd "$IMG")" || fail "lsinitrd"
LVMCONF="$(lsinitrd -f etc/lvm/lvm.conf "$IMG" 2>/dev/null)"
KOS="$(printf '%s\n' "$LIST" | grep -c '\.ko')"
case "$VARIANT" in
    generic)
        grep -qx 'hostonly="no"' /etc/dracut.conf.d/10-generic.conf || fail "dracut.conf.d is not generic"
        ! ls /etc/dracut.conf.d/ | grep -q hostonly || fail "a host-only dracut.conf.d file is left"
        # The guest has no NVMe controller: only a generic image carries nvme.ko
        # (not ahci.ko: dracut's qemu module adds that one to host-only images too).
        printf '%s\n' "$LIST" | grep -q '/nvme\.ko' || fail "the initramfs is not generic (no nvme.ko)"
        ;;
    hostonly)
        ! printf '%s\n' "$LIST" | grep -q '/nvme\.ko' || fail "the initramfs is not host-only (nvme.ko)"
        printf '%s\n' "$LVMCONF" | grep -E '^[[:space:]]*global_filter[[:space:]]*=' | grep -qF 'a|^/dev/vda2$|' \
            || fail "the initramfs's lvm.conf lacks the global_filter"
        lvmconfig devices/global_filter | grep -qF 'a|^/dev/vda2$|' || fail "lvm does not use the global_filter"
        ;;
esac
LOCKING="$(printf '%s\n' "$LVMCONF" | sed -n 's/^[[:space:]]*locking_type[[:space:]]*=[[:space:]]*\([0-9]*\).*/\1/p' | head -n1)"
# set (not commented) global_filter lines
FILTER="$(printf '%s\n' "$LVMCONF" | grep -cE '^[[:space:]]*global_filter[[:space:]]*=')"
echo "DUALROOT-MATRIX-FACTS initramfs_kib=$(($(stat -c %s "$IMG") / 1024)) initramfs_modules=$KOS initramfs_lvm_locking_type=${LOCKING:-unset} initramfs_global_filter_lines=$FILTER" >/dev/ttyS0
rm -f /etc/dualroot-firstboot
sync
echo "DUALROOT-FIRSTBOOT-OK" >/dev/ttyS0
systemctl poweroff --no-block
FIRSTBOOT
chmod 755 "$T/usr/local/sbin/dualroot-firstboot"
touch "$T/etc/dualroot-firstboot"
sync
[ "$VARIANT" = generic ] && umount "$T/home"
umount "$T/boot" "$T"
vgchange -an centos
sync
echo DUALROOT-MATRIX-BUILD-OK >/dev/ttyS0
SCRIPT
} >"$MNT/usr/local/sbin/dualroot-matrix-build"
chmod 755 "$MNT/usr/local/sbin/dualroot-matrix-build"
cat >"$MNT/etc/systemd/system/dualroot-matrix-build.service" <<'UNIT'
[Unit]
Description=dualroot test image: lay out vdb for a matrix appliance
After=local-fs.target
ConditionKernelCommandLine=dualroot.build-matrix

[Service]
Type=oneshot
StandardOutput=journal+console
StandardError=journal+console
ExecStart=/usr/local/sbin/dualroot-matrix-build
ExecStopPost=/bin/systemctl poweroff --no-block

[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/dualroot-matrix-build.service \
    "$MNT/etc/systemd/system/multi-user.target.wants/dualroot-matrix-build.service"
umount "$MNT"
losetup -d "$LOOP"
LOOP=""
rmdir "$MNT"
T1=$(date +%s)

log "builder boot: $VARIANT layout on the new disk (TCG)"
timeout 900 qemu-system-x86_64 -accel tcg -m 1024 -smp 2 -cpu max \
    -display none -no-reboot -serial "file:$WORK/build.console" \
    -drive "file=$WORK/builder.raw,format=raw,if=virtio" \
    -drive "file=$WORK/disk.raw,format=raw,if=virtio" \
    -kernel "$SRC/vmlinuz" -initrd "$SRC/initrd.img" \
    -append "root=/dev/vda1 rw console=ttyS0 net.ifnames=0 panic=10 dualroot.build-matrix" \
    -nic none || true
grep -q DUALROOT-MATRIX-BUILD-OK "$WORK/build.console" \
    || { tail -n 60 "$WORK/build.console" >&2; die "the builder did not lay out the disk"; }
rm -f "$WORK/builder.raw"
T2=$(date +%s)

# A generic dracut run under TCG takes minutes more than a host-only one.
log "first boot of the $VARIANT disk: GRUB and the initramfs (TCG)"
cp "$SRC/vmlinuz" "$SRC/initrd.img" "$WORK/"
timeout 1500 qemu-system-x86_64 -accel tcg -m 1024 -smp 2 -cpu max \
    -display none -no-reboot -serial "file:$WORK/firstboot.console" \
    -drive "file=$WORK/disk.raw,format=raw,if=virtio" \
    -kernel "$WORK/vmlinuz" -initrd "$WORK/initrd.img" \
    -append "root=/dev/mapper/centos-root rd.lvm.lv=centos/root rd.lvm.lv=centos/swap rw console=ttyS0 net.ifnames=0 panic=10" \
    -nic none || true
grep -q DUALROOT-FIRSTBOOT-OK "$WORK/firstboot.console" \
    || { tail -n 60 "$WORK/firstboot.console" >&2; die "first boot did not install GRUB or made the wrong initramfs"; }
FACTS="$(tr -d '\r' <"$WORK/firstboot.console" | sed -n 's/.*DUALROOT-MATRIX-FACTS //p' | tail -n1)"
T3=$(date +%s)

if [ "$VARIANT" = generic ]; then
    LAYOUT="msdos, vda1 ext4 /boot (500 MiB), vda2 PV of VG centos (root xfs, home xfs, swap), fstab by UUID, dracut generic"
else
    LAYOUT="msdos, vda1 xfs /boot, vda2 PV of VG centos (root xfs, swap), fstab by /dev/mapper names, dracut host-only, lvm global_filter accepting only /dev/vda2"
fi
{
    echo "recipe_hash=$HASH"
    echo "variant=$VARIANT"
    echo "disk_mib=$DISK_MIB"
    echo "layout=$LAYOUT"
    echo "legacy=$SRC"
    for f in $FACTS; do echo "$f"; done
    echo "prepare_s=$((T1 - T0))"
    echo "builder_s=$((T2 - T1))"
    echo "firstboot_s=$((T3 - T2))"
    echo "total_s=$((T3 - T0))"
} >"$WORK/build-info"
rm -rf "$OUT"
mv "$WORK" "$OUT"
log "legacy-matrix $VARIANT image ready in $((T3 - T0)) s: $OUT"
echo "$OUT"
