#!/usr/bin/env bash
# Builds the static `dualroot` binary (no dynamic loader, no NSS) into
# target/release/dualroot, or target/x86_64-unknown-linux-musl/release/dualroot
# when DUALROOT_TARGET=x86_64-unknown-linux-musl and that target is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${DUALROOT_TARGET:-}"
if [ -n "$target" ]; then
    RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        cargo build --release -p initrd-tool --bin dualroot --target "$target"
    bin="target/$target/release/dualroot"
else
    # cargo rustc passes the flag to the final link only, so proc-macros still build
    # as shared objects and dependencies are shared with the normal release build.
    cargo rustc -q -p initrd-tool --release --bin dualroot -- -C target-feature=+crt-static
    bin="target/release/dualroot"
fi
if ldd "$bin" >/dev/null 2>&1 && ! ldd "$bin" 2>&1 | grep -q "statically linked"; then
    echo "error: $bin is dynamically linked:" >&2
    ldd "$bin" >&2
    exit 1
fi
echo "$bin"
