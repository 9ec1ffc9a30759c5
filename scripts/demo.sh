#!/usr/bin/env bash
# The demo: builds vm-backup and runs the main job on the embedded lab.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release
echo "demo: not wired yet"
