#!/usr/bin/env bash
# Small or failing backup targets for tests of a full or broken share (root).
# SPDX-License-Identifier: AGPL-3.0-or-later
#
# Usage: lab/share.sh <command> ...
#   mkfull DIR SIZE [--tmpfs]   mount a filesystem of SIZE (e.g. 20M) on DIR: a loop-mounted ext4
#                               (default, no reserved blocks) or a tmpfs; writing more fails with ENOSPC
#   faulty DIR [--fail-after BYTES] [--errno EIO|ENOSPC|EROFS] [--fail-fsync]
#                               mount a FUSE pass-through filesystem on DIR (backed by a private folder)
#                               that fails writes with ERRNO once BYTES bytes have been written in all
#                               (default: never fails until told with `fault`)
#   fault DIR [--fail-after BYTES] [--errno ERRNO] [--fail-fsync] [--fail-op OP=REGEX]...
#             [--write-delay-ms MS] [--corrupt-after BYTES] | fault DIR --off
#                               change the fault of a mounted faulty share at run time
#                               (BYTES counts from the moment of the change); --fail-op fails the
#                               namespace operation OP (rename, mkdir, unlink, rmdir, create) on
#                               paths matching REGEX (e.g. rename='\.partial$': the publish);
#                               --write-delay-ms slows every write (a slow share);
#                               --corrupt-after: writes past BYTES succeed but are stored
#                               inverted (a share that silently loses data)
#   vanish DIR                  the share disappears: lazy unmount and kill of the FUSE server
#                               (open files get ENOTCONN); its content is kept for `remount`
#   remount DIR                 mounts a vanished faulty share again, healthy, with its content
#   umount DIR                  unmount DIR and delete what mkfull/faulty created for it
#   list                        show the shares made by this script
# State lives in /var/lib/vm-backup-lab/shares/.
set -euo pipefail

STATE=${VMB_LAB_ROOT:-/var/lib/vm-backup-lab}/shares
SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "share: ERROR: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root"

# Key of a mount point in the state folder: its absolute path with / replaced.
key_of() { realpath -m "$1" | sed 's|^/||; s|/|_|g'; }

is_mounted() { mountpoint -q "$1" 2>/dev/null; }

fault_args() { # prints the control file content for the fault options
  local after=null errno=EIO fsync=false off=0 delay=0 corrupt=null ops=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --fail-after) after=$2; shift 2 ;;
      --errno) errno=$2; shift 2 ;;
      --fail-fsync) fsync=true; shift ;;
      --fail-op) ops+=("$2"); shift 2 ;;
      --write-delay-ms) delay=$2; shift 2 ;;
      --corrupt-after) corrupt=$2; shift 2 ;;
      --off) off=1; shift ;;
      *) die "unknown option $1" ;;
    esac
  done
  case "$errno" in EIO|ENOSPC|EROFS|EDQUOT|ENOTCONN) ;; *) die "unsupported errno $errno" ;; esac
  [[ "$after" =~ ^(null|[0-9]+)$ ]] || die "--fail-after takes a byte count"
  [[ "$delay" =~ ^[0-9]+$ ]] || die "--write-delay-ms takes milliseconds"
  [[ "$corrupt" =~ ^(null|[0-9]+)$ ]] || die "--corrupt-after takes a byte count"
  if [ "$off" = 1 ]; then
    echo '{"fail_after": null, "errno": "EIO", "fail_fsync": false}'
    return
  fi
  # JSON built by python (the regular expressions need escaping).
  /usr/bin/python3 - "$after" "$errno" "$fsync" "$delay" "$corrupt" "${ops[@]}" <<'PY'
import json, re, sys
after, errno, fsync, delay, corrupt, *ops = sys.argv[1:]
fail_ops = {}
for op in ops:
    name, sep, rx = op.partition("=")
    if not sep or name not in ("rename", "mkdir", "unlink", "rmdir", "create"):
        sys.exit(f"share: ERROR: --fail-op takes OP=REGEX (rename, mkdir, unlink, rmdir, create): {op}")
    re.compile(rx)
    fail_ops[name] = rx
print(json.dumps({"fail_after": None if after == "null" else int(after), "errno": errno,
                  "fail_fsync": fsync == "true", "fail_ops": fail_ops,
                  "write_delay_ms": int(delay),
                  "corrupt_after": None if corrupt == "null" else int(corrupt)}))
PY
}

start_faultfs() { # DIR KEY: mounts the backing folder of KEY on DIR, waits for the mount
  local dir=$1 k=$2
  /usr/bin/python3 "$SRC_DIR/faultfs.py" "$STATE/$k.backing" "$dir" "$STATE/$k.ctl" \
    >> "$STATE/$k.log" 2>&1 &
  echo $! > "$STATE/$k.pid"
  for _ in $(seq 1 100); do is_mounted "$dir" && break; sleep 0.05; done
  is_mounted "$dir" || { cat "$STATE/$k.log" >&2; die "FUSE mount of $dir failed"; }
}

cmd=${1:-}; [ $# -gt 0 ] && shift
case "$cmd" in
  mkfull)
    [ $# -ge 2 ] || die "usage: mkfull DIR SIZE [--tmpfs]"
    dir=$1 size=$2 kind=${3:-}
    mkdir -p "$dir" "$STATE"
    is_mounted "$dir" && die "$dir is already a mount point"
    k=$(key_of "$dir")
    if [ "$kind" = --tmpfs ]; then
      mount -t tmpfs -o "size=$size,mode=0755" vmb-full "$dir"
      echo tmpfs > "$STATE/$k.kind"; realpath "$dir" > "$STATE/$k.dir"
    else
      img=$STATE/$k.img
      rm -f "$img"
      truncate -s "$size" "$img"
      mkfs.ext4 -q -F -m 0 -L vmbfull "$img"
      mount -o loop "$img" "$dir"
      rmdir "$dir/lost+found" 2>/dev/null || true
      echo loop > "$STATE/$k.kind"; realpath "$dir" > "$STATE/$k.dir"
    fi
    echo "share: $dir is a $(cat "$STATE/$k.kind") filesystem of $size ($(df -h --output=avail "$dir" | tail -n 1 | tr -d ' ') free)"
    ;;
  faulty)
    [ $# -ge 1 ] || die "usage: faulty DIR [--fail-after BYTES] [--errno ERRNO] [--fail-fsync]"
    dir=$1; shift
    /usr/bin/python3 -c 'import fuse' 2>/dev/null || "$SRC_DIR/../scripts/install-deps.sh" >&2
    mkdir -p "$dir" "$STATE"
    is_mounted "$dir" && die "$dir is already a mount point"
    k=$(key_of "$dir")
    rm -rf "${STATE:?}/$k.backing"; mkdir -p "$STATE/$k.backing"
    fault_args "$@" > "$STATE/$k.ctl"
    : > "$STATE/$k.log"
    echo faulty > "$STATE/$k.kind"; realpath "$dir" > "$STATE/$k.dir"
    start_faultfs "$dir" "$k"
    echo "share: $dir is a faulty FUSE share ($(cat "$STATE/$k.ctl"))"
    ;;
  fault)
    [ $# -ge 1 ] || die "usage: fault DIR [--fail-after BYTES] [--errno ERRNO] [--fail-fsync] | --off"
    dir=$1; shift
    k=$(key_of "$dir")
    [ "$(cat "$STATE/$k.kind" 2>/dev/null)" = faulty ] || die "$dir is not a faulty share"
    fault_args "$@" > "$STATE/$k.ctl.new"
    mv -f "$STATE/$k.ctl.new" "$STATE/$k.ctl"
    echo "share: $dir fault now $(cat "$STATE/$k.ctl")"
    ;;
  vanish)
    [ $# -eq 1 ] || die "usage: vanish DIR"
    dir=$1
    k=$(key_of "$dir")
    [ "$(cat "$STATE/$k.kind" 2>/dev/null)" = faulty ] || die "$dir is not a faulty share"
    is_mounted "$dir" || die "$dir is not mounted"
    umount -l "$dir"
    kill -9 "$(cat "$STATE/$k.pid")" 2>/dev/null || true
    rm -f "$STATE/$k.pid"
    echo "share: $dir vanished (content kept in $STATE/$k.backing)"
    ;;
  remount)
    [ $# -eq 1 ] || die "usage: remount DIR"
    dir=$1
    k=$(key_of "$dir")
    [ "$(cat "$STATE/$k.kind" 2>/dev/null)" = faulty ] || die "$dir is not a faulty share"
    is_mounted "$dir" && die "$dir is still mounted"
    fault_args --off > "$STATE/$k.ctl"
    start_faultfs "$dir" "$k"
    echo "share: $dir mounted again"
    ;;
  umount)
    [ $# -eq 1 ] || die "usage: umount DIR"
    dir=$1
    k=$(key_of "$dir")
    if is_mounted "$dir"; then
      umount "$dir" 2>/dev/null || umount -l "$dir"
    fi
    if [ -f "$STATE/$k.pid" ]; then
      pid=$(cat "$STATE/$k.pid")
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill "$pid" 2>/dev/null || true
    fi
    rm -rf "${STATE:?}/$k".{img,kind,dir,pid,ctl,log,backing}
    ;;
  list)
    for f in "$STATE"/*.kind; do
      [ -f "$f" ] || continue
      k=$(basename "$f" .kind)
      echo "$(cat "$STATE/$k.dir" 2>/dev/null || echo "?$k") $(cat "$f")"
    done
    ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; [ -z "$cmd" ] || [ "$cmd" = --help ] || exit 1 ;;
esac
