#!/usr/bin/env bash
# Side-by-side A/B of two `vm-backup` binaries on the same images, interleaved round by round,
# page cache dropped before every run (needs root), with the machine's limits measured in the
# same rounds: read, write (+fsync), SHA-256 of one stream in memory (on 1 GiB; the first image
# should be the dense one). Prints medians and
# ratios, so that figures from a loaded machine can still be compared.
#
#   benches/ab-copy.sh OLD_BIN NEW_BIN ROUNDS IMAGE... [-- EXTRA COPY ARGS]
#
# Every copy uses `vm-backup copy --json IMAGE OUT` (both hashes unless EXTRA says otherwise);
# OUT goes beside the image and is removed after each run. The digests of both binaries are
# compared on every image (they must be byte-identical).
set -euo pipefail
old=$1 new=$2 rounds=$3
shift 3
images=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do images+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
extra=("$@")

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
tmp=$(mktemp -d /var/tmp/ab-copy.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

run_copy() { # bin image -> seconds; leaves the JSON report in $tmp/last.json
    local out; out="$(dirname "$2")/ab-out.raw"
    drop
    local t0 t1; t0=$(now)
    "$1" copy --json "${extra[@]}" "$2" "$out" > "$tmp/last.json"
    t1=$(now)
    rm -f "$out"
    echo "$t1 - $t0" | bc -l
}

# The machine's limits in GiB/s, on 1 GiB (or the first image, if smaller): reading the first
# image (dense), writing zeros + fsync (ext4 and NFS store zeros like any data; no source cost),
# SHA-256 of one stream from memory (`openssl speed`, which uses the SHA extensions as the
# copier's sha2 does; coreutils sha256sum does not). Earlier versions piped `cat` into `dd` and
# `openssl dgst`, which measured the pipe (0.2-0.6 GiB/s against 0.9-1.3 here).
limits() {
    local img=$1 size; size=$(stat -c %s "$img")
    [ "$size" -gt 1073741824 ] && size=1073741824
    local mib=$(( size / 1048576 )) t0 t1 r w h
    drop; t0=$(now); dd if="$img" of=/dev/null bs=4M count=$(( mib / 4 )) status=none; t1=$(now)
    r=$(echo "$t1 - $t0" | bc -l)
    drop; t0=$(now)
    dd if=/dev/zero of="$(dirname "$img")/ab-write.raw" bs=4M count=$(( mib / 4 )) conv=fsync status=none
    t1=$(now); w=$(echo "$t1 - $t0" | bc -l)
    rm -f "$(dirname "$img")/ab-write.raw"
    # "sha256  1164443.65k": thousands of bytes per second, 1 MiB blocks.
    h=$(openssl speed -elapsed -seconds 2 -bytes 1048576 sha256 2>/dev/null \
        | awk '$1 == "sha256" {sub(/k$/, "", $2); print $2 * 1000 / 1073741824}')
    echo "$(echo "$mib / 1024 / $r" | bc -l) $(echo "$mib / 1024 / $w" | bc -l) $h"
}

for img in "${images[@]}"; do
    name=$(basename "$img")
    size=$(stat -c %s "$img")
    alloc=$(( $(stat -c %b "$img") * 512 ))
    : > "$tmp/$name.old"; : > "$tmp/$name.new"; : > "$tmp/$name.lim"
    for r in $(seq "$rounds"); do
        if [ $((r % 2)) -eq 1 ]; then order="old new"; else order="new old"; fi
        for which in $order; do
            bin=$old; [ "$which" = new ] && bin=$new
            run_copy "$bin" "$img" >> "$tmp/$name.$which"
            jq -r '[.sha256, .manifest.root] | join(" ")' "$tmp/last.json" > "$tmp/$name.$which.sum"
        done
        limits "${images[0]}" >> "$tmp/$name.lim"
    done
    same=no; cmp -s "$tmp/$name.old.sum" "$tmp/$name.new.sum" && same=yes
    o=$(median < "$tmp/$name.old"); n=$(median < "$tmp/$name.new")
    rd=$(cut -d' ' -f1 "$tmp/$name.lim" | median)
    wr=$(cut -d' ' -f2 "$tmp/$name.lim" | median)
    hs=$(cut -d' ' -f3 "$tmp/$name.lim" | median)
    gib() { echo "scale=3; $size / 1073741824 / $1" | bc -l; }
    printf '%s (%s logical, %s allocated), %s rounds, medians:\n' "$name" \
        "$(numfmt --to=iec "$size")" "$(numfmt --to=iec "$alloc")" "$rounds"
    printf '  old %.2f s (%s GiB/s)   new %.2f s (%s GiB/s)   new/old speed %.2f x   digests identical: %s\n' \
        "$o" "$(gib "$o")" "$n" "$(gib "$n")" "$(echo "$o / $n" | bc -l)" "$same"
    printf '  limits (GiB/s): read %.3f, write %.3f, SHA-256 one stream %.3f\n' "$rd" "$wr" "$hs"
    printf '  new vs min(read, write, hash): %.2f\n' \
        "$(echo "m=$rd; if ($wr < m) m=$wr; if ($hs < m) m=$hs; $size / 1073741824 / $n / m" | bc -l)"
done
