#!/usr/bin/env bash
# The test command (README, .ci/run). Needs root: tests mount ext4 images through
# loop devices, create device nodes and start their own Mosquitto broker.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
cargo test --workspace
# QEMU smoke set: the reference migration and one refusal (qemu-tests/run-scenarios.sh
# --smoke). Needs the static dualroot, which goes into the guests.
scripts/build-static.sh >/dev/null
qemu-tests/run-scenarios.sh --smoke
