#!/usr/bin/env bash
# Installs the system tools the build, the demo and the tests call. Idempotent.
set -euo pipefail
pkgs=(xz-utils tar acl attr e2fsprogs fdisk util-linux file bc time mosquitto
      qemu-system-x86 qemu-utils debootstrap openssh-client grub-common lvm2 sshpass)
# A static shell for the tests that chroot into a minimal root (selinux_order).
pkgs+=(busybox-static)
# PostgreSQL for the fleet controller's tests and bench (their own clusters).
pkgs+=(postgresql)
# OVMF (UEFI firmware, with its Secure Boot build and Microsoft's keys) for the
# uefi scenarios (qemu-tests/run-scenarios.sh uefi).
pkgs+=(ovmf)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# A fresh machine has qemu-utils from bookworm-backports; installing bookworm's
# qemu-system-x86 removes it (and qemu-img with it). Put back the qemu-utils of
# the same suite as qemu-system-x86.
if ! command -v qemu-img >/dev/null 2>&1; then
    echo "installing: qemu-utils (qemu-img; same suite as qemu-system-x86)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends qemu-utils
fi
command -v qemu-img >/dev/null && command -v qemu-system-x86_64 >/dev/null || {
    echo "qemu-img and qemu-system-x86_64 are both needed; apt could not install them together" >&2
    exit 1
}
# cargo-fuzz for scripts/fuzz.sh (crates.io); it runs only where a nightly
# toolchain is already installed (rustup cannot fetch one from this network).
if rustup toolchain list 2>/dev/null | grep -q '^nightly' && ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "installing: cargo-fuzz"
    cargo install --locked cargo-fuzz
fi
# The broker is started by the tests themselves on loopback ports; the packaged
# service is not needed.
systemctl disable --now mosquitto >/dev/null 2>&1 || true
# PostgreSQL for the fleet controller's tests: they run their own throwaway
# cluster (initdb + postgres as the postgres user) on a loopback port; the
# packaged cluster is not needed.
systemctl disable --now postgresql >/dev/null 2>&1 || true
