#!/usr/bin/env bash
# Unpack benchmark: dualroot vs `xz -T0 | tar` vs `xz | tar` on the same bundle and
# the same ext4 filesystem (an image mounted through a loop device), in one run.
#
# The root tree is a `debootstrap --variant=minbase trixie` tree cached under
# ${DUALROOT_CACHE:-/var/cache/dualroot}/trixie-minbase (built on first use).
# dualroot runs twice: its default (one decoder thread pipelined with the
# extraction, bounded memory) and --threads 2 (liblzma's multi-threaded
# decoder); each with its peak RSS.
# Needs root. Usage: initrd-tool/bench/unpack.sh [ROUNDS] [BUNDLE KEYRING]
#   BUNDLE KEYRING: a signed bundle to use instead of the trixie one (e.g. the
#   QEMU harness's scale bundle); the filesystem is sized for its payload.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds="${1:-3}"
given_bundle="${2:-}"
given_keyring="${3:-}"
cache="${DUALROOT_CACHE:-/var/cache/dualroot}"
tree="$cache/trixie-minbase"
if [ -z "$given_bundle" ] && [ ! -d "$tree" ]; then
    echo "building $tree with debootstrap (once)..."
    mkdir -p "$cache"
    rm -rf "$tree.partial"
    debootstrap --variant=minbase trixie "$tree.partial" http://deb.debian.org/debian >/dev/null
    mv "$tree.partial" "$tree"
fi
bin=$(scripts/build-static.sh)
work=$(mktemp -d /var/tmp/dualroot-bench.XXXXXX)
mnt="$work/mnt"
loop=""
cleanup() {
    if mountpoint -q "$mnt" 2>/dev/null; then umount "$mnt"; fi
    if [ -n "$loop" ]; then losetup -d "$loop"; fi
    rm -rf "$work"
}
trap cleanup EXIT

if [ -n "$given_bundle" ]; then
    ln -s "$(readlink -f "$given_bundle")" "$work/os.bundle"
    cp -r "$given_keyring" "$work/keyring"
else
    "$bin" key generate --out "$work/key" >/dev/null
    mkdir "$work/keyring" && cp "$work/key.pub" "$work/keyring/"
    "$bin" bundle create --rootfs "$tree" --os-id debian --version 13 --key "$work/key" --out "$work/os.bundle" >/dev/null
fi
tar -xOf "$work/os.bundle" rootfs.tar.xz > "$work/payload.tar.xz"
unpacked_mib=$(xz --robot -l "$work/payload.tar.xz" | awk '$1 == "totals" {print int($5 / 1048576)}')

truncate -s $((unpacked_mib * 13 / 10 + 1024))M "$work/fs.img"
mkfs.ext4 -q "$work/fs.img"
loop=$(losetup -f --show "$work/fs.img")
mkdir "$mnt" && mount "$loop" "$mnt"

TAR=(tar --numeric-owner --xattrs --xattrs-include='*' -xpf - -C)
now() { date +%s.%N; }
fresh() { rm -rf "$mnt/t"; mkdir "$mnt/t"; sync; echo 3 > /proc/sys/vm/drop_caches; }
declare -a T_DR T_DR2 T_MT T_MTS T_ST
for r in $(seq "$rounds"); do
    fresh; s=$(now)
    /usr/bin/time -f "%M" -o "$work/rss" "$bin" bundle unpack "$work/os.bundle" "$mnt/t" --keyring "$work/keyring" >/dev/null 2>&1
    T_DR+=("$(echo "$(now) - $s" | bc)"); rss=$(cat "$work/rss")
    fresh; s=$(now)
    /usr/bin/time -f "%M" -o "$work/rss2" "$bin" bundle unpack --threads 2 "$work/os.bundle" "$mnt/t" --keyring "$work/keyring" >/dev/null 2>&1
    T_DR2+=("$(echo "$(now) - $s" | bc)"); rss2=$(cat "$work/rss2")
    fresh; s=$(now)
    xz -T0 -dc "$work/payload.tar.xz" | "${TAR[@]}" "$mnt/t"
    T_MT+=("$(echo "$(now) - $s" | bc)")
    sync -f "$mnt/t"
    T_MTS+=("$(echo "$(now) - $s" | bc)")
    fresh; s=$(now)
    xz -T1 -dc "$work/payload.tar.xz" | "${TAR[@]}" "$mnt/t"
    T_ST+=("$(echo "$(now) - $s" | bc)")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
dr=$(median "${T_DR[@]}"); dr2=$(median "${T_DR2[@]}"); mt=$(median "${T_MT[@]}"); mts=$(median "${T_MTS[@]}"); st=$(median "${T_ST[@]}")
xzinfo=$(xz -l "$work/payload.tar.xz" | awk 'NR==2 {print $2" blocks, "$3" "$4" compressed, "$5" "$6" uncompressed"}')
echo "bundle: $(stat -c %s "$work/os.bundle") bytes ($xzinfo), $(nproc) cores, $rounds rounds, medians"
printf '%-44s %8.2f s   peak RSS %6d KiB\n' "dualroot bundle unpack (verify+unpack+syncfs)" "$dr" "$rss"
printf '%-44s %8.2f s   peak RSS %6d KiB\n' "  the same, --threads 2 (liblzma MT decoder)" "$dr2" "$rss2"
printf '%-44s %8.2f s   dualroot/this = %.2f\n' "xz -T0 -dc | tar -x" "$mt" "$(echo "$dr / $mt" | bc -l)"
printf '%-44s %8.2f s   dualroot/this = %.2f\n' "xz -T0 -dc | tar -x; sync -f" "$mts" "$(echo "$dr / $mts" | bc -l)"
printf '%-44s %8.2f s   dualroot/this = %.2f\n' "xz -T1 -dc | tar -x" "$st" "$(echo "$dr / $st" | bc -l)"
echo "static binary: $bin, $(stat -c %s "$bin") bytes; $(file -b "$bin" | cut -d, -f1-4)"
