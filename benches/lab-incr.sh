#!/usr/bin/env bash
# Benchmark of incremental backups on the lab's agent guest, side by side with virtnbdbackup in
# the same run, at several data-disk sizes with the same amount of data changed:
#   for each SIZE: a data disk of SIZE (sparse qcow2, written once fully with random data), then
#   (a) vm-backup backup --level full, CHANGE of random data written in the guest,
#       vm-backup backup --level incremental      (its job time: the metadata's snapshot phase)
#   (c) virtnbdbackup -l full, CHANGE written again, virtnbdbackup -l inc   (same guest)
# and prints the times and the ratios incremental ÷ full. The job time of (a)'s incremental at
# each size shows whether finding the changed extents grows with the disk (push mode: QEMU walks
# the bitmap inside the job; there is no separate "map" step).
# SPDX-License-Identifier: AGPL-3.0-or-later
#
# Usage: benches/lab-incr.sh [--sizes "1G 2G 4G"] [--change 102M] [--prefix P] [--bin PATH]
#   --sizes   data-disk sizes, each filled completely (default "2G 1G 4G")
#   --change  data rewritten in the guest before each incremental (default 102M: 5 % of 2 GiB)
#   --prefix  lab prefix (default inc; the domain P-agent is recreated for each size)
#   --bin     the vm-backup binary (default target/debug/vm-backup, built if missing)
# Needs root, the libvirt lab (lab/libvirt-lab.sh), virtnbdbackup, jq.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export LIBVIRT_DEFAULT_URI=qemu:///system

sizes="2G 1G 4G" change=102M prefix=inc vmb=""
while [ $# -gt 0 ]; do
  case "$1" in
    --sizes) sizes=$2; shift 2 ;;
    --change) change=$2; shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --bin) vmb=$(realpath "$2"); shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "bench: must run as root" >&2; exit 1; }
if [ -z "$vmb" ]; then
  cargo build --quiet --bin vm-backup
  vmb=$repo/target/debug/vm-backup
fi
lab=$repo/lab/libvirt-lab.sh
dom=$prefix-agent
out=/var/lib/vm-backup-lab/bench-target/$prefix
change_mb=$(( $(numfmt --from=iec "$change") / 1048576 ))
now() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{if (b+0 == 0) print "n/a"; else printf "%.3f", a/b}'; }

cleanup() {
  for c in $(virsh checkpoint-list "$dom" --name 2>/dev/null); do
    virsh checkpoint-delete "$dom" "$c" >/dev/null 2>&1 \
      || virsh checkpoint-delete "$dom" "$c" --metadata >/dev/null 2>&1 || true
  done
  rm -rf "$out"
  $lab down "$prefix" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# Rewrites CHANGE of the guest's fill file in place at offset SKIP MiB (random data, synced).
rewrite() {
  $lab gexec "$dom" "dd if=/dev/urandom of=/mnt/data/fill.bin bs=1M count=$change_mb seek=$1 conv=notrunc,fsync 2>/dev/null; sync" 300 >/dev/null
}

results=()
for size in $sizes; do
  cleanup
  size_mb=$(( $(numfmt --from=iec "$size") / 1048576 ))
  $lab up "$prefix" --only agent --data-size "$(( size_mb + 200 ))M" --fill "$size" >/dev/null
  $lab wait-agent "$dom" 120 >/dev/null
  mkdir -p "$out/a"
  chmod 755 "$out" "$out/a"
  "$vmb" init --target "$out/a" >/dev/null
  sync

  t=$(now); "$vmb" backup "$dom" --target "$out/a" --level full >"$out/a-full.log" 2>&1 || { tail "$out/a-full.log" >&2; exit 1; }
  a_full=$(sub "$t" "$(now)")
  rewrite $(( size_mb / 4 )); sync
  t=$(now); "$vmb" backup "$dom" --target "$out/a" --level incremental >"$out/a-inc.log" 2>&1 || { tail "$out/a-inc.log" >&2; exit 1; }
  a_inc=$(sub "$t" "$(now)")
  inc_md=$(ls -d "$out"/a/*/"$dom"/*/ | sort | tail -n 1)/backup-metadata.json
  level=$(jq -r '.level' "$inc_md")
  [ "$level" = incremental ] || { echo "bench: the incremental ran as $level: $(jq -r .level_note "$inc_md")" >&2; exit 1; }
  a_job=$(jq -r '.phases.snapshot // "nan"' "$inc_md")
  a_bytes=$(jq -r '[.disks[].file_size] | add' "$inc_md")
  # Our checkpoints out of the way of virtnbdbackup's (it starts its own chain).
  for c in $(virsh checkpoint-list "$dom" --name); do virsh checkpoint-delete "$dom" "$c" >/dev/null; done

  sync
  t=$(now); virtnbdbackup -d "$dom" -l full -o "$out/c" >"$out/c-full.log" 2>&1 || { tail -n 20 "$out/c-full.log" >&2; exit 1; }
  sync -f "$out/c"; c_full=$(sub "$t" "$(now)")
  rewrite $(( size_mb / 2 )); sync
  t=$(now); virtnbdbackup -d "$dom" -l inc -o "$out/c" >"$out/c-inc.log" 2>&1 || { tail -n 20 "$out/c-inc.log" >&2; exit 1; }
  sync -f "$out/c"; c_inc=$(sub "$t" "$(now)")

  line=$(printf '%-5s full %7.2f s  inc %6.2f s (job %5.2f s, %s)  ratio %s | virtnbdbackup full %7.2f s  inc %6.2f s  ratio %s | inc (a)/(c) %s' \
    "$size" "$a_full" "$a_inc" "$a_job" "$(numfmt --to=iec "$a_bytes")" "$(ratio "$a_inc" "$a_full")" \
    "$c_full" "$c_inc" "$(ratio "$c_inc" "$c_full")" "$(ratio "$a_inc" "$c_inc")")
  echo "$line"
  results+=("$line")
done
echo
echo "== $change changed before each incremental; $(nproc) cores, TCG guest, $(basename "$vmb") $("$vmb" --version 2>/dev/null | head -n 1)"
printf '%s\n' "${results[@]}"
