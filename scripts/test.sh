#!/usr/bin/env bash
# The test command (README, .ci/run). Needs root: tests mount ext4 images through
# loop devices, create device nodes and start their own Mosquitto broker.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
cargo test --workspace
# A few seconds of every fuzz target (issue 14). It needs nightly Rust and
# cargo-fuzz; without them (no nightly can be fetched from this network) it says
# so and the rest still runs.
rc=0
scripts/fuzz.sh 3 || rc=$?
case $rc in
    0) ;;
    2) echo "test.sh: fuzzing skipped (no nightly toolchain with cargo-fuzz here)" >&2 ;;
    *) exit "$rc" ;;
esac
# QEMU smoke set: the reference migration and one refusal (qemu-tests/run-scenarios.sh
# --smoke). Needs the static dualroot, which goes into the guests.
# The guests get this binary (DUALROOT_BIN; also where CARGO_TARGET_DIR moved it).
DUALROOT_BIN="$(realpath "$(scripts/build-static.sh)")"
export DUALROOT_BIN
qemu-tests/run-scenarios.sh --smoke
