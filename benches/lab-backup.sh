#!/usr/bin/env bash
# Benchmark: a whole live backup of the lab's agent guest with a ~1 GiB data disk, side by side,
# interleaved, several rounds, medians and ratios:
#   (a) vm-backup backup <dom> --target DIR          (this project)
#   (b) the reference site's script: quiesced external snapshot (virsh snapshot-create-as
#       --disk-only --atomic --no-metadata --quiesce), cp --sparse=always of the base, sha256sum,
#       virsh blockcommit --active --pivot --wait, rm overlay
#   (c) virtnbdbackup -l copy (Debian package; NBD pull backup)
# Every method's output is flushed (sync -f) inside its timing, as vm-backup syncs its files; the
# page cache is dropped before every method (the base is read from the disk), and the write limit
# of the target's filesystem is measured every round, for the issue's bound
# (allocated ÷ write limit) + 0.5 s.
# SPDX-License-Identifier: AGPL-3.0-or-later
#
# With --guest multi --disk-parallel 1,2: the lab's three-disk guest (vda qcow2, vdb qcow2 on a
# backing file, vdc raw; SIZE of random data in each), (a) once per concurrency, interleaved:
# the disks copied one after the other (a1) and two at a time (a2), with the peak RSS of each.
#
# Usage: benches/lab-backup.sh [--rounds N] [--fill SIZE] [--prefix P] [--methods a,b,c] [--reuse] [--keep]
#                              [--guest agent|multi] [--disk-parallel N[,N...]]
#   --rounds N     rounds (default 3); the order of the methods rotates every round
#   --fill SIZE    random data on the guest's data disk (default 1000M; disk is SIZE+200M); multi:
#                  on each of its three disks
#   --guest G      agent (default; one data disk) or multi (three disks; only (a) runs)
#   --disk-parallel LIST  run (a) once per value (methods a1, a2, ...): `--disk-parallel N`
#   --prefix P     lab prefix (default vmbbench): domain P-agent, disks in /var/lib/vm-backup-lab/P
#   --methods      subset to run (default a,b,c; (a) is skipped when vm-backup cannot back up yet)
#   --reuse        keep an existing P-agent domain instead of recreating it
#   --keep         leave the domain and the last backups in place at the end
#   --bin PATH     use this vm-backup binary instead of building target/release/vm-backup
# Needs root, the libvirt lab (lab/libvirt-lab.sh) and cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export LIBVIRT_DEFAULT_URI=qemu:///system

rounds=3 fill=1000M prefix=vmbbench methods=a,b,c reuse="" keep="" vmb="" guest=agent parallel=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --fill) fill=$2; shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --methods) methods=$2; shift 2 ;;
    --reuse) reuse=1; shift ;;
    --keep) keep=1; shift ;;
    --bin) vmb=$(realpath "$2"); shift 2 ;;
    --guest) guest=$2; shift 2 ;;
    --disk-parallel) parallel=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "bench: must run as root" >&2; exit 1; }
case "$guest" in agent|multi) ;; *) echo "unknown guest $guest" >&2; exit 2 ;; esac
[ "$guest" = agent ] || methods=a   # (b) and (c) know the one-disk guest only
lab=$repo/lab/libvirt-lab.sh
dom=$prefix-$guest
labdir=$($lab dir "$prefix")
out=/var/lib/vm-backup-lab/bench-target/$prefix
now() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }
median() { sort -g | awk '{v[NR]=$1} END{if (NR==0) print "nan"; else if (NR%2) print v[(NR+1)/2]; else printf "%.3f\n", (v[NR/2]+v[NR/2+1])/2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{if (b+0 == 0 || a == "nan" || b == "nan") print "n/a"; else printf "%.2f", a/b}'; }

cleanup() {
  # Never leave the guest on an overlay or frozen, whatever failed.
  virsh domfsthaw "$dom" >/dev/null 2>&1 || true
  if virsh domblklist "$dom" 2>/dev/null | grep -q 'agent-vda.bench.qcow2'; then
    virsh blockcommit "$dom" vda --active --pivot --wait >/dev/null 2>&1 || true
  fi
  rm -f "$labdir/agent-vda.bench.qcow2"
  if [ -z "$keep" ]; then
    rm -rf "$out"
    $lab down "$prefix" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

if [ -n "$reuse" ] && [ "$(virsh domstate "$dom" 2>/dev/null)" = running ]; then
  echo "bench: reusing $dom"
else
  size_mb=$(( $(numfmt --from=iec "$fill") / 1048576 + 200 ))
  $lab up "$prefix" --only "$guest" --data-size "${size_mb}M" --fill "$fill"
fi
$lab wait-agent "$dom" 60 >/dev/null
base=$labdir/agent-vda.qcow2
mkdir -p "$out"
if [ "$guest" = agent ]; then
  alloc=$(qemu-img info -U --output=json "$base" | jq '.["actual-size"]')
  echo "bench: $dom, data disk $base: $(numfmt --to=iec "$alloc") allocated"
else
  alloc=0
  for f in multi-vda.qcow2 multi-vdb.qcow2 multi-vdb-base.qcow2 multi-vdc.raw; do
    alloc=$(( alloc + $(stat -c '%b * %B' "$labdir/$f") ))
  done
  echo "bench: $dom, three disks (vdb on a backing file): $(numfmt --to=iec "$alloc") allocated"
fi
# The disks the guest runs on: the same after every method.
disks_of() { virsh domblklist "$dom" --details | awk '$2 == "disk" {print $3, $4}'; }
disks_before=$(disks_of)

have_a=""
if [[ ",$methods," == *",a,"* ]]; then
  if [ -z "$vmb" ]; then
    echo "bench: building vm-backup (release)"
    cargo build --release --quiet --bin vm-backup
    vmb=$repo/target/release/vm-backup
  fi
  rm -rf "$out/probe"; mkdir -p "$out/probe"
  # Targets must be initialised (`vm-backup init`) before a backup is written into them.
  "$vmb" init --target "$out/probe" >/dev/null 2>&1 || true
  rc=0; "$vmb" backup "$dom" --target "$out/probe" >"$out/probe.log" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ] || [ "$rc" -eq 3 ]; then
    have_a=1
  else
    echo "bench: (a) skipped: 'vm-backup backup $dom --target DIR' does not work yet: $(tail -n 1 "$out/probe.log")"
  fi
  rm -rf "$out/probe" "$out/probe.log"
fi

# run_a [N]: vm-backup backup, with --disk-parallel N when given; peak RSS into $rss (KiB).
run_a() {
  local d=$out/a; rm -rf "$d"; mkdir -p "$d"
  "$vmb" init --target "$d" > /dev/null
  local rc=0
  /usr/bin/time -f %M -o "$out/a.rss" "$vmb" backup "$dom" --target "$d" ${1:+--disk-parallel "$1"} \
    > "$out/a.log" 2>&1 || rc=$?
  rss=$(tail -n 1 "$out/a.rss")
  # 0 = success, 3 = completed with a post-check warning (still a whole backup).
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then cat "$out/a.log" >&2; return 1; fi
  frozen=$(find "$d" -name backup-metadata.json -exec jq -r '.frozen_ms // "nan" | if type == "number" then round else . end' {} + | head -n 1)
  copy=$(find "$d" -name backup-metadata.json -exec jq -r '.phases.copy // "nan"' {} + | head -n 1)
}

run_b() {
  local d=$out/b ov=$labdir/agent-vda.bench.qcow2 t
  rm -rf "$d"; mkdir -p "$d"
  t=$(now)
  virsh snapshot-create-as "$dom" --name bench --disk-only --atomic --no-metadata --quiesce \
    --diskspec "vda,file=$ov,snapshot=external" >/dev/null
  frozen=$(awk -v s="$(sub "$t" "$(now)")" 'BEGIN{printf "%.0f", s*1000}')   # upper bound: the whole command
  cp --sparse=always "$base" "$d/"
  (cd "$d" && sha256sum agent-vda.qcow2 > checksums.sha256)
  sync -f "$d/agent-vda.qcow2"
  virsh blockcommit "$dom" vda --active --pivot --wait >/dev/null
  rm -f "$ov"
}

run_c() {
  local d=$out/c; rm -rf "$d"
  virtnbdbackup -d "$dom" -l copy -o "$d" > "$out/c.log" 2>&1 || { tail -n 20 "$out/c.log" >&2; return 1; }
  sync -f "$d"/vda.copy.data
  frozen=nan
}

# The write limit of the target's filesystem in the same rounds: 512 MiB of random data from
# memory, written and fsynced (what a backup's copy must at least pay), in MiB/s.
wsrc=/dev/shm/vmb-bench-write.bin
head -c 512M /dev/urandom > "$wsrc"
write_limit() {
  sync; echo 3 > /proc/sys/vm/drop_caches
  local t s; t=$(now)
  dd if="$wsrc" of="$out/w.bin" bs=1M conv=fsync status=none
  s=$(sub "$t" "$(now)"); rm -f "$out/w.bin"
  awk -v s="$s" 'BEGIN{printf "%.1f", 512/s}'
}

declare -A times frozens rsss copies
writes=""
order=(a b c)
if [ -n "$parallel" ]; then
  order=()
  for n in ${parallel//,/ }; do order+=("a$n"); done
  [ "$guest" = agent ] && order+=(b c)
fi
methods_order=("${order[@]}")
for r in $(seq 1 "$rounds"); do
  line="round $r:"
  for m in "${order[@]}"; do
    [[ ",$methods," == *",${m:0:1},"* ]] || continue
    [ "${m:0:1}" = a ] && [ -z "$have_a" ] && continue
    # Every method reads the base from the disk, not from this host's page cache.
    sync; echo 3 > /proc/sys/vm/drop_caches
    frozen=nan rss=nan copy=nan
    t=$(now)
    if [ "${m:0:1}" = a ]; then run_a "${m:1}"; else "run_$m"; fi
    s=$(sub "$t" "$(now)")
    times[$m]+="$s "
    frozens[$m]+="$frozen "
    rsss[$m]+="$rss "
    copies[$m]+="$copy "
    line+=" ($m) ${s}s"; [ "$copy" = nan ] || line+=" [copy ${copy}s]"
    # The guest must be back on its base images after every method.
    now_disks=$(disks_of)
    [ "$now_disks" = "$disks_before" ] \
      || { echo "bench: $dom not on its images after ($m):" >&2; echo "$now_disks" >&2; exit 1; }
  done
  w=$(write_limit); writes+="$w "
  echo "$line  write limit ${w} MiB/s"
  order=("${order[@]:1}" "${order[0]}")
done

med() { { tr ' ' '\n' <<<"${times[$1]:-}" | grep . || true; } | median; }
echo
echo "== medians over $rounds rounds ($(numfmt --to=iec "$alloc") allocated, $(nproc) cores, TCG guest)"
declare -A M
for m in "${methods_order[@]}"; do
  [ -n "${times[$m]:-}" ] || continue
  M[$m]=$(med "$m")
  fz=$( { tr ' ' '\n' <<<"${frozens[$m]}" | grep -v '^nan$' | grep . || true; } | median)
  mbs=$(awk -v b="$alloc" -v s="${M[$m]}" 'BEGIN{printf "%.0f", b/1048576/s}')
  cp_med=$( { tr ' ' '\n' <<<"${copies[$m]}" | grep -v '^nan$' | grep . || true; } | median)
  peak=$( { tr ' ' '\n' <<<"${rsss[$m]}" | grep -v '^nan$' | grep . || true; } | sort -g | tail -n 1)
  case $m in
    a) label="vm-backup backup" ;;
    a*) label="vm-backup backup --disk-parallel ${m:1}" ;;
    b) label="reference (snapshot+cp+sha256sum+blockcommit)" ;;
    c) label="virtnbdbackup -l copy" ;;
  esac
  printf '(%s) %-48s median %8.3f s  %5s MiB/s  frozen window %s%s\n' "$m" "$label" "${M[$m]}" "$mbs" \
    "$( [ "$fz" = nan ] && echo n/a || echo "$fz ms" )" "${peak:+  peak RSS $peak KiB}"
  [ "$cp_med" = nan ] || printf '    copy phase (metadata phases.copy) median %.3f s  %s MiB/s\n' "$cp_med" \
    "$(awk -v b="$alloc" -v s="$cp_med" 'BEGIN{printf "%.0f", b/1048576/s}')"
done
if [ -n "$parallel" ]; then
  first=${methods_order[0]}
  for m in "${methods_order[@]:1}"; do
    [[ $m == a* ]] && [ -n "${M[$m]:-}" ] && [ -n "${M[$first]:-}" ] \
      && echo "ratio ($first)/($m) = $(ratio "${M[$first]}" "${M[$m]}") whole backup, $(ratio \
        "$( { tr ' ' '\n' <<<"${copies[$first]}" | grep -v '^nan$' | grep . || true; } | median)" \
        "$( { tr ' ' '\n' <<<"${copies[$m]}" | grep -v '^nan$' | grep . || true; } | median)") copy phase  (> 1: ($m) is faster)"
  done
  M[a]=${M[$first]:-}
fi
[ -n "${M[a]:-}" ] && [ -n "${M[b]:-}" ] && echo "ratio (a)/(b) = $(ratio "${M[a]}" "${M[b]}")"
[ -n "${M[a]:-}" ] && [ -n "${M[c]:-}" ] && echo "ratio (a)/(c) = $(ratio "${M[a]}" "${M[c]}")"
[ -n "${M[b]:-}" ] && [ -n "${M[c]:-}" ] && echo "ratio (c)/(b) = $(ratio "${M[c]}" "${M[b]}")"
wl=$( { tr ' ' '\n' <<<"$writes" | grep . || true; } | median)
rm -f "$wsrc"
if [ -n "${M[a]:-}" ]; then
  # The issue's bound: (allocated bytes / write limit) + 0.5 s; (a) should stay within 1.3 x of it.
  floor=$(awk -v b="$alloc" -v w="$wl" 'BEGIN{printf "%.3f", b/1048576/w + 0.5}')
  echo "write limit $wl MiB/s: (allocated / write limit) + 0.5 s = $floor s; (a) / that = $(ratio "${M[a]}" "$floor")"
fi
echo "(b)'s frozen window is the whole snapshot-create-as --quiesce command (an upper bound)."
echo "guest writer after all rounds: $($lab seq-check "$dom" | tail -n 1)"
