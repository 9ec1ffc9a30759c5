#!/usr/bin/env bash
# Benchmark of file-level restore (not a timed test): for one backup disk image and one file
# in it, prints
#   - the time from `vm-backup files ... ls DIR` to its first line (verify-on-read),
#   - the time a verify-the-whole-image-first design would add (`vm-backup verify-file`),
#   - the extract throughput of `vm-backup files ... extract FILE` (every chunk verified),
#   - the same file by `qemu-img convert` + loop mount + `cp` (no verification),
#   - with libguestfs when BENCH_LIBGUESTFS=1 and installed (`guestfish --ro -i`, `virt-copy-out`).
# The backup file is dropped from the page cache (posix_fadvise) before each run.
# Usage (root): scripts/bench-file-restore.sh CONFIG VM STAMP DISK-IMAGE DIR-IN-FS FILE-IN-FS
set -euo pipefail
conf=$1 vm=$2 stamp=$3 image=$4 dir=$5 file=$6
vmb=${VMB:-$(dirname "$0")/../target/debug/vm-backup}
work=$(mktemp -d /var/tmp/vmb-bench-files.XXXXXX)
trap 'umount "$work/m" 2>/dev/null || true; rm -rf "$work"' EXIT
uncache() { python3 -c "import os,sys; fd=os.open(sys.argv[1],os.O_RDONLY); os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED)" "$1"; }
secs() { python3 -c 'import time; print(time.time())'; }
size=$(stat -c %s "$image")
echo "image: $image ($((size >> 20)) MiB)"

uncache "$image"
t0=$(secs)
"$vmb" files --config "$conf" "$vm" "$stamp" ls "$dir" | { read -r first; t1=$(secs); echo "first line after $(python3 -c "print(round($t1-$t0,2))") s: $first"; cat >/dev/null; }
t2=$(secs); echo "whole ls command: $(python3 -c "print(round($t2-$t0,2))") s"

meta=$(dirname "$image")/backup-metadata.json
python3 -c "import json,sys,os; m=json.load(open(sys.argv[1])); d=[d for d in m['disks'] if d['file']==os.path.basename(sys.argv[2])][0]; json.dump(d['manifest'],open(sys.argv[3],'w'))" "$meta" "$image" "$work/manifest.json"
uncache "$image"
t0=$(secs); "$vmb" verify-file --manifest "$work/manifest.json" "$image" >/dev/null; t1=$(secs)
echo "verify the whole image first: $(python3 -c "print(round($t1-$t0,2))") s"

uncache "$image"
mkdir "$work/out"
t0=$(secs); "$vmb" files --config "$conf" "$vm" "$stamp" extract "$file" "$work/out" >/dev/null; t1=$(secs)
bytes=$(stat -c %s "$work/out/$(basename "$file")")
echo "files extract: $((bytes >> 20)) MiB in $(python3 -c "print(round($t1-$t0,2))") s = $(python3 -c "print(round($bytes/($t1-$t0)/1048576))") MiB/s"
rm -rf "$work/out"

uncache "$image"
mkdir "$work/m" "$work/out"
t0=$(secs)
qemu-img convert -O raw "$image" "$work/disk.raw"
loop=$(losetup -f --show -r "$work/disk.raw")
mount -o ro,noload "$loop" "$work/m"
cp -a "$work/m/$file" "$work/out/"
t1=$(secs)
umount "$work/m"; losetup -d "$loop"
echo "qemu-img convert + loop mount + cp: $((bytes >> 20)) MiB in $(python3 -c "print(round($t1-$t0,2))") s = $(python3 -c "print(round($bytes/($t1-$t0)/1048576))") MiB/s (no verification; a full raw copy of the disk first)"
rm -rf "$work/out" "$work/disk.raw"

if [ "${BENCH_LIBGUESTFS:-0}" = 1 ] && command -v guestfish >/dev/null; then
  uncache "$image"
  t0=$(secs)
  guestfish --ro -a "$image" -i ls "$dir" | { read -r first; t1=$(secs); echo "guestfish first line after $(python3 -c "print(round($t1-$t0,2))") s: $first"; cat >/dev/null; }
  uncache "$image"
  mkdir "$work/out"
  t0=$(secs); virt-copy-out -a "$image" "$file" "$work/out"; t1=$(secs)
  echo "virt-copy-out: $((bytes >> 20)) MiB in $(python3 -c "print(round($t1-$t0,2))") s = $(python3 -c "print(round($bytes/($t1-$t0)/1048576))") MiB/s"
fi
