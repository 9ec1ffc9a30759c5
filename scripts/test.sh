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

echo "== libvirt lab tests (real libvirt + TCG guests; prefix ${VMB_LAB_PREFIX:-vmb})"
(
  export VMB_LAB_PREFIX="${VMB_LAB_PREFIX:-vmb}"
  trap 'lab/libvirt-lab.sh down "$VMB_LAB_PREFIX"' EXIT
  lab/libvirt-lab.sh up "$VMB_LAB_PREFIX"
  VMB_LAB_LIBVIRT=1 cargo test --no-fail-fast --test 'lab_*' --test compat_fixture -- --test-threads=1
)

echo "== off-site lab tests (s3s-fs on 127.0.0.1 + the agent guest with a filled disk; prefix ofs)"
(
  trap 'lab/s3-lab.sh stop || true; lab/libvirt-lab.sh down ofs' EXIT
  lab/s3-lab.sh start
  eval "$(lab/s3-lab.sh env)"
  # 400 MiB of data, so the few chunks any backup changes in metadata stay far below 5 %.
  lab/libvirt-lab.sh up ofs --only agent --data-size 512M --fill 400M
  VMB_LAB_PREFIX=ofs VMB_LAB_LIBVIRT=1 cargo test --no-fail-fast --test lab_offsite -- --test-threads=1
)

echo "== Bacula lab tests (real bacula-dir/sd/fd + bconsole, the vm-backup plugin, TCG guests; prefix bac)"
(
  export VMB_LAB_PREFIX=bac   # the prefix lab/bacula-lab.sh and tests/lab_bacula.rs use
  trap 'lab/bacula-lab.sh stop || true; lab/s3-lab.sh stop || true; lab/libvirt-lab.sh down bac' EXIT
  # The off-site Admin job test pushes to the S3 lab (started again: the block above stopped it).
  lab/s3-lab.sh start
  eval "$(lab/s3-lab.sh env)"
  # The 600 MiB fill lets the cancel and kill -9 tests act while the copy runs.
  lab/libvirt-lab.sh up bac --only agent,noagent --data-size 1G --fill 600M
  VMB_LAB_BACULA=1 VMB_LAB_LIBVIRT=1 cargo test --no-fail-fast --test lab_bacula -- --test-threads=1
)

echo "== packages: .deb and .rpm from one release build, installed, a Bacula job with the installed plugin, purged; the status page in Chromium"
scripts/test-package.sh

echo "== all tests passed"
