#!/usr/bin/env bash
# Demo of vm-backup driven by Bacula: brings up the libvirt lab (domain demo-agent) and the
# Bacula lab (Director, Storage Daemon, File Daemon with the vm-backup plugin, on 127.0.0.1),
# runs the backup job of demo-agent from bconsole, and shows the job's result, its job log and
# the backup on disk (tree + sha256sum -c). Needs root (Debian 12); called by scripts/demo.sh.
# SPDX-License-Identifier: AGPL-3.0-or-later
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "build (debug: the plugin, libvm_backup.so and vm-backup)"
cargo build --quiet
build_dir=$PWD/target/debug

say "libvirt lab: domain demo-agent (tiny guest with qemu-ga, TCG)"
lab/libvirt-lab.sh up demo --only agent

say "Bacula lab: configs from bacula-conf/, SQLite catalog, plugin installed, daemons started"
VMB_BUILD_DIR=$build_dir lab/bacula-lab.sh ensure
eval "$(lab/bacula-lab.sh env)"
echo "status client=$FD_NAME" | timeout 30 bconsole -c "$BCONSOLE_CONF" | grep "Plugin:"
# The File Daemon writes its queued "Loaded plugin" line to fd.log only once a Director has
# connected (the status above): wait for it, at most 30 s.
for _ in $(seq 1 300); do grep -q "Loaded plugin" "$FD_LOG" 2>/dev/null && break; sleep 0.1; done
grep "Loaded plugin" "$FD_LOG" | tail -1 || { echo "demo: the File Daemon did not log \"Loaded plugin\" (see $FD_LOG)"; exit 1; }

say "bconsole: run job=vm-demo-agent yes (then wait)"
t0=$(date +%s.%N)
result=$(lab/bacula-lab.sh run-job vm-demo-agent) || true
echo "$result ($(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s)"
jobid=$(sed -n 's/JobId=\([0-9]*\).*/\1/p' <<<"$result")

say "llist jobid=$jobid"
echo "llist jobid=$jobid" | timeout 30 bconsole -c "$BCONSOLE_CONF" | grep -iE "^ +(jobid|job|jobstatus|jobfiles|jobbytes|joberrors|starttime|endtime|level):" || true

say "job log (list joblog jobid=$jobid)"
echo "list joblog jobid=$jobid" | timeout 30 bconsole -c "$BCONSOLE_CONF" | grep -E "vm-backup|Termination|Fatal|Error" || true

say "the catalog lists the backup (list files jobid=$jobid)"
echo "list files jobid=$jobid" | timeout 30 bconsole -c "$BCONSOLE_CONF" | grep "/@vm-backup/" || true

folder=$(sqlite3 "$CATALOG_DB" "select Path.Path from File join Path on File.PathId=Path.PathId where File.JobId=$jobid limit 1" | sed 's#^/@vm-backup/##; s#/$##')
backup="$TARGET/$(hostname)/$folder"
say "the backup on disk: $backup"
if command -v tree >/dev/null; then tree -h "$backup"; else ls -lhR "$backup"; fi
(cd "$backup" && sha256sum -c checksums.sha256)
[[ $result == *"JobStatus=T"* ]] || { echo "demo: the job did not end OK"; exit 1; }
say "done: the Bacula job backed up demo-agent through the vm-backup plugin"
