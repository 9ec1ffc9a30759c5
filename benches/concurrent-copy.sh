#!/usr/bin/env bash
# Would copying the disks of a multi-disk VM concurrently be faster? (issue 10, item 4)
# SPDX-License-Identifier: AGPL-3.0-or-later
#
# Usage: benches/concurrent-copy.sh BIN ROUNDS IMAGE1 IMAGE2     (root: drops the page cache)
#
# Copies the two images (two disks of one VM) with `BIN copy` (both hashes, as a backup does),
# interleaved round by round, page cache dropped before every run:
#   (s) one after the other, each with the default queue (16 × 1 MiB buffers);
#   (p) both at once, each with half the queue (8 × 1 MiB), so the buffers in flight stay the
#       same in all (memory bounded by the buffers, as the engine would share them);
# and prints the medians, the ratio (s)/(p) (> 1: concurrency pays), the peak RSS of each way
# (sum of both processes for (p)) and the load average.
set -euo pipefail
bin=$1 rounds=$2 a=$3 b=$4
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
tmp=$(mktemp -d /var/tmp/concurrent-copy.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
out_a="$(dirname "$a")/cc-out-a" out_b="$(dirname "$b")/cc-out-b"
rss() { awk -F: '/Maximum resident/ {gsub(/ /, "", $2); print $2}' "$1"; }

seq_run() {
  drop
  local t0; t0=$(now)
  /usr/bin/time -v -o "$tmp/s1" "$bin" copy "$a" "$out_a" >/dev/null
  /usr/bin/time -v -o "$tmp/s2" "$bin" copy "$b" "$out_b" >/dev/null
  echo "$(now) - $t0" | bc -l >>"$tmp/s"
  rm -f "$out_a" "$out_b"
  echo $(( $(rss "$tmp/s1") > $(rss "$tmp/s2") ? $(rss "$tmp/s1") : $(rss "$tmp/s2") )) >"$tmp/s.rss"
}
par_run() {
  drop
  local t0; t0=$(now)
  /usr/bin/time -v -o "$tmp/p1" "$bin" copy --queue-depth 8 "$a" "$out_a" >/dev/null &
  local p1=$!
  /usr/bin/time -v -o "$tmp/p2" "$bin" copy --queue-depth 8 "$b" "$out_b" >/dev/null &
  local p2=$!
  wait "$p1"; wait "$p2"
  echo "$(now) - $t0" | bc -l >>"$tmp/p"
  rm -f "$out_a" "$out_b"
  echo $(( $(rss "$tmp/p1") + $(rss "$tmp/p2") )) >"$tmp/p.rss"
}

for ((r = 0; r < rounds; r++)); do
  if [ $((r % 2)) = 0 ]; then seq_run; par_run; else par_run; seq_run; fi
done
s=$(median <"$tmp/s") p=$(median <"$tmp/p")
echo "two disks: $(basename "$a") ($(du -h "$a" | cut -f1) allocated) and $(basename "$b") ($(du -h "$b" | cut -f1)), $rounds rounds, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '(s) one after the other: median %.2f s, peak RSS %s KiB (one process at a time)\n' "$s" "$(cat "$tmp/s.rss")"
printf '(p) both at once, half the queue each: median %.2f s, peak RSS %s KiB (both processes)\n' "$p" "$(cat "$tmp/p.rss")"
printf 'speed of (p) over (s): %.2f x\n' "$(echo "$s / $p" | bc -l)"
