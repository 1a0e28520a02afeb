#!/bin/bash
# dracut module: the dualroot migration initramfs. Installs the static `dualroot`
# and every tool the migration engine calls, plus the old OS's GRUB (for the
# recovery entry), and a pre-mount hook that runs the migration when the kernel
# command line asks for it (rd.dualroot.migrate=<plan> or rd.dualroot.resume=1).

# dracut's own PATH may not include /usr/local/sbin, where dualroot usually lives.
dr_find() {
    local p
    for p in /usr/local/sbin/dualroot /usr/sbin/dualroot /usr/bin/dualroot /sbin/dualroot; do
        [ -x "$p" ] && { echo "$p"; return 0; }
    done
    command -v dualroot
}

# dracut 033 (EL 7.0/7.1) has no require_binaries: fall back to find_binary/type.
dr_require() {
    local b
    if type require_binaries >/dev/null 2>&1; then
        require_binaries "$@"
        return
    fi
    for b in "$@"; do
        if type find_binary >/dev/null 2>&1; then
            [ -n "$(find_binary "$b")" ] || { derror "dualroot: $b not found"; return 1; }
        else
            type -P "$b" >/dev/null || { derror "dualroot: $b not found"; return 1; }
        fi
    done
}

check() {
    [ -n "$(dr_find)" ] || return 1
    dr_require lvm mkfs.ext4 || return 1
    # Only when asked for (dracut --add dualroot).
    return 255
}

# The new /boot, data and slot filesystems are ext4, the old root may be XFS, and
# LVM needs device-mapper: a host-only initramfs of an XFS-rooted system would
# carry none of ext4's modules, and mounting the new filesystems would fail after
# the point of no return.
# On UEFI the old and the new ESP are FAT, which mount needs with the kernel's
# default code page and I/O charset (nls_ascii on Debian's kernels: without it
# "IO charset ascii not found"), and efivarfs shows which boot entry the
# firmware started; missing modules are skipped.
installkernel() {
    hostonly='' instmods ext4 xfs dm_mod
    hostonly='' instmods vfat nls_cp437 nls_ascii nls_iso8859_1 nls_utf8 efivarfs
}

depends() {
    echo lvm
    return 0
}

install() {
    inst_simple "$(dr_find)" /usr/bin/dualroot
    # The partition table is written by dualroot itself (EL7's sfdisk cannot
    # write GPT) and re-read with the BLKRRPART ioctl; partx is the fallback.
    # mount(8) autodetects the old root's and /boot's ext4 or XFS.
    inst_multiple lvm mkfs.ext4 mke2fs mount umount chroot sync
    inst_multiple -o partx udevadm /etc/mke2fs.conf
    # UEFI machines: the new ESP's filesystem (dosfstools' names) and the
    # recovery chain's firmware entry.
    inst_multiple -o mkfs.vfat mkfs.fat mkdosfs efibootmgr
    # Bundle code (the new root's initramfs tool, setfiles, hooks) runs in its
    # own mount and PID namespaces; without unshare it gets a plain chroot.
    inst_multiple -o unshare
    # The old OS's GRUB, to put a recovery entry in place (Debian and EL names).
    inst_multiple -o grub-install grub2-install grub-probe grub2-probe grub-editenv grub2-editenv
    local d
    for d in /usr/lib/grub/i386-pc /usr/lib/grub2/i386-pc; do
        if [ -d "$d" ]; then
            inst_dir "$d"
            inst_multiple "$d"/*
        fi
    done
    inst_hook pre-mount 01 "$moddir/dualroot-migrate.sh"
}
