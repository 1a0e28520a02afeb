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

check() {
    [ -n "$(dr_find)" ] || return 1
    require_binaries sfdisk lvm mkfs.ext4 || return 1
    # Only when asked for (dracut --add dualroot).
    return 255
}

depends() {
    echo lvm
    return 0
}

install() {
    inst_simple "$(dr_find)" /usr/bin/dualroot
    inst_multiple sfdisk lvm mkfs.ext4 mke2fs blockdev mount umount chroot sync
    inst_multiple -o partx udevadm /etc/mke2fs.conf
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
