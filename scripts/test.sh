#!/usr/bin/env bash
# The test command (README, .ci/run). Needs root: tests mount ext4 images through
# loop devices, create device nodes and start their own Mosquitto broker.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
cargo test --workspace
