#!/usr/bin/env bash
# The post-check's re-read, two ways, side by side (issue 10, item 3).
# SPDX-License-Identifier: AGPL-3.0-or-later
#
# Usage: benches/reread.sh DIR [SIZE_MIB] [ROUNDS]      (root: drops caches between rounds)
#
# In DIR (the share to judge: a local folder, a lab/share.sh mount, an NFS mount) each round
# writes a file of SIZE_MIB MiB as a backup does (buffered writes, then fsync: the pages stay in
# this host's cache), then reads it back two ways, interleaved (the order alternates):
#   (f) posix_fadvise(DONTNEED) after the fsync, then a buffered read (what checks.rs does)
#   (o) an O_DIRECT read (no fadvise)
# and prints, per way, the median seconds of the read, MiB/s, and how many of the file's pages
# were resident in this host's cache just before the read (fincore): a read that the cache can
# answer proves nothing about the share, so that column must be 0 for the way to be valid. It
# also prints the resident pages after the read (what the check leaves in the cache).
# The hash that follows the read in the post-check is the same for both ways and not timed.
set -euo pipefail

DIR=${1:?usage: benches/reread.sh DIR [SIZE_MIB] [ROUNDS]}
SIZE=${2:-256}
ROUNDS=${3:-5}
[ -d "$DIR" ] || { echo "reread: $DIR is not a folder" >&2; exit 1; }
SRC=$(mktemp /var/tmp/vmb-reread-src.XXXXXX)
FILE="$DIR/vmb-reread.$$"
trap 'rm -f "$SRC" "$FILE"' EXIT
head -c "$((SIZE << 20))" /dev/urandom >"$SRC"

pages() { fincore --bytes --noheadings --output RES "$1" 2>/dev/null | tr -d ' ' || echo '?'; }

fresh_copy() { # writes FILE as a backup does: buffered, then fsync; its pages stay cached
  dd if="$SRC" of="$FILE" bs=1M conv=fsync status=none
}

dontneed() {
  /usr/bin/python3 -c 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED)' "$FILE"
}

declare -A T RB RA
for ((r = 0; r < ROUNDS; r++)); do
  order="f o"; [ $((r % 2)) = 1 ] && order="o f"
  for way in $order; do
    [ "$(id -u)" = 0 ] && { sync; echo 3 >/proc/sys/vm/drop_caches; }
    fresh_copy
    if [ "$way" = f ]; then
      dontneed
      before=$(pages "$FILE")
      s=$(date +%s.%N); dd if="$FILE" of=/dev/null bs=1M status=none; e=$(date +%s.%N)
    else
      before=$(pages "$FILE")
      s=$(date +%s.%N)
      if ! dd if="$FILE" of=/dev/null bs=4M iflag=direct status=none 2>/dev/null; then
        echo "reread: O_DIRECT refused on $DIR" >&2; e=$s; before=refused
      else e=$(date +%s.%N); fi
    fi
    T[$way]+="$(echo "$e - $s" | bc) "; RB[$way]=$before; RA[$way]=$(pages "$FILE")
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; print m}'; }
fs=$(stat -f -c %T "$DIR")
echo "re-read of a ${SIZE} MiB file just written and fsynced in $DIR ($fs), $ROUNDS rounds, load: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-44s %10s %9s %16s %16s\n' way "median s" "MiB/s" "cached before" "cached after"
for way in f o; do
  m=$(echo "${T[$way]}" | median)
  label="(f) fsync + fadvise(DONTNEED) + buffered read"; [ $way = o ] && label="(o) O_DIRECT read"
  rate=$(echo "if ($m > 0) $SIZE / $m else 0" | bc -l)
  printf '%-44s %10.3f %9.0f %16s %16s\n' "$label" "$m" "$rate" "${RB[$way]}" "${RA[$way]}"
done
