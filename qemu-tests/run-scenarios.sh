#!/bin/bash
# Run QEMU scenarios and print a table: scenario, result, wall time, the
# scenario's own time (wall minus building cached states), which cached state
# it started from and how long building it took (0 when it came from the cache),
# peak guest memory, boot times; at the end the time spent building states
# versus running scenarios. Images and states are built on first use and cached
# under ${DUALROOT_CACHE:-/var/cache/dualroot} (states/: see src/states.rs).
#
#   qemu-tests/run-scenarios.sh             every scenario (all #[ignore] tests)
#   qemu-tests/run-scenarios.sh --smoke     the smoke set (fits CI)
#   qemu-tests/run-scenarios.sh NAME...     tests whose name contains NAME
#   qemu-tests/run-scenarios.sh matrix      the migration matrix, one scenario per
#                                           row (README: Matrix)
#   qemu-tests/run-scenarios.sh fleet       dualroot-fleet rolls a migration, then an
#                                           A/B image out to a real VM among simulated
#                                           appliances (builds dualroot-fleet release)
#   qemu-tests/run-scenarios.sh undo        a window step failing for good: the old
#                                           disk put back, or powered off when the
#                                           undo fails (README: Undo; one scenario:
#                                           undo_volumes_single)
#
# Scenarios run one after another (TCG on 2 cores). Exit status is cargo's.
set -uo pipefail

# The smoke set (issue 4: the reference migration and one refusal belong
# here once they pass); $DUALROOT_SMOKE (space-separated names) overrides it.
# "reference_migration" is reference_migration_matrix_partition_hostonly, the
# matrix row of the single-partition appliance.
DEFAULT_SMOKE="reference_migration refused_cpu_without_x86_64_v2"

# Everything runs inside main, which bash reads whole before running it: the
# script can be edited while a long run is going on.
main() {
    cd "$(dirname "$0")/.." || exit 1
    local filters=()
    if [ "${1:-}" = "--smoke" ]; then
        read -r -a filters <<<"${DUALROOT_SMOKE:-$DEFAULT_SMOKE}"
        shift
    fi
    filters+=("$@")

    # global: the EXIT trap reads it after main returns
    results="$(mktemp "${TMPDIR:-/tmp}/dualroot-results.XXXXXX")"
    trap 'rm -f "$results"' EXIT
    export DUALROOT_RESULTS="$results"

    # The fleet scenario runs the real controller: build it unless given.
    if [ -z "${DUALROOT_FLEET_BIN:-}" ] && { [ ${#filters[@]} -eq 0 ] || printf '%s\n' "${filters[@]}" | grep -q fleet; }; then
        cargo build --release -q -p dualroot-fleet || return 1
        DUALROOT_FLEET_BIN="$(realpath "${CARGO_TARGET_DIR:-target}/release/dualroot-fleet")"
        export DUALROOT_FLEET_BIN
    fi

    local start rc total
    start=$(date +%s)
    # --no-fail-fast: one failing scenario file must not hide the others' results.
    cargo test --no-fail-fast -p qemu-tests -- --ignored --test-threads=1 --nocapture "${filters[@]}"
    rc=$?
    total=$(($(date +%s) - start))

    echo
    echo "== QEMU scenarios (${total} s in all) =="
    awk -F'\t' '
        BEGIN {
            printf "%-40s %-6s %8s %8s %-28s %9s %8s %10s  %s\n", "scenario", "result", "wall_s", "own_s", "state", "state_b_s", "peak_MiB", "boot_s", "notes"
        }
        {
            delete f
            for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = substr($i, length(kv[1]) + 2) }
            own = f["wall_s"] - f["state_build_s"]
            printf "%-40s %-6s %8s %8s %-28s %9s %8s %10s  %s\n", f["scenario"], f["result"], f["wall_s"], own, f["state"], f["state_build_s"], f["guest_peak_used_mib"], f["boot_to_ssh_s"], f["notes"]
            if (f["error"] != "") printf "    error: %s\n", f["error"]
            build += f["state_build_s"]; run += own
        }
        END {
            printf "time building cached states: %d s; running scenarios: %d s\n", build, run
        }' "$results"
    [ -s "$results" ] || echo "(no scenario recorded a result)"
    return $rc
}

main "$@"
exit $?
