#!/bin/bash
# Runs every fuzz target in fuzz/ for SECONDS_PER_TARGET seconds (default 10) and
# prints how many inputs each one executed. Exits 0 when nothing crashed; on a crash
# it names the target, the input that crashed it (an artifact file) and the log.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
#
# Needs nightly Rust and cargo-fuzz (`rustup toolchain install nightly`,
# `cargo install cargo-fuzz`). Targets: the bundle manifest, the outer container, the
# payload tar reader, tar extraction into a scratch directory, the plan, grubenv,
# and passwd/shadow/group parsing and merge.
#
# The seed corpora in fuzz/corpus/<target>/ are read, never written: what the fuzzer
# finds goes to $DUALROOT_FUZZ_WORK/corpus/<target>/ (default /var/tmp/dualroot-fuzz),
# so later runs start from it. tar_unpack extracts archives as root; as root it runs
# in a private mount namespace where /, /dev, /proc and /sys are read-only and only
# the work directory (and a tmpfs scratch directory in it) can be written.
#
# Environment: DUALROOT_FUZZ_WORK, DUALROOT_FUZZ_TARGET_DIR (cargo target dir,
# default $DUALROOT_FUZZ_WORK/target), DUALROOT_FUZZ_TARGETS (space-separated
# subset), DUALROOT_FUZZ_JOBS (parallel fuzzing processes per target, default 1).
set -euo pipefail

secs=${1:-10}
case $secs in '' | *[!0-9]*)
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
    ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${DUALROOT_FUZZ_WORK:-/var/tmp/dualroot-fuzz}
tdir=${DUALROOT_FUZZ_TARGET_DIR:-$work/target}
jobs=${DUALROOT_FUZZ_JOBS:-1}
read -ra targets <<<"${DUALROOT_FUZZ_TARGETS:-manifest outer tar_parse tar_unpack plan grubenv accounts}"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz with a nightly toolchain is needed (rustup toolchain install nightly; cargo install cargo-fuzz); nothing was fuzzed" >&2
    exit 2
fi
mkdir -p "$work"
echo "building fuzz targets (release, debug assertions, no sanitizer) into $tdir"
(cd "$repo/fuzz" && cargo +nightly fuzz build -O -s none --target-dir "$tdir")
bindir=$tdir/x86_64-unknown-linux-gnu/release

# Runs "$@" with / and the kernel filesystems read-only; only $work stays writable.
jailed() {
    if [ "$(id -u)" != 0 ] || ! command -v unshare >/dev/null; then
        "$@"
        return
    fi
    mkdir -p "$work/scratch"
    unshare --mount --propagation private -- bash -ec '
        work=$1
        shift
        mount --bind "$work" "$work"
        mount -t tmpfs -o size=2g,mode=700 dualroot-fuzz "$work/scratch"
        for m in / /dev /dev/shm /proc /sys; do
            mount -o remount,bind,ro "$m" 2>/dev/null || true
        done
        exec "$@"' jail "$work" "$@"
}

failed=0
summary=()
for t in "${targets[@]}"; do
    bin=$bindir/$t
    corpus=$work/corpus/$t
    art=$work/artifacts/$t
    log=$work/logs/$t.log
    mkdir -p "$corpus" "$art" "$work/logs"
    cmd=("$bin" -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048
        -timeout=20 -artifact_prefix="$art/" "$corpus" "$repo/fuzz/corpus/$t")
    if [ "$jobs" -gt 1 ]; then
        cmd=("${cmd[0]}" -fork="$jobs" "${cmd[@]:1}")
    fi
    rc=0
    if [ "$t" = tar_unpack ]; then
        DUALROOT_FUZZ_SCRATCH=$work/scratch jailed "${cmd[@]}" >"$log" 2>&1 || rc=$?
    else
        "${cmd[@]}" >"$log" 2>&1 || rc=$?
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | awk '{s += $1} END {print s + 0}')
    if [ "$execs" = 0 ]; then
        # -fork mode reports the total on its last status line instead.
        execs=$(grep -o '#[0-9]*' "$log" | tail -1 | tr -d '#')
    fi
    if [ "$rc" = 0 ]; then
        line=$(printf '%-11s %12s executions in %ss  ok' "$t" "${execs:-?}" "$secs")
    else
        failed=1
        line=$(printf '%-11s %12s executions in %ss  CRASHED (exit %s): input in %s, log %s' \
            "$t" "${execs:-?}" "$secs" "$rc" "$art" "$log")
        grep -E 'panicked|ERROR|SUMMARY' "$log" | head -5 >&2 || true
    fi
    echo "$line"
    summary+=("$line")
done

echo
echo "fuzz summary ($secs s per target, work dir $work):"
printf '  %s\n' "${summary[@]}"
if [ "$failed" != 0 ]; then
    echo "fuzz.sh: a target crashed; reproduce with: $bindir/<target> <input file>" >&2
fi
exit "$failed"
