#!/usr/bin/env bash
# Benchmark of the off-site copy, side by side in one run against the same S3 server (s3s-fs,
# lab/s3-lab.sh, an instance of its own on --port), on a full backup of the lab's agent guest:
#   (a) vm-backup offsite push <dom>          keyed 4 MiB chunks, SHA-256 checked, zstd -3,
#                                             AES-256-GCM, --workers uploads, into a fresh prefix
#   (b) zstd -3 -T0 | openssl enc -aes-256-ctr | aws s3 cp -   per file of the same backup
#       (`openssl enc` refuses AEAD ciphers such as GCM, hence CTR: no integrity, no dedup)
#   restore: (a) vm-backup offsite restore --as --disk-dir (every chunk checked, images
#   fsynced, domain defined, then undefined here) vs (b) aws s3 cp - | openssl enc -d | zstd -d
#   into files, then sync.
# Also the compression ratio on the guest's image (plain / stored bytes of the first push).
# Rounds alternate the order of (a) and (b); medians; ratios > 1 mean vm-backup is faster.
# SPDX-License-Identifier: AGPL-3.0-or-later
#
# Usage: benches/offsite.sh [--rounds N] [--prefix P] [--reuse] [--fill SIZE] [--port N]
#                           [--workers N] [--bin PATH]
#   --rounds N   rounds (default 3)
#   --prefix P   lab prefix (default vmbofs): domain P-agent
#   --reuse      use a running P-agent as it is (else: lab up P --only agent --fill SIZE)
#   --fill SIZE  random data on the guest's data disk when created (default 400M)
#   --port N     port of this benchmark's own s3s-fs (default 9434)
#   --workers N  vm-backup's upload/download threads (default 4)
#   --bin PATH   this vm-backup binary instead of building target/release/vm-backup
# Needs root, the libvirt lab, s3s-fs (scripts/install-deps.sh) and, for (b), awscli, zstd and
# openssl (VMB_BENCH_DEPS=1 scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export LIBVIRT_DEFAULT_URI=qemu:///system

rounds=3 prefix=vmbofs reuse="" fill=400M port=9434 workers=4 vmb=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --reuse) reuse=1; shift ;;
    --fill) fill=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    --bin) vmb=$(realpath "$2"); shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "bench: must run as root" >&2; exit 1; }
for t in aws zstd openssl; do
  command -v $t >/dev/null || { echo "bench: $t missing: VMB_BENCH_DEPS=1 scripts/install-deps.sh" >&2; exit 1; }
done
lab=$repo/lab/libvirt-lab.sh
dom=$prefix-agent
work=/var/lib/vm-backup-lab/bench-offsite/$prefix
s3root=/var/lib/vm-backup-lab/bench-offsite/$prefix-s3
now() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }
median() { sort -g | awk '{v[NR]=$1} END{if (NR==0) print "nan"; else if (NR%2) print v[(NR+1)/2]; else printf "%.3f\n", (v[NR/2]+v[NR/2+1])/2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{if (b+0 == 0 || a == "nan" || b == "nan") print "n/a"; else printf "%.2f", a/b}'; }
mbs() { awk -v b="$1" -v s="$2" 'BEGIN{if (s+0 == 0) print "n/a"; else printf "%.1f", b/1048576/s}'; }

s3() { VMB_LAB_ROOT=$s3root VMB_S3_PORT=$port "$repo/lab/s3-lab.sh" "$@"; }
cleanup() {
  virsh destroy "$dom-obench" >/dev/null 2>&1 || true
  virsh undefine "$dom-obench" --nvram >/dev/null 2>&1 || true
  s3 stop >/dev/null 2>&1 || true
  rm -rf "$work" "$s3root"
  [ -n "$reuse" ] || $lab down "$prefix" >/dev/null 2>&1 || true
}
trap cleanup EXIT

if [ -z "$vmb" ]; then
  cargo build --release --quiet --bin vm-backup
  vmb=$repo/target/release/vm-backup
fi
if [ -z "$reuse" ]; then
  $lab up "$prefix" --only agent --data-size "$(( ${fill%M} + 112 ))M" --fill "$fill" >/dev/null
fi
s3 start >/dev/null
eval "$(s3 env)"
export AWS_DEFAULT_REGION=us-east-1

rm -rf "$work"; mkdir -p "$work/target" "$work/restore"; chmod 755 "$work" "$work/restore"
conf=$work/vm-backup.conf
cat >"$conf" <<EOF
target = "$work/target"
hostname = "benchhost"
journal_dir = "$work/journal"
inventory = "$work/vm-list.yaml"
[offsite]
endpoint = "$VMB_S3_ENDPOINT"
bucket = "$VMB_S3_BUCKET"
key_file = "$work/offsite.key"
workers = $workers
EOF
"$vmb" init --config "$conf" >/dev/null
"$vmb" key create --config "$conf" >/dev/null
"$vmb" backup "$dom" --level full --config "$conf" >/dev/null
backup=$(ls -d "$work/target/benchhost/$dom"/2*)
mapfile -t files < <(cd "$backup" && ls)
bytes=$(cd "$backup" && du -cb --apparent-size "${files[@]}" | tail -1 | cut -f1)
echo "bench: backup $backup: ${#files[@]} files, $((bytes >> 20)) MiB; $rounds rounds; vm-backup $workers workers"
pass=bench-$RANDOM$RANDOM

push_a() { # round
  "$vmb" offsite push "$dom" --prefix "a$1" --config "$conf" --json >"$work/push-a$1.json"
}
push_b() {
  for f in "${files[@]}"; do
    zstd -3 -T0 -q -c "$backup/$f" | openssl enc -aes-256-ctr -pbkdf2 -pass "pass:$pass" \
      | aws s3 cp --quiet --endpoint-url "$VMB_S3_ENDPOINT" - "s3://$VMB_S3_BUCKET/b$1/$f"
  done
}
restore_a() {
  "$vmb" offsite restore "$dom" latest --prefix "a$1" --as "$dom-obench" \
    --disk-dir "$work/restore/a$1" --config "$conf" >/dev/null
  virsh undefine "$dom-obench" --nvram >/dev/null
}
restore_b() {
  mkdir -p "$work/restore/b$1"
  for f in "${files[@]}"; do
    aws s3 cp --quiet --endpoint-url "$VMB_S3_ENDPOINT" "s3://$VMB_S3_BUCKET/b$1/$f" - \
      | openssl enc -d -aes-256-ctr -pbkdf2 -pass "pass:$pass" | zstd -d -q -c >"$work/restore/b$1/$f"
  done
  sync -f "$work/restore/b$1"
}
timed() { # name round -> seconds on stdout
  local t0; t0=$(now); "$1" "$2"; sub "$t0" "$(now)"
}

declare -a pa pb ra rb
for r in $(seq 1 "$rounds"); do
  sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
  if [ $((r % 2)) -eq 1 ]; then
    pa+=("$(timed push_a "$r")"); pb+=("$(timed push_b "$r")")
    ra+=("$(timed restore_a "$r")"); rb+=("$(timed restore_b "$r")")
  else
    pb+=("$(timed push_b "$r")"); pa+=("$(timed push_a "$r")")
    rb+=("$(timed restore_b "$r")"); ra+=("$(timed restore_a "$r")")
  fi
  # The restored images hold the backup's data, both ways ((a) drops the checkpoint bitmaps
  # from the qcow2 header, so the guest data is compared, not the bytes).
  img=$(jq -r '.disks[0].file' "$backup/backup-metadata.json")
  cmp -s "$backup/$img" "$work/restore/b$r/$img" || { echo "bench: (b) restore differs" >&2; exit 1; }
  qemu-img compare -q "$backup/$img" "$work/restore/a$r/$dom-obench-vda.qcow2" \
    || { echo "bench: (a) restore differs" >&2; exit 1; }
  echo "bench: round $r: push a ${pa[-1]} s, b ${pb[-1]} s; restore a ${ra[-1]} s, b ${rb[-1]} s"
  rm -rf "$work/restore/a$r" "$work/restore/b$r"
done

plain=$(jq '[.backups[].uploaded_plain_bytes] | add' "$work/push-a1.json")
stored=$(jq '[.backups[].uploaded_stored_bytes] | add' "$work/push-a1.json")
stored_b=$(du -cb "$VMB_S3_DATA/b1" | tail -1 | cut -f1)
ma=$(printf '%s\n' "${pa[@]}" | median); mb=$(printf '%s\n' "${pb[@]}" | median)
mra=$(printf '%s\n' "${ra[@]}" | median); mrb=$(printf '%s\n' "${rb[@]}" | median)
cat <<EOF

| ($rounds rounds, median) | vm-backup offsite | zstd, openssl enc, aws s3 cp | ratio (b / a) |
| --- | --- | --- | --- |
| push of $((bytes >> 20)) MiB | $ma s ($(mbs "$bytes" "$ma") MiB/s) | $mb s ($(mbs "$bytes" "$mb") MiB/s) | $(ratio "$mb" "$ma") |
| restore | $mra s ($(mbs "$bytes" "$mra") MiB/s) | $mrb s ($(mbs "$bytes" "$mrb") MiB/s) | $(ratio "$mrb" "$mra") |
| stored bytes | $stored (of $plain non-zero chunk bytes: $(ratio "$plain" "$stored"):1) | $stored_b ($(ratio "$bytes" "$stored_b"):1 of the files) | |
EOF
