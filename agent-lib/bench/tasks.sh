#!/bin/sh
# Pushes BENCH_TASKS (default 10000) tasks with BENCH_DUP_PCT (default 10) %
# duplicates through a real mosquitto into dualroot-agent and prints double
# runs, lost results, p50/p99 receipt->journal latency and tasks/s.
# Needs mosquitto (/usr/sbin/mosquitto). PROFILE=dev for a debug build.
set -eu
cd "$(dirname "$0")/../.."
PROFILE="${PROFILE:-release}"
if [ "$PROFILE" = release ]; then REL=--release; else REL=; fi
exec cargo test -p agent-lib $REL --test bench -- --ignored --nocapture --test-threads=1
