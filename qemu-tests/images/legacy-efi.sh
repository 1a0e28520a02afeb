#!/bin/bash
# Legacy appliance installed on UEFI firmware, the way a CentOS 7 EFI install
# lays out its disk, made from the legacy image (legacy.sh: same OS, accounts,
# keys, NICs): GPT; vda1 the EFI System Partition (vfat, 200 MiB, /boot/efi),
# vda2 XFS /boot, vda3 the PV of VG "centos" with an XFS root LV and a swap LV;
# fstab by /dev/mapper names and UUIDs; rd.lvm.lv= on the kernel line; host-only
# dracut. The boot chain is the distribution's signed one: shim-signed and
# grub-efi-amd64-signed in \EFI\debian\ (Microsoft-signed shim, Debian-signed
# GRUB and kernel, so the same disk boots with Secure Boot enforcing), plus the
# removable path \EFI\BOOT\BOOTX64.EFI, as the shim package of EL7 installs it.
#
# The EFI packages are installed on the host, in a chroot of a copy of the legacy
# disk (the guests have no network); a builder guest (the host has no
# device-mapper) lays out the new disk and copies the system onto it; the first
# boot, under OVMF with NVRAM in vars.fd, runs grub-install (which registers
# the "debian" boot entry in that NVRAM) and makes the host-only initramfs.
# Prints the cache directory holding
#   disk.raw      sparse raw disk, boots under OVMF
#   vars.fd       the appliance's NVRAM (OVMF_VARS_4M.fd plus its boot entry)
#   build-info    recipe hash and build timings
# Usage: legacy-efi.sh [--print-dir]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DISK_MIB=5120
OVMF_CODE=/usr/share/OVMF/OVMF_CODE_4M.fd
OVMF_VARS=/usr/share/OVMF/OVMF_VARS_4M.fd
HASH="$(recipe_hash "$IMAGES_DIR/lib.sh" "$IMAGES_DIR/legacy.sh" "$IMAGES_DIR/legacy-efi.sh")"
OUT="$DUALROOT_CACHE/legacy-efi-$HASH"
if [ "${1:-}" = "--print-dir" ]; then echo "$OUT"; exit 0; fi
if [ -s "$OUT/disk.raw" ] && [ -s "$OUT/vars.fd" ] && [ -s "$OUT/build-info" ]; then echo "$OUT"; exit 0; fi
[ -s "$OVMF_CODE" ] && [ -s "$OVMF_VARS" ] || die "no OVMF firmware at $OVMF_CODE: apt-get install ovmf"

SRC="$(flock "$DUALROOT_CACHE/.legacy.sh.lock" bash "$IMAGES_DIR/legacy.sh" | tail -n1)"
[ -s "$SRC/disk.raw" ] || die "legacy.sh gave no disk"
WORK="$OUT.partial"
MNT="$WORK/mnt"
LOOP=""
cleanup() {
    chroot_umount
    mountpoint -q "$MNT" 2>/dev/null && umount "$MNT"
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
    true
}
trap cleanup EXIT
rm -rf "$WORK"
mkdir -p "$WORK" "$MNT"
T0=$(date +%s)

cp --sparse=always "$SRC/disk.raw" "$WORK/builder.raw"
truncate -s "${DISK_MIB}M" "$WORK/disk.raw"
LOOP="$(losetup -f --show -o $((2048 * 512)) "$WORK/builder.raw")"
mount "$LOOP" "$MNT"

log "apt-get install of the EFI boot chain in a chroot of the legacy system"
chroot_mount "$MNT" "$DUALROOT_CACHE/debs/bullseye"
# grub-efi-amd64 replaces grub-pc (they conflict); its postinst must not try to
# install GRUB into the build host.
echo 'grub-efi-amd64 grub2/update_nvram boolean false' | in_chroot "$MNT" debconf-set-selections
echo 'grub-efi-amd64 grub2/force_efi_extra_removable boolean true' | in_chroot "$MNT" debconf-set-selections
in_chroot "$MNT" apt-get update >"$WORK/apt.log" 2>&1 \
    || { tail -n 20 "$WORK/apt.log" >&2; die "apt-get update in the chroot failed"; }
in_chroot "$MNT" apt-get install -y --no-install-recommends \
    grub-efi-amd64 grub-efi-amd64-signed shim-signed efibootmgr mokutil dosfstools >>"$WORK/apt.log" 2>&1 \
    || { tail -n 40 "$WORK/apt.log" >&2; die "apt-get install of the EFI packages failed"; }
[ -s "$MNT/usr/lib/shim/shimx64.efi.signed" ] || die "shim-signed gave no shimx64.efi.signed"
chroot_umount
rm -f "$MNT/usr/sbin/policy-rc.d"
T1=$(date +%s)

cat >"$MNT/usr/local/sbin/dualroot-efi-build" <<'SCRIPT'
#!/bin/bash
# Runs in the builder guest: vdb gets the CentOS 7 EFI layout and a copy of
# this system.
set -euxo pipefail
D=/dev/vdb
T=/mnt/target
sfdisk -q "$D" <<'GPT'
label: gpt
start=2048, size=409600, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI System Partition"
size=1048576, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4
type=E6D6D379-F507-44C2-A23C-238F2A3DF928
GPT
udevadm settle
mkfs.vfat -n ESP "${D}1"
mkfs.xfs -q -f "${D}2"
pvcreate -y "${D}3"
vgcreate centos "${D}3"
lvcreate -y -L 256M -n swap centos
lvcreate -y -l 100%FREE -n root centos
mkswap /dev/centos/swap
mkfs.xfs -q -f /dev/centos/root
mkdir -p "$T"
mount /dev/centos/root "$T"
mkdir -p "$T/boot"
mount "${D}2" "$T/boot"
cp -ax / "$T/"
mkdir -p "$T/boot/efi"
rm -f "$T/usr/local/sbin/dualroot-efi-build" "$T/etc/systemd/system/dualroot-efi-build.service" \
      "$T/etc/systemd/system/multi-user.target.wants/dualroot-efi-build.service"
BOOT_UUID="$(blkid -s UUID -o value "${D}2")"
ESP_UUID="$(blkid -s UUID -o value "${D}1")"
cat >"$T/etc/fstab" <<FSTAB
/dev/mapper/centos-root / xfs defaults 0 0
UUID=$BOOT_UUID /boot xfs defaults 0 0
UUID=$ESP_UUID /boot/efi vfat umask=0077,shortname=winnt 0 0
/dev/mapper/centos-swap swap swap defaults 0 0
LABEL=dualroot-payload /mnt/payload ext4 ro,nofail,x-systemd.device-timeout=3s 0 0
FSTAB
sed -i 's|^GRUB_CMDLINE_LINUX=.*|GRUB_CMDLINE_LINUX="rd.lvm.lv=centos/root rd.lvm.lv=centos/swap"|' "$T/etc/default/grub"
# The first boot (under OVMF) installs the signed chain into the ESP, with an
# NVRAM entry, and makes the host-only initramfs.
cat >"$T/usr/local/sbin/dualroot-firstboot" <<'FIRSTBOOT'
#!/bin/sh
rm -f /etc/dracut.conf.d/10-generic.conf
echo 'hostonly="yes"' >/etc/dracut.conf.d/10-hostonly.conf
if [ -d /sys/firmware/efi ] \
    && grub-install --target=x86_64-efi --efi-directory=/boot/efi --bootloader-id=debian \
        --uefi-secure-boot --force-extra-removable \
    && dracut -f "/boot/initrd.img-$(uname -r)" "$(uname -r)" && update-grub \
    && [ -s /boot/efi/EFI/debian/shimx64.efi ] && [ -s /boot/efi/EFI/BOOT/BOOTX64.EFI ] \
    && efibootmgr | grep -q debian; then
    efibootmgr -v >/dev/ttyS0 2>&1 || true
    rm -f /etc/dualroot-firstboot
    sync
    echo "DUALROOT-FIRSTBOOT-OK" >/dev/ttyS0
else
    echo "DUALROOT-FIRSTBOOT-FAILED" >/dev/ttyS0
fi
systemctl poweroff --no-block
FIRSTBOOT
chmod 755 "$T/usr/local/sbin/dualroot-firstboot"
touch "$T/etc/dualroot-firstboot"
umount "$T/boot" "$T"
vgchange -an centos
sync
echo DUALROOT-EFI-BUILD-OK >/dev/ttyS0
SCRIPT
chmod 755 "$MNT/usr/local/sbin/dualroot-efi-build"
cat >"$MNT/etc/systemd/system/dualroot-efi-build.service" <<'UNIT'
[Unit]
Description=dualroot test image: lay out vdb like a CentOS 7 EFI install
After=local-fs.target
ConditionKernelCommandLine=dualroot.build-efi

[Service]
Type=oneshot
StandardOutput=journal+console
StandardError=journal+console
ExecStart=/usr/local/sbin/dualroot-efi-build
ExecStopPost=/bin/systemctl poweroff --no-block

[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/dualroot-efi-build.service \
    "$MNT/etc/systemd/system/multi-user.target.wants/dualroot-efi-build.service"
umount "$MNT"
losetup -d "$LOOP"
LOOP=""

log "builder boot: CentOS 7 EFI layout on the new disk (TCG)"
timeout 900 qemu-system-x86_64 -accel tcg -m 1024 -smp 2 -cpu max \
    -display none -no-reboot -serial "file:$WORK/build.console" \
    -drive "file=$WORK/builder.raw,format=raw,if=virtio" \
    -drive "file=$WORK/disk.raw,format=raw,if=virtio" \
    -kernel "$SRC/vmlinuz" -initrd "$SRC/initrd.img" \
    -append "root=/dev/vda1 rw console=ttyS0 net.ifnames=0 panic=10 dualroot.build-efi" \
    -nic none || true
grep -q DUALROOT-EFI-BUILD-OK "$WORK/build.console" \
    || { tail -n 60 "$WORK/build.console" >&2; die "the builder did not lay out the disk"; }
rm -f "$WORK/builder.raw"
T2=$(date +%s)

log "first boot under OVMF: signed GRUB into the ESP, NVRAM entry, host-only initramfs (TCG)"
cp "$OVMF_VARS" "$WORK/vars.fd"
timeout 1200 qemu-system-x86_64 -accel tcg -machine q35 -m 1024 -smp 2 -cpu max \
    -display none -no-reboot -serial "file:$WORK/firstboot.console" \
    -drive "if=pflash,format=raw,unit=0,readonly=on,file=$OVMF_CODE" \
    -drive "if=pflash,format=raw,unit=1,file=$WORK/vars.fd" \
    -drive "file=$WORK/disk.raw,format=raw,if=virtio" \
    -kernel "$SRC/vmlinuz" -initrd "$SRC/initrd.img" \
    -append "root=/dev/mapper/centos-root rd.lvm.lv=centos/root rd.lvm.lv=centos/swap rw console=ttyS0 net.ifnames=0 panic=10" \
    -nic none || true
grep -q DUALROOT-FIRSTBOOT-OK "$WORK/firstboot.console" \
    || { tail -n 60 "$WORK/firstboot.console" >&2; die "first boot did not install the EFI boot chain"; }
T3=$(date +%s)

cat >"$WORK/build-info" <<INFO
recipe_hash=$HASH
layout=gpt, vda1 ESP vfat /boot/efi, vda2 xfs /boot, vda3 PV of VG centos (root xfs, swap)
chain=shim-signed + grub-efi-amd64-signed in EFI/debian and EFI/BOOT
legacy=$SRC
apt_s=$((T1 - T0))
builder_s=$((T2 - T1))
firstboot_s=$((T3 - T2))
total_s=$((T3 - T0))
INFO
rm -rf "$OUT"
mv "$WORK" "$OUT"
log "legacy-efi image ready in $((T3 - T0)) s: $OUT"
echo "$OUT"
