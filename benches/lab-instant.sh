#!/usr/bin/env bash
# Benchmark of instant restore on the lab (not a timed test: figures side by side in one run).
# For one full backup of the lab's agent guest, ROUNDS times, in alternating order:
#   (i) `vm-backup restore --instant --as P-bi`: seconds from the command to the guest agent
#       answering, to the domain started (the engine's `started_after_seconds`), and the block
#       copy's seconds (`copy_seconds`), every read through the verify-on-read layer;
#   (u) the same with VMB_BENCH_INSTANT_UNVERIFIED=1 (the backup served directly): the block
#       copy without the layer, for its cost;
#   (s) `vm-backup restore --as P-bs --start` (copy, check, define, start): seconds from the
#       command to the guest agent answering.
# Prints each run ("command": the restore command's own time; for --instant the disks are
# local and standalone then) and the medians with the ratios (s)/(i) for the agent, (i)/(u)
# for the copy.
# The page cache is dropped before each run. Domains, disks and the scratch folder are removed.
# Usage (root): benches/lab-instant.sh [PREFIX] [ROUNDS] [FILL]   (defaults: bi 3 200M)
#   PREFIX's agent guest is brought up with --data-size 512M --fill FILL (lab/libvirt-lab.sh)
#   and taken down at the end unless KEEP_LAB=1.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${1:-bi} rounds=${2:-3} fill=${3:-200M}
vmb=${VMB:-$PWD/target/debug/vm-backup}
export LIBVIRT_DEFAULT_URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
# The (u) runs need the hook, which only a `bench-unverified` build honours (a production
# binary ignores VMB_BENCH_INSTANT_UNVERIFIED); a binary given in VMB must have been built so.
[ -n "${VMB:-}" ] || cargo build --features bench-unverified --bin vm-backup
work=/var/tmp/vmb-bench-instant-$prefix
src=$prefix-agent

gone() { virsh destroy "$1" >/dev/null 2>&1 || true; virsh undefine "$1" --nvram >/dev/null 2>&1 || virsh undefine "$1" >/dev/null 2>&1 || true; }
cleanup() {
  gone "$prefix-bi"; gone "$prefix-bs"
  "$vmb" orphans --config "$work/vm-backup.conf" --cleanup >/dev/null 2>&1 || true
  rm -rf "$work"
  [ "${KEEP_LAB:-0}" = 1 ] || lab/libvirt-lab.sh down "$prefix" >/dev/null 2>&1 || true
}
trap cleanup EXIT

lab/libvirt-lab.sh daemons >/dev/null
lab/libvirt-lab.sh up "$prefix" --only agent --data-size 512M --fill "$fill" >/dev/null
rm -rf "$work"; mkdir -p "$work/target"; chmod 755 "$work"
cat > "$work/vm-backup.conf" <<EOF
target = "$work/target"
hostname = "benchhost"
journal_dir = "$work/journal"
inventory = "$work/vm-list.yaml"
EOF
conf=$work/vm-backup.conf
"$vmb" init --config "$conf" >/dev/null
"$vmb" backup --config "$conf" "$src" >/dev/null 2>&1
stamp=$(ls "$work/target/benchhost/$src" | grep -v partial | tail -1)
img=$(ls "$work/target/benchhost/$src/$stamp/"*vda*)
echo "backup $stamp of $src: $(( $(stat -c %s "$img") >> 20 )) MiB image, $(qemu-img info --output=json "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"]>>20)') MiB virtual; host $(nproc) cores, TCG guest"

now() { python3 -c 'import time; print(time.time())'; }
since() { python3 -c "import time; print(round(time.time()-$1,2))"; }
uncache() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
wait_agent() { # DOM: until guest-ping answers (bound 600 s)
  local end=$(( $(date +%s) + 600 ))
  until virsh qemu-agent-command "$1" '{"execute":"guest-ping"}' --timeout 2 >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || { echo "agent of $1 silent after 600 s" >&2; return 1; }
    sleep 0.1
  done
}

instant() { # MODE (i|u): prints "agent started copy total"
  local mode=$1 dom=$prefix-bi out=$work/run
  rm -rf "$out"; mkdir -p "$out"
  uncache
  local t0; t0=$(now)
  ( if [ "$mode" = u ]; then export VMB_BENCH_INSTANT_UNVERIFIED=1; fi
    "$vmb" restore --config "$conf" "$src" "$stamp" --instant --as "$dom" --disk-dir "$out/d" \
      --json >"$out/out.json" 2>"$out/err.log"; echo $? > "$out/rc"; now > "$out/end" ) &
  local pid=$!
  until virsh domstate "$dom" 2>/dev/null | grep -q running; do
    kill -0 "$pid" 2>/dev/null || { cat "$out/err.log" >&2; return 1; }
    sleep 0.05
  done
  wait_agent "$dom"; local agent; agent=$(since "$t0")
  wait "$pid"; local total; total=$(python3 -c "print(round($(cat "$out/end")-$t0,2))")
  [ "$(cat "$out/rc")" = 0 ] || { cat "$out/err.log" >&2; return 1; }
  if [ "$mode" = u ] && ! grep -q "WITHOUT the verify-on-read" "$out/err.log"; then
    echo "lab-instant: $vmb did not serve unverified (build it with --features bench-unverified)" >&2
    cat "$out/err.log" >&2; return 1
  fi
  python3 - "$out/out.json" "$agent" "$total" <<'PY'
import json, sys
o = json.load(open(sys.argv[1]))
print(sys.argv[2], round(o["started_after_seconds"], 2), round(o["copy_seconds"], 2), sys.argv[3])
PY
  gone "$dom"; rm -rf "$out"
}

start() { # prints "agent total"
  local dom=$prefix-bs out=$work/run
  rm -rf "$out"; mkdir -p "$out"
  uncache
  local t0; t0=$(now)
  "$vmb" restore --config "$conf" "$src" "$stamp" --as "$dom" --disk-dir "$out/d" --start >/dev/null 2>"$out/err.log" \
    || { cat "$out/err.log" >&2; return 1; }
  local total; total=$(since "$t0")
  wait_agent "$dom"
  echo "$(since "$t0") $total"
  gone "$dom"; rm -rf "$out"
}

: > "$work/i.txt"; : > "$work/u.txt"; : > "$work/s.txt"
for r in $(seq 1 "$rounds"); do
  if [ $((r % 2)) = 1 ]; then order="i u s"; else order="s u i"; fi
  for m in $order; do
    case $m in
      i) line=$(instant i); echo "$line" >> "$work/i.txt"
         echo "round $r  --instant (verified):   agent $(cut -d' ' -f1 <<<"$line") s, started $(cut -d' ' -f2 <<<"$line") s, copy $(cut -d' ' -f3 <<<"$line") s, command $(cut -d' ' -f4 <<<"$line") s" ;;
      u) line=$(instant u); echo "$line" >> "$work/u.txt"
         echo "round $r  --instant (UNVERIFIED): agent $(cut -d' ' -f1 <<<"$line") s, started $(cut -d' ' -f2 <<<"$line") s, copy $(cut -d' ' -f3 <<<"$line") s, command $(cut -d' ' -f4 <<<"$line") s" ;;
      s) line=$(start); echo "$line" >> "$work/s.txt"
         echo "round $r  --as --start:           agent $(cut -d' ' -f1 <<<"$line") s, command $(cut -d' ' -f2 <<<"$line") s" ;;
    esac
  done
done
python3 - "$work" <<'PY'
import statistics, sys
w = sys.argv[1]
col = lambda f, i: statistics.median(float(l.split()[i]) for l in open(f"{w}/{f}.txt") if l.strip())
ia, ic, ua, uc, sa = col("i", 0), col("i", 2), col("u", 0), col("u", 2), col("s", 0)
print(f"medians: agent answering after --instant {ia:.1f} s (unverified {ua:.1f} s), after --as --start {sa:.1f} s: "
      f"--instant answers {sa/ia:.1f}x sooner")
print(f"medians: block copy through the verify-on-read layer {ic:.1f} s, direct {uc:.1f} s: ratio {ic/uc:.2f}")
PY
