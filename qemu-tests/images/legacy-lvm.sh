#!/bin/bash
# Legacy appliance with the CentOS 7 default layout, made from the legacy image
# (legacy.sh: same OS, accounts, keys, NICs): MBR label, XFS /boot on vda1, VG
# "centos" on vda2 holding an XFS root LV and a swap LV, fstab by /dev/mapper
# names, kernel line with rd.lvm.lv=, host-only dracut initramfs. The host has
# no device-mapper, so the layout is made inside a builder guest. Prints the
# cache directory holding
#   disk.raw      4 GiB sparse raw disk, GRUB installed, boots via SeaBIOS
#   vmlinuz, initrd.img   kernel and generic initramfs (the builder boots)
#   build-info    recipe hash and build timings
# Usage: legacy-lvm.sh [--print-dir]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DISK_MIB=4096
HASH="$(recipe_hash "$IMAGES_DIR/lib.sh" "$IMAGES_DIR/legacy.sh" "$IMAGES_DIR/legacy-lvm.sh")"
OUT="$DUALROOT_CACHE/legacy-lvm-$HASH"
if [ "${1:-}" = "--print-dir" ]; then echo "$OUT"; exit 0; fi
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
cat >"$MNT/usr/local/sbin/dualroot-lvm-build" <<'SCRIPT'
#!/bin/bash
# Runs in the builder guest: vdb gets the CentOS 7 default layout and a copy
# of this system.
set -euxo pipefail
D=/dev/vdb
T=/mnt/target
printf 'label: dos\nstart=2048, size=1048576, type=83, bootable\nstart=1050624, type=8e\n' | sfdisk -q "$D"
udevadm settle
mkfs.xfs -q -f "${D}1"
pvcreate -y "${D}2"
vgcreate centos "${D}2"
lvcreate -y -L 256M -n swap centos
lvcreate -y -l 100%FREE -n root centos
mkswap /dev/centos/swap
mkfs.xfs -q -f /dev/centos/root
mkdir -p "$T"
mount /dev/centos/root "$T"
mkdir -p "$T/boot"
mount "${D}1" "$T/boot"
cp -ax / "$T/"
rm -f "$T/usr/local/sbin/dualroot-lvm-build" "$T/etc/systemd/system/dualroot-lvm-build.service" \
      "$T/etc/systemd/system/multi-user.target.wants/dualroot-lvm-build.service"
BOOT_UUID="$(blkid -s UUID -o value "${D}1")"
cat >"$T/etc/fstab" <<FSTAB
/dev/mapper/centos-root / xfs defaults 0 0
UUID=$BOOT_UUID /boot xfs defaults 0 0
/dev/mapper/centos-swap swap swap defaults 0 0
LABEL=dualroot-payload /mnt/payload ext4 ro,nofail,x-systemd.device-timeout=3s 0 0
FSTAB
sed -i 's|^GRUB_CMDLINE_LINUX=.*|GRUB_CMDLINE_LINUX="rd.lvm.lv=centos/root rd.lvm.lv=centos/swap"|' "$T/etc/default/grub"
# The first boot of the new disk (legacy.sh's unit) installs GRUB and makes the
# host-only initramfs, now for an LVM/XFS root.
touch "$T/etc/dualroot-firstboot"
umount "$T/boot" "$T"
vgchange -an centos
sync
echo DUALROOT-LVM-BUILD-OK >/dev/ttyS0
SCRIPT
chmod 755 "$MNT/usr/local/sbin/dualroot-lvm-build"
cat >"$MNT/etc/systemd/system/dualroot-lvm-build.service" <<'UNIT'
[Unit]
Description=dualroot test image: lay out vdb like a CentOS 7 install
After=local-fs.target
ConditionKernelCommandLine=dualroot.build-lvm

[Service]
Type=oneshot
StandardOutput=journal+console
StandardError=journal+console
ExecStart=/usr/local/sbin/dualroot-lvm-build
ExecStopPost=/bin/systemctl poweroff --no-block

[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/dualroot-lvm-build.service \
    "$MNT/etc/systemd/system/multi-user.target.wants/dualroot-lvm-build.service"
umount "$MNT"
losetup -d "$LOOP"
LOOP=""
T1=$(date +%s)

log "builder boot: CentOS 7 layout on the new disk (TCG)"
timeout 900 qemu-system-x86_64 -accel tcg -m 1024 -smp 2 -cpu max \
    -display none -no-reboot -serial "file:$WORK/build.console" \
    -drive "file=$WORK/builder.raw,format=raw,if=virtio" \
    -drive "file=$WORK/disk.raw,format=raw,if=virtio" \
    -kernel "$SRC/vmlinuz" -initrd "$SRC/initrd.img" \
    -append "root=/dev/vda1 rw console=ttyS0 net.ifnames=0 panic=10 dualroot.build-lvm" \
    -nic none || true
grep -q DUALROOT-LVM-BUILD-OK "$WORK/build.console" \
    || { tail -n 60 "$WORK/build.console" >&2; die "the builder did not lay out the disk"; }
rm -f "$WORK/builder.raw"
T2=$(date +%s)

log "first boot of the LVM disk: GRUB and a host-only initramfs (TCG)"
cp "$SRC/vmlinuz" "$SRC/initrd.img" "$WORK/"
timeout 900 qemu-system-x86_64 -accel tcg -m 1024 -smp 2 -cpu max \
    -display none -no-reboot -serial "file:$WORK/firstboot.console" \
    -drive "file=$WORK/disk.raw,format=raw,if=virtio" \
    -kernel "$WORK/vmlinuz" -initrd "$WORK/initrd.img" \
    -append "root=/dev/mapper/centos-root rd.lvm.lv=centos/root rd.lvm.lv=centos/swap rw console=ttyS0 net.ifnames=0 panic=10" \
    -nic none || true
grep -q DUALROOT-FIRSTBOOT-OK "$WORK/firstboot.console" \
    || { tail -n 60 "$WORK/firstboot.console" >&2; die "first boot did not install GRUB"; }
T3=$(date +%s)

cat >"$WORK/build-info" <<INFO
recipe_hash=$HASH
layout=msdos, vda1 xfs /boot, vda2 PV of VG centos (root xfs, swap)
legacy=$SRC
prepare_s=$((T1 - T0))
builder_s=$((T2 - T1))
firstboot_s=$((T3 - T2))
total_s=$((T3 - T0))
INFO
rm -rf "$OUT"
mv "$WORK" "$OUT"
log "legacy-lvm image ready in $((T3 - T0)) s: $OUT"
echo "$OUT"
