#!/usr/bin/env bash
# Builds the static `dualroot` binary (no dynamic loader, no NSS) into
# target/release/dualroot, or target/x86_64-unknown-linux-musl/release/dualroot
# when DUALROOT_TARGET=x86_64-unknown-linux-musl and that target is installed,
# and the static `dualroot-agent` next to it (it runs on old appliances whose
# glibc is older than the build machine's). Prints the dualroot path on stdout,
# the agent's on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${DUALROOT_TARGET:-}"
if [ -n "$target" ]; then
    RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        cargo build --release -p initrd-tool --bin dualroot -p agent-lib --bin dualroot-agent --target "$target"
    bin="${CARGO_TARGET_DIR:-target}/$target/release/dualroot"
    agent="${CARGO_TARGET_DIR:-target}/$target/release/dualroot-agent"
else
    # cargo rustc passes the flag to the final link only, so proc-macros still build
    # as shared objects and dependencies are shared with the normal release build.
    cargo rustc -q -p initrd-tool --release --bin dualroot -- -C target-feature=+crt-static
    cargo rustc -q -p agent-lib --release --bin dualroot-agent -- -C target-feature=+crt-static
    bin="${CARGO_TARGET_DIR:-target}/release/dualroot"
    agent="${CARGO_TARGET_DIR:-target}/release/dualroot-agent"
fi
for b in "$bin" "$agent"; do
    if ldd "$b" >/dev/null 2>&1 && ! ldd "$b" 2>&1 | grep -q "statically linked"; then
        echo "error: $b is dynamically linked:" >&2
        ldd "$b" >&2
        exit 1
    fi
done
echo "$agent" >&2
echo "$bin"
