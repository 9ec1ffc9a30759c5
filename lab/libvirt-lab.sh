#!/usr/bin/env bash
# vm-backup libvirt/QEMU test lab: starts the shared libvirt daemons, builds the tiny guest
# (Debian kernel + busybox + qemu-ga initramfs) and defines/starts the lab domains of a prefix.
# Every recipe follows /work/shared/notes/libvirt.md (verified on these machines).
# SPDX-License-Identifier: AGPL-3.0-or-later
#
# Usage: lab/libvirt-lab.sh <command> [args]   (root, Debian 12)
#   daemons                     start virtlogd + libvirtd if not answering (idempotent)
#   guest [--force]             build the shared guest (kernel + initrd) if missing or outdated
#   up [PREFIX] [--data-size SIZE] [--fill SIZE] [--only DOM[,DOM]]
#                               (re)create and start PREFIX-{agent,noagent,uefi,multi}; PREFIX: $VMB_LAB_PREFIX or vmb.
#                               --data-size: size of the agent domain's data disk (default 256M);
#                               --fill: put a file of SIZE random bytes (/fill.bin) on that disk (bench);
#                               multi: each of its three disks is --data-size with a fill.bin of SIZE;
#                               --only: create only these kinds (agent,noagent,uefi,multi)
#   down [PREFIX] | down --all [--daemons] | down --daemons
#                               destroy + undefine PREFIX's domains (and any other "PREFIX-*" domain),
#                               delete its disks; --all: every prefix on the machine (other users' too!);
#                               --daemons: then stop the daemons started by this script (by pid)
#   status
#   wait-agent DOM [TIMEOUT_S]  wait until guest-ping answers (default 60 s)
#   gexec DOM 'CMD' [TIMEOUT_S] run /bin/sh -c CMD in the guest; prints stdout (stderr to stderr), exits with its code
#   agent-hang DOM SECONDS      stop qemu-ga in the guest (SIGSTOP) for SECONDS (it resumes by itself)
#   seq-check DOM [FILE]        check the writer's sequence: prints "first=F last=L gaps=G lines=N"
#   ext4-cat IMG PATH           read PATH from the ext4 filesystem of disk image IMG (offline, -U)
#   dir PREFIX                  print the directory holding PREFIX's disks
#
# Layout (absolute, shared by everyone on the machine):
#   /var/lib/vm-backup-lab/daemons/   pid + log files of the daemons started here
#   /var/lib/vm-backup-lab/guest/     vmlinux, initrd.img (built once)
#   /var/lib/vm-backup-lab/<PREFIX>/  disks, NVRAM, console logs of that prefix's domains
set -euo pipefail

LAB_ROOT=${VMB_LAB_ROOT:-/var/lib/vm-backup-lab}
DAEMON_DIR=$LAB_ROOT/daemons
GUEST_DIR=$LAB_ROOT/guest
SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SRC_DIR/.." && pwd)
export LIBVIRT_DEFAULT_URI=qemu:///system
KINDS=(agent noagent uefi multi)
OVMF_CODE=/usr/share/OVMF/OVMF_CODE_4M.fd
OVMF_VARS=/usr/share/OVMF/OVMF_VARS_4M.fd
# Bump when the guest recipe changes in a way the template hash does not capture.
GUEST_RECIPE=3

log() { echo "lab: $*" >&2; }
die() { echo "lab: ERROR: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

# Serialises the shared steps (daemons, guest build) between concurrent users of the lab.
with_lock() {
  local name=$1; shift
  mkdir -p "$LAB_ROOT"; chmod 755 "$LAB_ROOT"
  exec {lockfd}>"$LAB_ROOT/.$name.lock"
  flock "$lockfd"
  "$@"
  flock -u "$lockfd"
  exec {lockfd}>&-
}

deps() {
  # Quick check first: on a prepared machine install-deps.sh costs a dpkg-query per package.
  local p missing=0
  for p in virsh qemu-img qemu-system-x86_64 busybox jq debugfs mkfs.ext4 cpio xz genisoimage; do
    command -v "$p" >/dev/null 2>&1 || missing=1
  done
  [ -x /usr/sbin/qemu-ga ] && [ -f "$OVMF_CODE" ] && [ -x /usr/sbin/libvirtd ] || missing=1
  if [ "$missing" -eq 1 ]; then "$REPO_DIR/scripts/install-deps.sh" >&2; fi
}

# ---------------------------------------------------------------- daemons
daemons_up() { virsh -c qemu:///system version >/dev/null 2>&1; }

# True when a process with this exact command name runs (no pidof/pgrep: not in every image).
proc_running() {
  local c
  for c in /proc/[0-9]*/comm; do
    [ "$(cat "$c" 2>/dev/null)" = "$1" ] && return 0
  done
  return 1
}
proc_pids() {
  local c out=""
  for c in /proc/[0-9]*/comm; do
    [ "$(cat "$c" 2>/dev/null)" = "$1" ] && out+="$(basename "$(dirname "$c")") "
  done
  echo "${out:-none}"
}

start_daemons_locked() {
  mkdir -p "$DAEMON_DIR"
  if ! proc_running virtlogd; then
    log "starting virtlogd"
    /usr/sbin/virtlogd -d -p "$DAEMON_DIR/virtlogd.pid"
  fi
  if daemons_up; then return 0; fi
  if ! proc_running libvirtd; then
    log "starting libvirtd (log: $DAEMON_DIR/libvirtd.log)"
    LIBVIRT_LOG_OUTPUTS="3:file:$DAEMON_DIR/libvirtd.log" /usr/sbin/libvirtd -d -p "$DAEMON_DIR/libvirtd.pid"
  fi
  local t0; t0=$(now)
  local i
  for i in $(seq 1 600); do   # 60 s: the cold capability probe takes ~8 s
    daemons_up && { log "libvirtd answers after $(elapsed "$t0") s"; return 0; }
    sleep 0.1
  done
  die "libvirtd does not answer after 60 s (see $DAEMON_DIR/libvirtd.log)"
}

cmd_daemons() { need_root; deps; with_lock daemons start_daemons_locked; }

stop_daemons() {
  local d pid
  for d in libvirtd virtlogd; do
    if [ -f "$DAEMON_DIR/$d.pid" ]; then
      pid=$(cat "$DAEMON_DIR/$d.pid")
      if kill -0 "$pid" 2>/dev/null; then
        log "stopping $d (pid $pid)"
        kill "$pid"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      fi
      rm -f "$DAEMON_DIR/$d.pid"
    fi
  done
}

# ---------------------------------------------------------------- guest
# The newest installed kernel that has both its image in /boot and its modules (a container may
# see the host's /lib/modules without a matching /boot/vmlinuz).
kernel_version() {
  local k best=""
  for k in $(ls /lib/modules 2>/dev/null | sort -V); do
    [ -f "/boot/vmlinuz-$k" ] && [ -d "/lib/modules/$k/kernel" ] && best=$k
  done
  [ -n "$best" ] || die "no kernel with /boot/vmlinuz-K and /lib/modules/K (install linux-image-amd64)"
  echo "$best"
}

guest_stamp() {
  { echo "recipe $GUEST_RECIPE"; kernel_version; cat "$SRC_DIR"/guest/init "$SRC_DIR"/guest/fsfreeze-hook "$SRC_DIR"/guest/shutdown;
    stat -c '%s %Y' /usr/sbin/qemu-ga /bin/busybox; } | sha256sum | cut -c1-16
}

build_guest_locked() {
  local force=${1:-}
  local stamp; stamp=$(guest_stamp)
  if [ -z "$force" ] && [ -f "$GUEST_DIR/vmlinux" ] && [ -f "$GUEST_DIR/initrd.img" ] \
     && [ "$(cat "$GUEST_DIR/stamp" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  local t0; t0=$(now)
  local kver; kver=$(kernel_version)
  log "building guest for kernel $kver into $GUEST_DIR"
  mkdir -p "$GUEST_DIR"; chmod 755 "$GUEST_DIR"
  local work; work=$(mktemp -d "$LAB_ROOT/.guest-build.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" RETURN

  # Uncompressed vmlinux (PVH entry): skips the decompressor, ~2.5 s faster to boot under TCG.
  local vmlinuz=/boot/vmlinuz-$kver off
  off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | head -n 1 | cut -d: -f1)
  [ -n "$off" ] || die "no xz stream in $vmlinuz"
  tail -c +$((off + 1)) "$vmlinuz" | xz -dcq > "$work/vmlinux" 2>/dev/null || true
  [ -s "$work/vmlinux" ] && head -c 4 "$work/vmlinux" | grep -q ELF || die "could not extract vmlinux from $vmlinuz"

  local r=$work/root
  mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc/qemu,proc,sys,dev,run,tmp,mnt/data,var,lib/modules}
  cp /bin/busybox "$r/bin/busybox"
  local a
  for a in $(/bin/busybox --list); do
    [ -e "$r/bin/$a" ] || ln -s busybox "$r/bin/$a"
  done
  ln -sf ../bin/busybox "$r/sbin/insmod"
  cp /usr/sbin/qemu-ga "$r/usr/sbin/qemu-ga"
  local lib
  for lib in $(ldd /usr/sbin/qemu-ga | grep -o '/[^ ]*'); do
    mkdir -p "$r$(dirname "$lib")"
    cp -L "$lib" "$r$lib"
  done
  # Keep /lib64 -> usr/lib64 style symlinks of the host (ld-linux lives at /lib64/...).
  [ -L /lib64 ] && [ ! -e "$r/lib64" ] && ln -s "$(readlink /lib64)" "$r/lib64" || true

  local m mods=() seen=" "
  for m in virtio_pci virtio_blk virtio_console ext4; do
    while read -r _ path _; do
      case "$seen" in *" $path "*) continue ;; esac
      seen="$seen$path "
      mods+=("$path")
    done < <(modprobe -S "$kver" --show-depends "$m" | grep '^insmod ')
  done
  : > "$r/etc/modules.order"
  for m in "${mods[@]}"; do
    local dst=$r/lib/modules/$(basename "$m")
    case "$m" in
      *.ko.xz) xz -dc "$m" > "${dst%.xz}"; dst=${dst%.xz} ;;
      *.ko.zst) zstd -qdc "$m" > "${dst%.zst}"; dst=${dst%.zst} ;;
      *) cp "$m" "$dst" ;;
    esac
    echo "/lib/modules/$(basename "$dst")" >> "$r/etc/modules.order"
  done
  install -m 755 "$SRC_DIR/guest/init" "$r/init"
  install -m 755 "$SRC_DIR/guest/fsfreeze-hook" "$r/etc/qemu/fsfreeze-hook"
  install -m 755 "$SRC_DIR/guest/shutdown" "$r/sbin/shutdown"
  (cd "$r" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initrd.img"

  chmod 644 "$work/vmlinux" "$work/initrd.img"
  mv -f "$work/vmlinux" "$GUEST_DIR/vmlinux"
  mv -f "$work/initrd.img" "$GUEST_DIR/initrd.img"
  echo "$stamp" > "$GUEST_DIR/stamp"
  echo "$kver" > "$GUEST_DIR/kernel-version"
  log "guest built in $(elapsed "$t0") s ($(du -h "$GUEST_DIR/initrd.img" | cut -f1) initrd)"
}

cmd_guest() {
  need_root; deps
  local force=""
  [ "${1:-}" = "--force" ] && force=1
  with_lock guest build_guest_locked "$force"
}

# ---------------------------------------------------------------- domains
check_prefix() {
  # No "-": `down a` removes every "a-*" domain, which must never catch another prefix "a-b".
  [[ "$1" =~ ^[a-z0-9][a-z0-9_]{0,30}$ ]] || die "bad prefix '$1' (want [a-z0-9][a-z0-9_]*, no '-')"
  case "$1" in daemons|guest|tmp) die "reserved prefix '$1'" ;; esac
}

domain_type() {
  if [ -e /dev/kvm ] && [ ! -e /sys/module/kvm_pvm ]; then echo kvm; else echo qemu; fi
}

# make_ext4 OUT.raw SIZE LABEL SEEDTEXT [FILL_SIZE]: a whole-disk ext4 holding seed.txt (+ fill.bin).
make_ext4() {
  local out=$1 size=$2 label=$3 text=$4 fill=${5:-}
  local seed; seed=$(mktemp -d "$LAB_ROOT/.seed.XXXXXX")
  echo "$text" > "$seed/seed.txt"
  head -c 1M /dev/urandom > "$seed/random.bin"
  if [ -n "$fill" ]; then head -c "$fill" /dev/urandom > "$seed/fill.bin"; fi
  truncate -s "$size" "$out"
  mkfs.ext4 -q -F -L "$label" -d "$seed" "$out"
  rm -rf "$seed"
}

domain_xml() {
  local kind=$1 name=$2 dir=$3 type; type=$(domain_type)
  local os disks="" channel="" machine=pc
  if [ "$kind" = uefi ]; then
    machine=q35
    os="<type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>$OVMF_CODE</loader>
    <nvram template='$OVMF_VARS'>$dir/uefi_VARS.fd</nvram>"
  else
    os="<type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$GUEST_DIR/vmlinux</kernel><initrd>$GUEST_DIR/initrd.img</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>"
  fi
  qdisk() { # file dev format
    disks+="
    <disk type='file' device='disk'><driver name='qemu' type='$3' cache='none' discard='unmap'/>
      <source file='$1'/><target dev='$2' bus='virtio'/></disk>"
  }
  case "$kind" in
    agent)   qdisk "$dir/agent-vda.qcow2" vda qcow2 ;;
    noagent) qdisk "$dir/noagent-vda.qcow2" vda qcow2 ;;
    uefi)    qdisk "$dir/uefi-vda.qcow2" vda qcow2 ;;
    multi)
      qdisk "$dir/multi-vda.qcow2" vda qcow2
      qdisk "$dir/multi-vdb.qcow2" vdb qcow2
      qdisk "$dir/multi-vdc.raw" vdc raw
      disks+="
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
      <source file='$dir/multi-cdrom.iso'/><target dev='hdc' bus='ide'/><readonly/></disk>" ;;
  esac
  case "$kind" in agent|multi)
    channel="<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>" ;;
  esac
  cat <<EOF
<domain type='$type'>
  <name>$name</name>
  <memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os>$os</os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>$disks
    <controller type='usb' model='none'/>
    <serial type='file'><source path='$dir/$kind.console.log'/><target port='0'/></serial>
    $channel
    <memballoon model='none'/>
  </devices>
</domain>
EOF
  : "$machine"
}

# Destroys and undefines one domain, whatever state it is in (frozen, mid block job, ...).
remove_domain() {
  local name=$1
  virsh dominfo "$name" >/dev/null 2>&1 || return 0
  virsh destroy "$name" >/dev/null 2>&1 || true
  virsh undefine "$name" --nvram --checkpoints-metadata --snapshots-metadata >/dev/null 2>&1 \
    || virsh undefine "$name" --nvram >/dev/null 2>&1 \
    || virsh undefine "$name" >/dev/null 2>&1 || die "cannot undefine $name"
}

prefix_down() {
  local p=$1 d pids=()
  check_prefix "$p"
  # The lab's domains and any a test created under this prefix (e.g. "<prefix>-agent-restored").
  # In parallel: a destroy of a TCG domain takes ~2 s.
  for d in $(virsh list --all --name 2>/dev/null | grep "^$p-" || true); do
    remove_domain "$d" & pids+=($!)
  done
  for d in "${pids[@]}"; do wait "$d" || die "could not remove a domain of prefix $p"; done
  rm -rf "${LAB_ROOT:?}/$p"
}

create_disks() {
  local kind=$1 p=$2 dir=$3 data_size=$4 fill=$5
  case "$kind" in
    agent)
      make_ext4 "$dir/agent-vda.raw" "$data_size" labdata "seed of $p-agent" "$fill"
      qemu-img convert -f raw -O qcow2 "$dir/agent-vda.raw" "$dir/agent-vda.qcow2"
      rm -f "$dir/agent-vda.raw" ;;
    noagent)
      make_ext4 "$dir/noagent-vda.raw" 64M labdata "seed of $p-noagent"
      qemu-img convert -f raw -O qcow2 "$dir/noagent-vda.raw" "$dir/noagent-vda.qcow2"
      rm -f "$dir/noagent-vda.raw" ;;
    uefi)
      qemu-img create -q -f qcow2 "$dir/uefi-vda.qcow2" 64M ;;
    multi)
      # With --fill: every disk is --data-size and holds SIZE random bytes (vdb's in its backing file).
      local msize=128M dsize=64M
      if [ -n "$fill" ]; then msize=$data_size dsize=$data_size; fi
      make_ext4 "$dir/multi-vda.raw" "$msize" labdata "seed of $p-multi vda" "$fill"
      qemu-img convert -f raw -O qcow2 "$dir/multi-vda.raw" "$dir/multi-vda.qcow2"
      rm -f "$dir/multi-vda.raw"
      make_ext4 "$dir/multi-vdb-base.raw" "$dsize" labdata2 "seed of $p-multi vdb (in the backing file)" "$fill"
      qemu-img convert -f raw -O qcow2 "$dir/multi-vdb-base.raw" "$dir/multi-vdb-base.qcow2"
      rm -f "$dir/multi-vdb-base.raw"
      qemu-img create -q -f qcow2 -b "$dir/multi-vdb-base.qcow2" -F qcow2 "$dir/multi-vdb.qcow2"
      make_ext4 "$dir/multi-vdc.raw" "$dsize" labdata3 "seed of $p-multi vdc (raw)" "$fill"
      local iso; iso=$(mktemp -d "$LAB_ROOT/.iso.XXXXXX")
      echo "vm-backup lab cdrom of $p-multi" > "$iso/README.TXT"
      genisoimage -quiet -V LABCD -o "$dir/multi-cdrom.iso" "$iso"
      rm -rf "$iso" ;;
  esac
}

cmd_up() {
  need_root
  local p=${VMB_LAB_PREFIX:-vmb} data_size=256M fill="" only=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --data-size) data_size=$2; shift 2 ;;
      --fill) fill=$2; shift 2 ;;
      --only) only=$2; shift 2 ;;
      -*) die "unknown option $1" ;;
      *) p=$1; shift ;;
    esac
  done
  check_prefix "$p"
  local t0; t0=$(now)
  deps
  with_lock daemons start_daemons_locked
  with_lock guest build_guest_locked ""
  local kinds=("${KINDS[@]}")
  if [ -n "$only" ]; then IFS=, read -r -a kinds <<< "$only"; fi
  local k
  for k in "${kinds[@]}"; do
    case " ${KINDS[*]} " in *" $k "*) ;; *) die "unknown domain kind '$k'" ;; esac
  done

  prefix_down "$p"
  local dir=$LAB_ROOT/$p
  mkdir -p "$dir"; chmod 755 "$LAB_ROOT" "$dir"
  echo "$p" > "$dir/.lab-prefix"
  for k in "${kinds[@]}"; do
    create_disks "$k" "$p" "$dir" "$data_size" "$fill"
    domain_xml "$k" "$p-$k" "$dir" > "$dir/$k.xml"
    virsh define "$dir/$k.xml" >/dev/null || die "define $p-$k failed (XML: $dir/$k.xml)"
  done
  local tstart; tstart=$(now)
  local pids=() i
  for k in "${kinds[@]}"; do
    virsh start "$p-$k" >/dev/null & pids+=($!)
  done
  for i in "${!kinds[@]}"; do
    wait "${pids[$i]}" || die "start $p-${kinds[$i]} failed (see /var/log/libvirt/qemu/$p-${kinds[$i]}.log)"
  done
  for k in "${kinds[@]}"; do
    case "$k" in agent|multi) wait_agent "$p-$k" 90 ;; esac
  done
  log "up $p: $(elapsed "$t0") s in all, agents answering $(elapsed "$tstart") s after start"
  for k in "${kinds[@]}"; do
    printf '%-16s %-8s %s\n' "$p-$k" "$(virsh domstate "$p-$k" 2>/dev/null)" \
      "$(virsh domblklist "$p-$k" --details | awk 'NR>2 && NF {printf "%s=%s ", $3, $4}')"
  done
  echo "disks, XML and console logs: $dir"
}

cmd_down() {
  need_root
  local all="" daemons="" p=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --all) all=1 ;;
      --daemons) daemons=1 ;;
      -*) die "unknown option $1" ;;
      *) p=$1 ;;
    esac
    shift
  done
  if daemons_up; then
    if [ -n "$all" ]; then
      local f
      for f in "$LAB_ROOT"/*/.lab-prefix; do
        [ -f "$f" ] || continue
        log "down $(cat "$f")"; prefix_down "$(cat "$f")"
      done
    elif [ -n "$p" ] || [ -z "$daemons" ]; then
      p=${p:-${VMB_LAB_PREFIX:-vmb}}; log "down $p"; prefix_down "$p"
    fi
  else
    log "libvirtd not answering: removing disk directories only"
    if [ -z "$all" ] && { [ -n "$p" ] || [ -z "$daemons" ]; }; then
      p=${p:-${VMB_LAB_PREFIX:-vmb}}; check_prefix "$p"; rm -rf "${LAB_ROOT:?}/$p"
    fi
  fi
  if [ -n "$daemons" ]; then
    local others
    others=$(daemons_up && virsh list --name 2>/dev/null | grep . | tr '\n' ' ' || true)
    [ -z "$others" ] || log "warning: domains still running (QEMU keeps them; a restarted libvirtd reconnects): $others"
    stop_daemons
  fi
}

cmd_status() {
  echo "lab root: $LAB_ROOT"
  if daemons_up; then
    echo "libvirtd: answering (pid $(proc_pids libvirtd)), virtlogd pid $(proc_pids virtlogd)"
  else
    echo "libvirtd: not answering"
  fi
  echo "guest: $(cat "$GUEST_DIR/kernel-version" 2>/dev/null || echo 'not built') $(ls "$GUEST_DIR" 2>/dev/null | tr '\n' ' ')"
  echo "domain type: $(domain_type)"
  local f p
  for f in "$LAB_ROOT"/*/.lab-prefix; do
    [ -f "$f" ] || continue
    p=$(cat "$f")
    echo "prefix $p ($LAB_ROOT/$p):"
    daemons_up && virsh list --all | awk -v p="$p-" 'index($2, p) == 1 {print "  " $0}'
  done
  return 0
}

# ---------------------------------------------------------------- guest helpers
agent_ping() { virsh qemu-agent-command "$1" '{"execute":"guest-ping"}' --timeout 2 >/dev/null 2>&1; }

wait_agent() {
  local dom=$1 timeout=${2:-60} t0; t0=$(now)
  local deadline=$(( $(date +%s) + timeout ))
  while ! agent_ping "$dom"; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "lab: ERROR: guest agent of $dom did not answer guest-ping within ${timeout} s" >&2
      echo "lab: domain state: $(virsh domstate "$dom" 2>&1)" >&2
      local console; console=$(virsh dumpxml "$dom" 2>/dev/null | grep -o "/[^']*console.log" | head -n 1 || true)
      [ -n "$console" ] && { echo "lab: last console lines ($console):" >&2; tail -n 15 "$console" >&2 || true; }
      return 1
    fi
    sleep 0.2
  done
  log "$dom: guest-ping answered after $(elapsed "$t0") s"
}

gexec() {
  local dom=$1 cmd=$2 timeout=${3:-60} req out pid status
  req=$(jq -cn --arg c "$cmd" '{execute:"guest-exec",arguments:{path:"/bin/sh",arg:["-c",$c],"capture-output":true}}')
  out=$(virsh qemu-agent-command "$dom" "$req" --timeout 10) || die "guest-exec on $dom failed"
  pid=$(jq -r '.return.pid' <<<"$out")
  local deadline=$(( $(date +%s) + timeout ))
  while :; do
    status=$(virsh qemu-agent-command "$dom" "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$pid}}" --timeout 10) \
      || die "guest-exec-status on $dom failed"
    [ "$(jq -r '.return.exited' <<<"$status")" = true ] && break
    [ "$(date +%s)" -lt "$deadline" ] || die "guest command on $dom still running after ${timeout} s: $cmd"
    sleep 0.1
  done
  jq -r '.return["out-data"] // ""' <<<"$status" | base64 -d
  jq -r '.return["err-data"] // ""' <<<"$status" | base64 -d >&2
  return "$(jq -r '.return.exitcode // 255' <<<"$status")"
}

# Makes the guest agent hang (SIGSTOP) for SECONDS, then resume by itself (a guest-side timer:
# a stopped agent cannot be reached from the host). The domain stays "connected" meanwhile.
agent_hang() {
  local dom=$1 secs=$2 cmd req
  [[ "$secs" =~ ^[0-9]+$ ]] || die "agent-hang: SECONDS must be an integer"
  cmd="p=\$(pidof qemu-ga); (sleep $secs; kill -CONT \$p) >/dev/null 2>&1 & sleep 0.3; kill -STOP \$p"
  req=$(jq -cn --arg c "$cmd" '{execute:"guest-exec",arguments:{path:"/bin/sh",arg:["-c",$c]}}')
  virsh qemu-agent-command "$dom" "$req" --timeout 10 >/dev/null || die "guest-exec on $dom failed"
  sleep 0.5
  log "$dom: qemu-ga stopped for $secs s"
}

seq_check() {
  local dom=$1 file=${2:-/mnt/data/seq.log}
  # Prints up to 5 "gap after X: Y" lines, then the summary line "first=F last=L gaps=G lines=N".
  gexec "$dom" "awk 'NR==1{f=\$1} NR>1 && \$1!=p+1 {g++; if (g<=5) printf \"gap after %s: %s\\n\", p, \$1} {p=\$1} END{printf \"first=%d last=%d gaps=%d lines=%d\\n\", f, p, g, NR}' $file"
}

# debugfs exits 0 even when the file is missing: look at its stderr instead.
debugfs_cat() {
  local err; err=$(mktemp)
  debugfs -R "cat $2" "$1" 2>"$err"
  if grep -v '^debugfs [0-9]' "$err" | grep -q .; then
    echo "lab: ext4-cat $2: $(grep -v '^debugfs [0-9]' "$err" | head -n 1)" >&2; rm -f "$err"; return 1
  fi
  rm -f "$err"
}

ext4_cat() {
  local img=$1 path=$2 tmp rc=0
  [ -f "$img" ] || die "no image $img"
  local fmt; fmt=$(qemu-img info -U --output=json "$img" | jq -r .format)
  if [ "$fmt" = raw ]; then
    debugfs_cat "$img" "$path" || rc=$?
    return $rc
  fi
  mkdir -p "$LAB_ROOT/tmp"
  tmp=$(mktemp "$LAB_ROOT/tmp/ext4cat.XXXXXX")
  qemu-img convert -U -O raw "$img" "$tmp" || { rm -f "$tmp"; die "qemu-img convert of $img failed"; }
  debugfs_cat "$tmp" "$path" || rc=$?
  rm -f "$tmp"
  return $rc
}

# ---------------------------------------------------------------- main
cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  daemons) cmd_daemons ;;
  guest) cmd_guest "$@" ;;
  up) cmd_up "$@" ;;
  down) cmd_down "$@" ;;
  status) cmd_status ;;
  wait-agent) [ $# -ge 1 ] || die "usage: wait-agent DOM [TIMEOUT]"; wait_agent "$@" ;;
  gexec) [ $# -ge 2 ] || die "usage: gexec DOM 'CMD' [TIMEOUT]"; gexec "$@" ;;
  agent-hang) [ $# -eq 2 ] || die "usage: agent-hang DOM SECONDS"; agent_hang "$@" ;;
  seq-check) [ $# -ge 1 ] || die "usage: seq-check DOM [FILE]"; seq_check "$@" ;;
  ext4-cat) [ $# -eq 2 ] || die "usage: ext4-cat IMG PATH"; ext4_cat "$@" ;;
  dir) [ $# -eq 1 ] || die "usage: dir PREFIX"; check_prefix "$1"; echo "$LAB_ROOT/$1" ;;
  ""|-h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' ;;
  *) die "unknown command '$cmd' (try --help)" ;;
esac
