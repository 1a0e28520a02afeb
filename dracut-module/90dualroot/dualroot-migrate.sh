#!/bin/sh
# dracut pre-mount hook for the dualroot migration. Sourced by dracut, so: no
# `exit`, no `set -e`. dracut ignores a hook's failure, so this hook decides what
# follows: reboot into the old system after a refusal or an undo, into the new
# system after success, into the recovery entry (resume) after a failure past the
# point of no return, or power off when a step failed too often or an undo failed.

type getarg >/dev/null 2>&1 || . /lib/dracut-lib.sh

dr_plan="$(getarg rd.dualroot.migrate=)"
dr_resume="$(getarg rd.dualroot.resume=)"

if [ -n "$dr_plan" ] || [ -n "$dr_resume" ]; then
    dr_say() {
        echo "dualroot-hook: $*" >/dev/kmsg 2>/dev/null
        echo "dualroot-hook: $*" >/dev/console 2>/dev/null
    }
    if [ -n "$dr_plan" ]; then
        dr_say "migration requested with plan $dr_plan"
        # First, in its own process: take back the one-shot entry, which GRUB
        # cannot clear on an XFS or LVM /boot, so a migration that cannot start
        # (or a dualroot that crashes) does not boot this entry forever.
        dualroot migrate --disarm </dev/null >/dev/console 2>&1 \
            || dr_say "the one-shot entry could not be cleared (see above)"
        dualroot migrate --plan "$dr_plan" </dev/null >/dev/console 2>&1
    else
        dr_say "resuming the migration"
        dualroot migrate --resume </dev/null >/dev/console 2>&1
    fi
    dr_rc=$?
    case "$dr_rc" in
        0) dr_say "DUALROOT-MIGRATION-DONE: rebooting into the new system" ;;
        2) dr_say "DUALROOT-MIGRATION-REFUSED: nothing was changed; rebooting into the old system" ;;
        3) dr_say "DUALROOT-MIGRATION-RETRY: a step failed after the point of no return; rebooting to resume" ;;
        4) dr_say "DUALROOT-MIGRATION-GAVE-UP: see /boot/dualroot/journal.json; powering off" ;;
        5) dr_say "DUALROOT-MIGRATION-UNDONE: a step inside the window kept failing and the old disk was put back; rebooting into the old system" ;;
        *) dr_say "dualroot exited with status $dr_rc; rebooting" ;;
    esac
    sync
    if [ "$dr_rc" = 4 ]; then
        dualroot power off || echo o >/proc/sysrq-trigger
    else
        dualroot power reboot || echo b >/proc/sysrq-trigger
    fi
fi
