#!/usr/bin/env bash
# vm-backup Bacula lab: a real Director, Storage Daemon and File Daemon (Bacula 9.6, SQLite
# catalog, File device) on 127.0.0.1 with non-default ports, the vm-backup plugin installed in the
# File Daemon, driven by bconsole. Recipes from /work/shared/notes/bacula.md.
# SPDX-License-Identifier: AGPL-3.0-or-later
#
# Usage: lab/bacula-lab.sh <command> [args]   (root, Debian 12)
#   setup [--inventory FILE]   wipe the lab, write configs from bacula-conf/, create the catalog,
#                              generate the VM jobs (vm-backup bacula-config) into etc/dir.d/
#   jobs [--inventory FILE]    regenerate etc/dir.d/vms.conf and `reload` the Director
#   install-plugin             copy the freshly built vm-backup-fd.so + libvm_backup.so (regular files)
#   start | stop | restart-fd | status   (starting the File Daemon waits until fd.log says
#                              "Loaded plugin")
#   up [--inventory FILE]      setup + install-plugin + start (the usual entry point)
#   ensure [--inventory FILE]  up unless running with the current plugin (idempotent; for tests)
#   console                    bconsole (stdin: commands) with timeout
#   run-job JOB [LEVEL]        run JOB, wait, print "JobId=N JobStatus=X"; exit 0 iff X is T
#   wait JOBID                 wait for a job, print "JobId=N JobStatus=X"; exit 0 iff T
#   env                        print the lab's paths and ports as shell assignments
#
# Layout (absolute): $VMB_BACULA_LAB (default /var/lib/vm-backup-lab/bacula)/
#   etc/ (configs, dir.d/, vm-backup.conf, vm-list.yaml)  work/{dir,sd,fd}/  storage/  plugins/
#   log/ (jobs.log, dir-daemon.log, fd.log, *.out)  target/ (backup target)  restore/
# Build selection: $VMB_BUILD_DIR (default <repo>/target/debug) holds vm-backup-fd.so,
# libvm_backup.so and the vm-backup binary.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAB=${VMB_BACULA_LAB:-/var/lib/vm-backup-lab/bacula}
BUILD_DIR=${VMB_BUILD_DIR:-$REPO_DIR/target/debug}
DIR_PORT=${VMB_DIR_PORT:-19101}
FD_PORT=${VMB_FD_PORT:-19102}
SD_PORT=${VMB_SD_PORT:-19103}
ADDR=127.0.0.1
DIR_NAME=vmb-dir
FD_NAME=vmb-fd
SD_NAME=vmb-sd
CATALOG=VmbCatalog
CONSOLE_PW=vmb-console-pw
FD_PW=vmb-fd-pw
SD_PW=vmb-sd-pw
PREFIX=${VMB_LAB_PREFIX:-bac}
BCONSOLE_TIMEOUT=${VMB_BCONSOLE_TIMEOUT:-120}

log() { echo "bacula-lab: $*" >&2; }
die() { echo "bacula-lab: ERROR: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root"; }

deps() {
  local p
  for p in /usr/sbin/bacula-dir /usr/sbin/bacula-sd /usr/sbin/bacula-fd /usr/sbin/bconsole; do
    [ -x "$p" ] || { "$REPO_DIR/scripts/install-deps.sh" >&2; return; }
  done
  command -v sqlite3 >/dev/null || "$REPO_DIR/scripts/install-deps.sh" >&2
}

default_inventory() {
  # The lab's VMs: the libvirt lab's domains of prefix $VMB_LAB_PREFIX (default "bac",
  # lab/libvirt-lab.sh up bac), plus the demo's, and a VM that does not exist (failure tests).
  cat <<EOF
vms:
  - name: $PREFIX-agent
    method: auto
    priority: 10
  - name: $PREFIX-noagent
    method: snapshot
    priority: 20
  - name: demo-agent
    method: auto
    priority: 10
  - name: $PREFIX-missing
    method: auto
    priority: 30
EOF
}

fill() { # template -> output, replacing @NAME@ placeholders
  sed -e "s#@DIR_NAME@#$DIR_NAME#g" -e "s#@DIR_ADDRESS@#$ADDR#g" -e "s#@DIR_PORT@#$DIR_PORT#g" \
      -e "s#@CONSOLE_PASSWORD@#$CONSOLE_PW#g" -e "s#@WORK_DIR@#$LAB/work/dir#g" \
      -e "s#@QUERY_FILE@#/etc/bacula/scripts/query.sql#g" \
      -e "s#@SD_NAME@#$SD_NAME#g" -e "s#@SD_ADDRESS@#$ADDR#g" -e "s#@SD_PORT@#$SD_PORT#g" \
      -e "s#@SD_PASSWORD@#$SD_PW#g" -e "s#@SD_WORK_DIR@#$LAB/work/sd#g" \
      -e "s#@STORAGE_DIR@#$LAB/storage#g" -e "s#@CATALOG@#$CATALOG#g" \
      -e "s#@JOB_LOG@#$LAB/log/jobs.log#g" -e "s#@DAEMON_LOG@#$LAB/log/dir-daemon.log#g" \
      -e "s#@RESTORE_WHERE@#$LAB/restore#g" -e "s#@INCLUDE_DIR@#$LAB/etc/dir.d#g" \
      -e "s#@RESTORE_CLIENT@#$FD_NAME#g" \
      -e "s#@FD_NAME@#$FD_NAME#g" -e "s#@FD_ADDRESS@#$ADDR#g" -e "s#@FD_PORT@#$FD_PORT#g" \
      -e "s#@FD_PASSWORD@#$FD_PW#g" -e "s#@FD_WORK_DIR@#$LAB/work/fd#g" \
      -e "s#@PLUGIN_DIR@#$LAB/plugins#g" -e "s#@FD_LOG@#$LAB/log/fd.log#g" \
      "$REPO_DIR/bacula-conf/$1" > "$2"
  if grep -v '^ *#' "$2" | grep -q '@[A-Z_]*@'; then die "unfilled placeholder in $2"; fi
  chmod 600 "$2"
}

vm_backup_bin() {
  [ -x "$BUILD_DIR/vm-backup" ] || die "no $BUILD_DIR/vm-backup: run cargo build first"
  echo "$BUILD_DIR/vm-backup"
}

gen_jobs() {
  local inventory=$1
  [ -f "$inventory" ] || die "no inventory $inventory"
  [ "$inventory" = "$LAB/etc/vm-list.yaml" ] || cp "$inventory" "$LAB/etc/vm-list.yaml"
  "$(vm_backup_bin)" bacula-config --inventory "$LAB/etc/vm-list.yaml" \
    --client "$FD_NAME=$ADDR" --fd-port "$FD_PORT" --fd-password "$FD_PW" --catalog "$CATALOG" \
    --config "$LAB/etc/vm-backup.conf" --output "$LAB/etc/dir.d/vms.conf"
  chmod 600 "$LAB/etc/dir.d/vms.conf"
}

cmd_setup() {
  need_root; deps
  local inventory=""
  while [ $# -gt 0 ]; do case $1 in --inventory) inventory=$2; shift 2;; *) die "setup: unknown $1";; esac; done
  cmd_stop >/dev/null 2>&1 || true
  rm -rf "$LAB"
  mkdir -p "$LAB"/{etc/dir.d,work/dir,work/sd,work/fd,storage,plugins,log,target,restore,journal}
  chmod 755 "$LAB" "$LAB/target" "$LAB/restore"   # libvirt-qemu must traverse to restored disks
  fill bacula-dir.conf "$LAB/etc/bacula-dir.conf"
  fill bacula-sd.conf "$LAB/etc/bacula-sd.conf"
  fill bacula-fd.conf "$LAB/etc/bacula-fd.conf"
  fill bconsole.conf "$LAB/etc/bconsole.conf"
  cat > "$LAB/etc/vm-backup.conf" <<EOF
# vm-backup site settings of the Bacula lab (plugin string: config=$LAB/etc/vm-backup.conf)
target = "$LAB/target"
journal_dir = "$LAB/journal"
inventory = "$LAB/etc/vm-list.yaml"
EOF
  if [ -n "$inventory" ]; then cp "$inventory" "$LAB/etc/vm-list.yaml"; else default_inventory > "$LAB/etc/vm-list.yaml"; fi
  # An initialised target: the plugin refuses a folder without its marker (an unmounted share).
  "$(vm_backup_bin)" init --config "$LAB/etc/vm-backup.conf" >/dev/null || die "vm-backup init failed"
  gen_jobs "$LAB/etc/vm-list.yaml"
  # SQLite catalog: Debian's script hardcodes /var/lib/bacula and a db-name placeholder.
  sed -e "s#^cd /var/lib/bacula#cd '$LAB/work/dir'#" -e 's/XXX_DBNAME_XXX/bacula/' \
    /usr/share/bacula-director/make_sqlite3_tables > "$LAB/work/make_tables.sh"
  sh "$LAB/work/make_tables.sh" >/dev/null 2>&1
  [ -s "$LAB/work/dir/bacula.db" ] || die "catalog not created"
  /usr/sbin/bacula-dir -t -c "$LAB/etc/bacula-dir.conf" || die "bacula-dir -t failed"
  /usr/sbin/bacula-sd -t -c "$LAB/etc/bacula-sd.conf" || die "bacula-sd -t failed"
  /usr/sbin/bacula-fd -t -c "$LAB/etc/bacula-fd.conf" || die "bacula-fd -t failed"
  log "set up in $LAB"
}

cmd_install_plugin() {
  local so=${VMB_FD_PLUGIN_SO:-$BUILD_DIR/vm-backup-fd.so} lib=$BUILD_DIR/libvm_backup.so
  [ -f "$so" ] || die "no $so: run cargo build first"
  [ -f "$lib" ] || die "no $lib: run cargo build first"
  mkdir -p "$LAB/plugins"
  # Copies, never symlinks (the File Daemon ignores symlinked plugins); replaced by rename so a
  # running File Daemon keeps its mapped copy.
  cp "$so" "$LAB/plugins/.vm-backup-fd.so.new" && mv -f "$LAB/plugins/.vm-backup-fd.so.new" "$LAB/plugins/vm-backup-fd.so"
  cp "$lib" "$LAB/plugins/.libvm_backup.so.new" && mv -f "$LAB/plugins/.libvm_backup.so.new" "$LAB/plugins/libvm_backup.so"
  sha256sum "$so" "$lib" | awk '{print $1}' | tr '\n' ' ' > "$LAB/plugins/.installed"
}

listening() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }

pid_alive() { [ -f "$LAB/work/$1.pid" ] && kill -0 "$(cat "$LAB/work/$1.pid")" 2>/dev/null; }

start_one() { # name binary port
  local name=$1 bin=$2 port=$3
  if pid_alive "$name"; then return 0; fi
  listening "$port" && die "port $port is taken by another process"
  # -f: foreground, so $! is the daemon's pid.
  "$bin" -f -d 0 -c "$LAB/etc/bacula-$name.conf" > "$LAB/log/$name.out" 2>&1 &
  echo $! > "$LAB/work/$name.pid"
}

wait_port() { # port name
  local i
  for i in $(seq 1 100); do listening "$1" && return 0; pid_alive "$2" || break; sleep 0.1; done
  tail -5 "$LAB/log/$2.out" >&2 || true
  die "$2 did not listen on port $1"
}

# How many "Loaded plugin" lines fd.log holds (0 before the first start).
plugin_lines() {
  local n
  n=$(grep -c "Loaded plugin" "$LAB/log/fd.log" 2>/dev/null) || true
  echo "${n:-0}"
}

# The File Daemon queues "Loaded plugin: vm-backup-fd.so" at start and writes it to fd.log only
# when a Director connects (a job, `status client`): connect, then wait (at most 30 s) for a line
# newer than the $1 lines counted before it started, so that whoever reads fd.log next (the demo,
# the lab tests) finds it.
wait_plugin_loaded() { # lines_before
  local i
  for i in $(seq 1 30); do
    echo "status client=$FD_NAME" | timeout 10 /usr/sbin/bconsole -c "$LAB/etc/bconsole.conf" >/dev/null 2>&1 || true
    [ "$(plugin_lines)" -gt "$1" ] && return 0
    pid_alive fd || break
    sleep 1
  done
  tail -n 5 "$LAB/log/fd.log" "$LAB/log/fd.out" >&2 || true
  die "the File Daemon did not log \"Loaded plugin\" (see $LAB/log/fd.log)"
}

cmd_start() {
  need_root
  [ -f "$LAB/etc/bacula-dir.conf" ] || die "not set up: run $0 setup"
  local fd_was_running=0 before
  pid_alive fd && fd_was_running=1
  before=$(plugin_lines)
  start_one sd /usr/sbin/bacula-sd "$SD_PORT"
  start_one fd /usr/sbin/bacula-fd "$FD_PORT"
  start_one dir /usr/sbin/bacula-dir "$DIR_PORT"
  wait_port "$SD_PORT" sd; wait_port "$FD_PORT" fd; wait_port "$DIR_PORT" dir
  [ "$fd_was_running" = 1 ] || wait_plugin_loaded "$before"
  log "daemons up (dir :$DIR_PORT, fd :$FD_PORT, sd :$SD_PORT)"
}

stop_one() {
  local name=$1 pid i
  [ -f "$LAB/work/$name.pid" ] || return 0
  pid=$(cat "$LAB/work/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$LAB/work/$name.pid"
}

cmd_stop() {
  stop_one dir & stop_one fd & stop_one sd & wait
  log "daemons stopped"
}

cmd_restart_fd() {
  need_root
  local before
  stop_one fd
  before=$(plugin_lines)
  start_one fd /usr/sbin/bacula-fd "$FD_PORT"
  wait_port "$FD_PORT" fd
  wait_plugin_loaded "$before"
}

cmd_up() {
  cmd_setup "$@"
  cmd_install_plugin
  cmd_start
}

cmd_ensure() {
  local want
  want=$(sha256sum "${VMB_FD_PLUGIN_SO:-$BUILD_DIR/vm-backup-fd.so}" "$BUILD_DIR/libvm_backup.so" | awk '{print $1}' | tr '\n' ' ')
  # A lab set up for another prefix's domains (VMB_LAB_PREFIX) is set up again.
  if [ ! -s "$LAB/work/dir/bacula.db" ] || [ ! -f "$LAB/etc/bacula-dir.conf" ] ||
     { [ $# -eq 0 ] && ! grep -q "name: $PREFIX-agent\$" "$LAB/etc/vm-list.yaml" 2>/dev/null; }; then
    cmd_up "$@"
    return
  fi
  if [ "$(cat "$LAB/plugins/.installed" 2>/dev/null)" != "$want" ]; then
    log "plugin changed: reinstalling it and restarting the File Daemon"
    cmd_install_plugin
    stop_one fd
  fi
  cmd_start   # starts whichever daemon is not running
}

console() { timeout "$BCONSOLE_TIMEOUT" /usr/sbin/bconsole -c "$LAB/etc/bconsole.conf"; }

cmd_wait() {
  local id=$1 out status
  out=$(echo "wait jobid=$id" | console) || true
  status=$(sed -n 's/.*JobStatus=.*(\(.\)).*/\1/p' <<<"$out" | tail -1)
  [ -n "$status" ] || status=$(sqlite3 "$LAB/work/dir/bacula.db" "select JobStatus from Job where JobId=$id" 2>/dev/null || echo "?")
  echo "JobId=$id JobStatus=$status"
  [ "$status" = T ]
}

cmd_run_job() {
  local job=$1 level=${2:-} out id
  out=$(echo "run job=$job ${level:+level=$level }yes" | console)
  id=$(sed -n 's/.*Job queued\. JobId=\([0-9]*\).*/\1/p' <<<"$out" | tail -1)
  [ -n "$id" ] || { echo "$out" >&2; die "job $job was not queued"; }
  cmd_wait "$id"
}

cmd_status() {
  local n
  for n in dir sd fd; do
    if pid_alive "$n"; then echo "$n: running (pid $(cat "$LAB/work/$n.pid"))"; else echo "$n: stopped"; fi
  done
}

cmd_env() {
  cat <<EOF
VMB_BACULA_LAB=$LAB
BCONSOLE_CONF=$LAB/etc/bconsole.conf
CATALOG_DB=$LAB/work/dir/bacula.db
TARGET=$LAB/target
JOB_LOG=$LAB/log/jobs.log
FD_LOG=$LAB/log/fd.log
DIR_PORT=$DIR_PORT
FD_PORT=$FD_PORT
SD_PORT=$SD_PORT
FD_NAME=$FD_NAME
EOF
}

main() {
  local cmd=${1:-}
  shift || true
  case $cmd in
    setup) cmd_setup "$@";;
    jobs) local inv=$LAB/etc/vm-list.yaml; [ "${1:-}" = --inventory ] && inv=$2
          gen_jobs "$inv"; echo reload | console >/dev/null;;
    install-plugin) cmd_install_plugin;;
    start) cmd_start;;
    stop) cmd_stop;;
    restart-fd) cmd_restart_fd;;
    up) cmd_up "$@";;
    ensure) cmd_ensure "$@";;
    console) console;;
    run-job) [ $# -ge 1 ] || die "run-job JOB [LEVEL]"; cmd_run_job "$@";;
    wait) [ $# -eq 1 ] || die "wait JOBID"; cmd_wait "$1";;
    status) cmd_status;;
    env) cmd_env;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; [ -z "$cmd" ] || exit 2;;
  esac
}

main "$@"
