# Shared helpers for the image recipes. Sourced, never executed.
# Everything downloaded or built lives under $DUALROOT_CACHE (default
# /var/cache/dualroot), outside the repository; the cache may be absent.

: "${DUALROOT_CACHE:=/var/cache/dualroot}"
: "${DEBIAN_MIRROR:=http://deb.debian.org/debian}"
export DUALROOT_CACHE DEBIAN_MIRROR

IMAGES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The SSH key the harness uses to log into every guest as root. Generated
# once per cache; its public half is part of every image recipe hash.
harness_key() {
    local dir="$DUALROOT_CACHE/ssh"
    if [ ! -s "$dir/id_ed25519" ]; then
        mkdir -p "$dir"
        rm -f "$dir/id_ed25519.tmp" "$dir/id_ed25519.tmp.pub"
        ssh-keygen -q -t ed25519 -N '' -C dualroot-harness -f "$dir/id_ed25519.tmp"
        mv "$dir/id_ed25519.tmp.pub" "$dir/id_ed25519.pub"
        mv "$dir/id_ed25519.tmp" "$dir/id_ed25519"
    fi
    printf '%s\n' "$dir/id_ed25519"
}

# recipe_hash FILE... : 16 hex digits over the named files plus the
# harness public key, so a changed recipe (or key) gives a new cache entry.
recipe_hash() {
    local key
    key="$(harness_key)"
    cat "$@" "$key.pub" | sha256sum | cut -c1-16
}

# Chroot mounts, undone by chroot_umount (also called from the EXIT trap).
CHROOT_MOUNTS=()
chroot_mount() {
    local root="$1" cache="$2"
    mkdir -p "$cache"
    mount -t proc proc "$root/proc"; CHROOT_MOUNTS+=("$root/proc")
    mount -t sysfs sysfs "$root/sys"; CHROOT_MOUNTS+=("$root/sys")
    mount --bind /dev "$root/dev"; CHROOT_MOUNTS+=("$root/dev")
    mount --bind /dev/pts "$root/dev/pts"; CHROOT_MOUNTS+=("$root/dev/pts")
    mount --bind "$cache" "$root/var/cache/apt/archives"; CHROOT_MOUNTS+=("$root/var/cache/apt/archives")
    # no daemons start inside the chroot
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
}
chroot_umount() {
    local i m
    for ((i = ${#CHROOT_MOUNTS[@]} - 1; i >= 0; i--)); do
        m="${CHROOT_MOUNTS[$i]}"
        for _ in 1 2 3 4 5; do
            mountpoint -q "$m" || break
            umount "$m" 2>/dev/null || umount -l "$m" || sleep 1
        done
    done
    CHROOT_MOUNTS=()
}

# Remove a build directory, but never while anything is mounted under it.
safe_rm_tree() {
    local dir="$1"
    [ -e "$dir" ] || return 0
    if findmnt -rn -o TARGET | grep -q "^$(realpath "$dir")/"; then
        log "not removing $dir: something is still mounted below it"
        return 1
    fi
    rm -rf --one-file-system "$dir"
}

in_chroot() {
    local root="$1"; shift
    DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 \
        PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$root" "$@"
}

debootstrap_tree() {
    local suite="$1" root="$2" include="$3"
    local debs="$DUALROOT_CACHE/debs/$suite"
    mkdir -p "$debs"
    debootstrap --variant=minbase --include="$include" --cache-dir="$debs" \
        "$suite" "$root" "$DEBIAN_MIRROR" >"$root.debootstrap.log" 2>&1 \
        || { tail -n 30 "$root.debootstrap.log" >&2; die "debootstrap $suite failed"; }
}

# make_raw_disk IMAGE SIZE_MIB ROOT_TREE: msdos label, one bootable Linux
# partition from 1 MiB to the end, ext4 (label "root") made from ROOT_TREE
# with mkfs.ext4 -d and written at the partition offset.
make_raw_disk() {
    local img="$1" size_mib="$2" tree="$3" uuid="$4"
    local part="$img.part"
    rm -f "$img" "$part"
    truncate -s "${size_mib}M" "$img"
    printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$img"
    truncate -s "$((size_mib - 1))M" "$part"
    mkfs.ext4 -q -F -L root -U "$uuid" -d "$tree" "$part"
    dd if="$part" of="$img" bs=1M seek=1 conv=notrunc,sparse status=none
    rm -f "$part"
}
