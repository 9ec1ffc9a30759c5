#!/usr/bin/env bash
# Installs every Debian package the build, the tests and the labs use. Idempotent; needs root.
# Debian 12 ships QEMU 7.2; some images carry a newer qemu-utils from backports that conflicts
# with qemu-system 7.2, so qemu-utils is pinned to the qemu-system-x86 candidate version.
set -euo pipefail

packages=(
  # build
  build-essential pkg-config libvirt-dev libfuse3-dev
  # libvirt lab
  libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-guest-agent
  linux-image-amd64 busybox-static ovmf libnbd-bin jq e2fsprogs cpio xz-utils
  genisoimage virtnbdbackup python3-fuse
  # file-level restore (mount, files) and its lab disks: partitions, xfs, LVM metadata
  fdisk xfsprogs lvm2 acl attr
  # tests: share simulation, ssh appliance, misc tools
  fuse3 openssh-server openssh-client sqlite3 time python3 curl iproute2 util-linux
  # benches (benches/*.sh): arithmetic, profiles
  bc linux-perf
  # Bacula lab
  bacula-director bacula-director-sqlite3 bacula-sd bacula-fd bacula-console
  # packages (scripts/package.sh, scripts/test-package.sh): shlibdeps, rpm -qlp, man, the
  # status page in a headless browser
  dpkg-dev rpm man-db chromium
)

# benches/offsite.sh only (VMB_BENCH_DEPS=1): the baseline `zstd | openssl enc | aws s3 cp`.
# awscli is heavy (about 95 MB installed, with python3-botocore and python3-awscrt), so the
# test command does not install it.
if [ -n "${VMB_BENCH_DEPS:-}" ]; then
  packages+=(awscli zstd openssl)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
qemu_ver=""
if ! dpkg-query -W -f='${Status}' qemu-system-x86 2>/dev/null | grep -q "install ok installed"; then
  need_update=1
fi
if [ "${#missing[@]}" -gt 0 ] || [ -n "${need_update:-}" ]; then
  echo "install-deps: installing ${missing[*]}"
  apt-get update -qq
  qemu_ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    --allow-downgrades "qemu-utils=${qemu_ver}" "${missing[@]}" >/dev/null
fi
echo "install-deps: all packages present"

# The off-site tests' S3-compatible server (lab/s3-lab.sh): s3s-fs, built from crates.io once
# and cached (0.14.1: later versions need a newer rustc than this toolchain).
S3S_ROOT=/var/cache/vm-backup-lab/s3s-fs
if [ ! -x "$S3S_ROOT/bin/s3s-fs" ]; then
  echo "install-deps: building s3s-fs (about 4 minutes)"
  mkdir -p "$S3S_ROOT"
  PATH="$HOME/.cargo/bin:$PATH" cargo install s3s-fs@0.14.1 --features binary --locked \
    --root "$S3S_ROOT" --quiet
fi
echo "install-deps: s3s-fs present"
