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
#
# Instant restore: scripts/bench-file-restore.sh --instant CONFIG VM STAMP NAME DISK-DIR
#   prints the time from `vm-backup restore --instant --as NAME-i` to the guest agent answering
#   (and to the command's end: disks moved), beside `vm-backup restore --as NAME-f --start`
#   (copy, verify, define, start) to the agent answering, for the same backup; both domains
#   are destroyed and undefined afterwards, their disks removed.
set -euo pipefail
if [ "${1:-}" = --instant ]; then
  shift
  conf=$1 vm=$2 stamp=$3 name=$4 ddir=$5
  vmb=${VMB:-$(dirname "$0")/../target/debug/vm-backup}
  export LIBVIRT_DEFAULT_URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
  secs() { python3 -c 'import time; print(time.time())'; }
  wait_agent() { # DOM T0: seconds from T0 until guest-ping answers (bound 600 s)
    local end=$(( $(date +%s) + 600 ))
    until virsh qemu-agent-command "$1" '{"execute":"guest-ping"}' --timeout 2 >/dev/null 2>&1; do
      [ "$(date +%s)" -lt "$end" ] || { echo "agent of $1 silent after 600 s" >&2; return 1; }
      sleep 0.2
    done
    python3 -c "import time; print(round(time.time()-$2,1))"
  }
  gone() { virsh destroy "$1" >/dev/null 2>&1 || true; virsh undefine "$1" --nvram >/dev/null 2>&1 || virsh undefine "$1" >/dev/null 2>&1 || true; }
  trap 'gone "$name-i"; gone "$name-f"; rm -rf "$ddir/i" "$ddir/f"' EXIT
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  t0=$(secs)
  ( "$vmb" restore --config "$conf" "$vm" "$stamp" --instant --as "$name-i" --disk-dir "$ddir/i" >/dev/null 2>"$ddir/instant.log" && secs > "$ddir/instant.end" ) &
  pid=$!
  until virsh domstate "$name-i" 2>/dev/null | grep -q running; do
    kill -0 "$pid" 2>/dev/null || { cat "$ddir/instant.log" >&2; exit 1; }
    sleep 0.1
  done
  a=$(wait_agent "$name-i" "$t0")
  wait "$pid"; t1=$(cat "$ddir/instant.end")
  echo "restore --instant: agent answers after $a s; command done (disks local, backup verified) after $(python3 -c "print(round($t1-$t0,1))") s"
  gone "$name-i"
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  t0=$(secs)
  "$vmb" restore --config "$conf" "$vm" "$stamp" --as "$name-f" --disk-dir "$ddir/f" --start >/dev/null 2>&1
  t1=$(secs)
  a=$(wait_agent "$name-f" "$t0")
  echo "restore --as + start: command done after $(python3 -c "print(round($t1-$t0,1))") s; agent answers after $a s"
  exit 0
fi
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
