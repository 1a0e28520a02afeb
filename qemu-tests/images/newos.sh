#!/bin/bash
# New OS tree: Debian 13 (trixie) with kernel, GRUB for BIOS and for UEFI (the
# Debian-signed GRUB and the Microsoft-signed shim beside grub-pc, as an image
# meant for both firmwares ships them), lvm2, OpenSSH,
# initramfs-tools (with lvm2 its initramfs mounts a root on LVM). `admin`
# has UID 1001 and another group layout than on the legacy image. Prints
# the cache directory holding
#   root/         the tree, owned by root, ready for `dualroot bundle create`
#   build-info    recipe hash and build timings
# Usage: newos.sh [--print-dir]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SUITE=trixie
TEST_VERSION="13.0-test.1"
HASH="$(recipe_hash "$IMAGES_DIR/lib.sh" "$IMAGES_DIR/newos.sh")"
OUT="$DUALROOT_CACHE/newos-$SUITE-$HASH"
if [ "${1:-}" = "--print-dir" ]; then echo "$OUT"; exit 0; fi
if [ -d "$OUT/root/etc" ] && [ -s "$OUT/build-info" ]; then echo "$OUT"; exit 0; fi

KEY="$(harness_key)"
WORK="$OUT.partial"
ROOT="$WORK/root"
trap 'chroot_umount' EXIT
chroot_umount
safe_rm_tree "$WORK"
mkdir -p "$WORK"
T0=$(date +%s)

log "debootstrap $SUITE into $ROOT"
debootstrap_tree "$SUITE" "$ROOT" \
    systemd-sysv,udev,kmod,e2fsprogs,iproute2,ifupdown,isc-dhcp-client,sudo,passwd
T1=$(date +%s)

chroot_mount "$ROOT" "$DUALROOT_CACHE/debs/$SUITE"
log "apt-get install in chroot"
in_chroot "$ROOT" apt-get install -y --no-install-recommends \
    initramfs-tools linux-image-amd64 grub-pc lvm2 openssh-server \
    grub-efi-amd64-bin grub-efi-amd64-signed shim-signed efibootmgr mokutil >"$WORK/apt.log" 2>&1 \
    || { tail -n 40 "$WORK/apt.log" >&2; die "apt-get install failed"; }
T2=$(date +%s)

log "configuring the new OS"
# accounts: a group "operators" takes GID 1000, so admin gets 1001:1001
in_chroot "$ROOT" groupadd -g 1000 operators
in_chroot "$ROOT" useradd -m -u 1001 -U -G sudo,operators -s /bin/bash admin
echo 'admin:new-os-default-pass' | in_chroot "$ROOT" chpasswd
echo "new OS admin skeleton" >"$ROOT/home/admin/NEW-OS.txt"
in_chroot "$ROOT" chown -R admin:admin /home/admin

printf '%s\n' "$TEST_VERSION" >"$ROOT/etc/dualroot-test-version"
install -d -m 700 "$ROOT/root/.ssh"
install -m 600 "$KEY.pub" "$ROOT/root/.ssh/authorized_keys"
printf 'UseDNS no\n' >>"$ROOT/etc/ssh/sshd_config"
# host keys and identity come from the old system during migration
rm -f "$ROOT"/etc/ssh/ssh_host_*
: >"$ROOT/etc/machine-id"
echo localhost >"$ROOT/etc/hostname"

cat >"$ROOT/etc/network/interfaces" <<'CONF'
auto lo
iface lo inet loopback
source /etc/network/interfaces.d/*
CONF
cat >"$ROOT/etc/default/grub" <<'CONF'
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT="console=ttyS0 net.ifnames=0 panic=10"
GRUB_CMDLINE_LINUX=""
GRUB_TERMINAL=serial
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
CONF
cat >"$ROOT/etc/systemd/system/dualroot-boot-marker.service" <<'CONF'
[Unit]
Description=dualroot test image: boot marker on the console
After=multi-user.target ssh.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "DUALROOT-BOOTED $(hostname) $(cat /etc/dualroot-test-version)" >/dev/ttyS0'

[Install]
WantedBy=default.target
CONF
in_chroot "$ROOT" systemctl enable dualroot-boot-marker.service >/dev/null 2>&1
mkdir -p "$ROOT/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n' >"$ROOT/etc/systemd/journald.conf.d/10-small.conf"

# generic initramfs (MODULES=most is the default) with the lvm2 hook
KVER="$(basename "$(ls -d "$ROOT"/lib/modules/* | sort -V | tail -n1)")"
in_chroot "$ROOT" update-initramfs -u -k "$KVER" >"$WORK/initramfs.log" 2>&1 \
    || { tail -n 30 "$WORK/initramfs.log" >&2; die "update-initramfs failed"; }
chroot_umount
rm -f "$ROOT/usr/sbin/policy-rc.d"
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/log/*.log
T3=$(date +%s)

cat >"$WORK/build-info" <<INFO
recipe_hash=$HASH
suite=$SUITE
kernel=$KVER
test_version=$TEST_VERSION
debootstrap_s=$((T1 - T0))
apt_install_s=$((T2 - T1))
configure_s=$((T3 - T2))
total_s=$((T3 - T0))
size_kib=$(du -sk "$ROOT" | cut -f1)
INFO
rm -rf "$OUT"
mv "$WORK" "$OUT"
log "new OS tree ready in $((T3 - T0)) s: $OUT"
echo "$OUT"
