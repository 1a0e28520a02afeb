#!/usr/bin/env bash
# The main job on the fixtures: build the static dualroot, make a throwaway signing
# key, bundle the fixture root tree (plus a device node, a FIFO, a hardlink, xattrs
# and a file owned by a foreign UID added at run time, since git cannot store them),
# inspect and verify the bundle, unpack it into a fresh ext4 filesystem and show
# what came out. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(scripts/build-static.sh)
work=$(mktemp -d /var/tmp/dualroot-demo.XXXXXX)
loop=""
cleanup() {
    if mountpoint -q "$work/mnt" 2>/dev/null; then umount "$work/mnt"; fi
    if [ -n "$loop" ]; then losetup -d "$loop"; fi
    rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n=== %s\n' "$*"; }

step "fixture root tree (fixtures/rootfs + run-time extras)"
cp -a fixtures/rootfs "$work/rootfs"
mkdir -p "$work/rootfs/dev" "$work/rootfs/home/admin"
mknod "$work/rootfs/dev/null" c 1 3 && chmod 666 "$work/rootfs/dev/null"
mkfifo "$work/rootfs/dev/initctl"
ln "$work/rootfs/usr/bin/hello" "$work/rootfs/usr/bin/hello-again"
echo "admin's notes" > "$work/rootfs/home/admin/notes" && chown -R 1000:1000 "$work/rootfs/home/admin"
setfattr -n user.origin -v fixture "$work/rootfs/etc"
setfattr -n security.capability -v 0sAQAAAgAgAAAAAAAAAAAAAAAAAAA= "$work/rootfs/usr/bin/hello"
setfacl -m u:1000:r "$work/rootfs/etc/hostname"

step "dualroot key generate"
"$bin" key generate --out "$work/vendor.key"
mkdir "$work/keyring" && cp "$work/vendor.key.pub" "$work/keyring/"

step "dualroot bundle create"
"$bin" bundle create --rootfs "$work/rootfs" --os-id fixture --version 13 \
    --requires-cpu x86-64-v2 --key "$work/vendor.key" --out "$work/fixture.bundle"

step "dualroot bundle inspect"
"$bin" bundle inspect "$work/fixture.bundle"

step "dualroot bundle verify"
"$bin" bundle verify "$work/fixture.bundle" --keyring "$work/keyring"

step "dualroot bundle unpack (into a fresh ext4 filesystem)"
truncate -s 64M "$work/fs.img" && mkfs.ext4 -q "$work/fs.img"
loop=$(losetup -f --show "$work/fs.img")
mkdir "$work/mnt" && mount "$loop" "$work/mnt"
"$bin" bundle unpack "$work/fixture.bundle" "$work/mnt" --keyring "$work/keyring"

step "result"
(cd "$work/mnt" && find . -path ./lost+found -prune -o -printf '%M %4U:%-4G %6s %p %l\n' | sort -k4)
echo
(cd "$work/mnt" && getfattr -R -h -d -m - . 2>/dev/null)
echo
echo "default excludes dropped: var/log/old.log $( [ -e "$work/mnt/var/log/old.log" ] && echo PRESENT || echo absent), tmp/scratch $( [ -e "$work/mnt/tmp/scratch" ] && echo PRESENT || echo absent)"
echo "static binary: $bin ($(stat -c %s "$bin") bytes, $(ldd "$bin" 2>&1 | tr -d '\t'))"

step "reference migration in QEMU (Debian 11 single partition -> Debian 13 A/B)"
# Builds the guest images on first use (cached in ${DUALROOT_CACHE:-/var/cache/dualroot}),
# then prints the disk layout before and after and every check it made.
cargo test -q -p qemu-tests --test migration -- --ignored --nocapture reference_migration 2>&1 \
    | grep -E '^\[reference-migration\]|^(NAME|vda|[├└│ ])' 
