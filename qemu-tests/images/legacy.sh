#!/bin/bash
# Legacy appliance image: Debian 11 (bullseye) on ONE msdos root partition,
# GRUB (BIOS), dracut, lvm2, OpenSSH. Prints the cache directory holding
#   disk.raw      4 GiB sparse raw disk, GRUB installed, boots via SeaBIOS
#   vmlinuz, initrd.img   kernel and dracut initramfs of the image
#   build-info    recipe hash and build timings
# Reuses a cached build when the recipe (this file, lib.sh, the harness key)
# has not changed. Usage: legacy.sh [--print-dir]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SUITE=bullseye
DISK_MIB=4096
ROOT_UUID=0d0a1e9a-0000-4000-8000-00000000a11c
HASH="$(recipe_hash "$IMAGES_DIR/lib.sh" "$IMAGES_DIR/legacy.sh")"
OUT="$DUALROOT_CACHE/legacy-$SUITE-$HASH"
if [ "${1:-}" = "--print-dir" ]; then echo "$OUT"; exit 0; fi
if [ -s "$OUT/disk.raw" ] && [ -s "$OUT/build-info" ]; then echo "$OUT"; exit 0; fi

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

# A generic initramfs for the first boot: the image is built in a chroot,
# hostonly would look at the build host. The first boot switches to hostonly.
mkdir -p "$ROOT/etc/dracut.conf.d"
cat >"$ROOT/etc/dracut.conf.d/10-generic.conf" <<'CONF'
hostonly="no"
CONF

chroot_mount "$ROOT" "$DUALROOT_CACHE/debs/$SUITE"
log "apt-get install in chroot"
# xfsprogs: a CentOS 7 appliance has it (XFS is its default filesystem), and
# legacy-lvm.sh converts this image to the CentOS 7 default layout (XFS).
# fdisk: the scenarios read the partition table back with sfdisk -J (dualroot
# itself writes the GPT in-process and needs no partitioning tool).
in_chroot "$ROOT" apt-get install -y --no-install-recommends \
    dracut linux-image-amd64 grub-pc lvm2 openssh-server xfsprogs fdisk >"$WORK/apt.log" 2>&1 \
    || { tail -n 40 "$WORK/apt.log" >&2; die "apt-get install failed"; }
T2=$(date +%s)

log "configuring the appliance"
echo appliance-7 >"$ROOT/etc/hostname"
cat >"$ROOT/etc/hosts" <<'CONF'
127.0.0.1	localhost
127.0.1.1	appliance-7
::1	localhost ip6-localhost ip6-loopback
CONF
cat >"$ROOT/etc/fstab" <<CONF
UUID=$ROOT_UUID / ext4 errors=remount-ro 0 1
LABEL=dualroot-payload /mnt/payload ext4 ro,nofail,x-systemd.device-timeout=3s 0 0
CONF
mkdir -p "$ROOT/mnt/payload"

# people, service account and appliance config
in_chroot "$ROOT" groupadd --system appliance
in_chroot "$ROOT" useradd -m -u 1000 -U -G sudo,appliance -s /bin/bash admin
in_chroot "$ROOT" useradd --system -g appliance -d /var/lib/svcapp -m -s /usr/sbin/nologin svcapp
echo 'admin:admin-pass-1' | in_chroot "$ROOT" chpasswd
echo 'root:root-pass-1' | in_chroot "$ROOT" chpasswd
mkdir -p "$ROOT/home/admin/notes" "$ROOT/etc/appliance/certs"
echo "legacy appliance admin notes" >"$ROOT/home/admin/notes/readme.txt"
printf 'export APPLIANCE_MODEL=va-7\n' >"$ROOT/home/admin/.profile_appliance"
cat >"$ROOT/etc/appliance/appliance.conf" <<'CONF'
model = "va-7"
serial = "VA7-000123"
CONF
echo "device-token-0123456789abcdef" >"$ROOT/etc/appliance/token"
echo "-----BEGIN TEST CERT-----" >"$ROOT/etc/appliance/certs/device.pem"
chmod 600 "$ROOT/etc/appliance/token"
in_chroot "$ROOT" chown -R admin:admin /home/admin /etc/appliance
echo "svcapp state" >"$ROOT/var/lib/svcapp/state"
in_chroot "$ROOT" chown -R svcapp:appliance /var/lib/svcapp

# root SSH access for the harness
install -d -m 700 "$ROOT/root/.ssh"
install -m 600 "$KEY.pub" "$ROOT/root/.ssh/authorized_keys"
[ -s "$ROOT/etc/ssh/ssh_host_ed25519_key" ] || in_chroot "$ROOT" ssh-keygen -A
printf 'UseDNS no\n' >>"$ROOT/etc/ssh/sshd_config"

# two NICs configured by name
cat >"$ROOT/etc/network/interfaces" <<'CONF'
auto lo
iface lo inet loopback

allow-hotplug eth0
iface eth0 inet dhcp

allow-hotplug eth1
iface eth1 inet static
    address 10.0.3.15/24
CONF

# GRUB on the serial console
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

# first boot (via -kernel/-initrd): install GRUB, then power off
cat >"$ROOT/usr/local/sbin/dualroot-firstboot" <<'CONF'
#!/bin/sh
# from now on a host-only initramfs: smaller, faster to boot and to build
# under TCG (the migration initramfs is built here with dracut too)
rm -f /etc/dracut.conf.d/10-generic.conf
echo 'hostonly="yes"' >/etc/dracut.conf.d/10-hostonly.conf
if grub-install /dev/vda && dracut -f "/boot/initrd.img-$(uname -r)" "$(uname -r)" && update-grub; then
    rm -f /etc/dualroot-firstboot
    sync
    echo "DUALROOT-FIRSTBOOT-OK" >/dev/ttyS0
else
    echo "DUALROOT-FIRSTBOOT-FAILED" >/dev/ttyS0
fi
systemctl poweroff --no-block
CONF
chmod 755 "$ROOT/usr/local/sbin/dualroot-firstboot"
cat >"$ROOT/etc/systemd/system/dualroot-firstboot.service" <<'CONF'
[Unit]
Description=dualroot test image: install GRUB on first boot
ConditionPathExists=/etc/dualroot-firstboot
After=local-fs.target

[Service]
Type=oneshot
StandardOutput=journal+console
StandardError=journal+console
ExecStart=/usr/local/sbin/dualroot-firstboot

[Install]
WantedBy=multi-user.target
CONF
touch "$ROOT/etc/dualroot-firstboot"
in_chroot "$ROOT" systemctl enable dualroot-firstboot.service >/dev/null 2>&1
# a console marker on every boot once multi-user is reached
cat >"$ROOT/etc/systemd/system/dualroot-boot-marker.service" <<'CONF'
[Unit]
Description=dualroot test image: boot marker on the console
After=multi-user.target ssh.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "DUALROOT-BOOTED $(hostname)" >/dev/ttyS0'

[Install]
WantedBy=default.target
CONF
in_chroot "$ROOT" systemctl enable dualroot-boot-marker.service >/dev/null 2>&1
# quieter journal in a small guest
mkdir -p "$ROOT/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n' >"$ROOT/etc/systemd/journald.conf.d/10-small.conf"

# the generic initramfs was made by the kernel's postinst (dracut.conf.d above)
KVER="$(basename "$(ls -d "$ROOT"/lib/modules/* | sort -V | tail -n1)")"
[ -s "$ROOT/boot/initrd.img-$KVER" ] || die "no initramfs for $KVER"
chroot_umount
rm -f "$ROOT/usr/sbin/policy-rc.d"
cp "$ROOT/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
cp "$ROOT/boot/initrd.img-$KVER" "$WORK/initrd.img"
T3=$(date +%s)

log "making the raw disk"
make_raw_disk "$WORK/disk.raw" "$DISK_MIB" "$ROOT" "$ROOT_UUID"
T4=$(date +%s)

log "first boot: grub-install inside the guest (TCG)"
timeout 900 qemu-system-x86_64 -accel tcg -m 1024 -smp 2 -cpu max \
    -display none -no-reboot -serial "file:$WORK/firstboot.console" \
    -drive "file=$WORK/disk.raw,format=raw,if=virtio" \
    -kernel "$WORK/vmlinuz" -initrd "$WORK/initrd.img" \
    -append "root=/dev/vda1 rw console=ttyS0 net.ifnames=0 panic=10" \
    -nic none || true
grep -q DUALROOT-FIRSTBOOT-OK "$WORK/firstboot.console" \
    || { tail -n 60 "$WORK/firstboot.console" >&2; die "first boot did not install GRUB"; }
T5=$(date +%s)

safe_rm_tree "$ROOT"
cat >"$WORK/build-info" <<INFO
recipe_hash=$HASH
suite=$SUITE
kernel=$KVER
debootstrap_s=$((T1 - T0))
apt_install_s=$((T2 - T1))
configure_s=$((T3 - T2))
mkfs_s=$((T4 - T3))
firstboot_s=$((T5 - T4))
total_s=$((T5 - T0))
INFO
rm -rf "$OUT"
mv "$WORK" "$OUT"
log "legacy image ready in $((T5 - T0)) s: $OUT"
echo "$OUT"
