#!/usr/bin/env bash
# The packages, tested as a user gets them (root, Debian 12; called by scripts/test.sh):
#   1. scripts/package.sh builds the .deb and the .rpm (one release build);
#   2. rpm -qlp / -qp --configfiles / --requires: the RPM holds what docs/packaging.md says;
#   3. dpkg -i the .deb; man vm-backup-backup renders; systemd-analyze verify accepts the units;
#      the completions load; an edited conffile survives a reinstall;
#   4. the Bacula lab runs a backup job with the INSTALLED plugin (bacula-fd's Plugin Directory
#      is /usr/lib/bacula, the engine library mapped from there), and the status page appears
#      beside the catalog;
#   5. dpkg --purge leaves nothing of ours (not in /usr/lib/bacula, /etc, /var/lib, /usr/bin);
#   6. the status page in headless Chromium (tests/ops_status.rs with VMB_LAB_BROWSER=1).
# Step 4 needs a libvirt guest: it brings up prefix "pkg" (one agent domain) and takes it down.
# The Bacula lab uses fixed ports: this waits until no bacula-dir runs and holds
# /tmp/vmb-bacula-lab.lock meanwhile; its own lab folder is /var/lib/vm-backup-lab/bacula-pkg.
# SPDX-License-Identifier: AGPL-3.0-or-later
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PATH="$HOME/.cargo/bin:$PATH"
[ "$(id -u)" -eq 0 ] || { echo "test-package: must run as root" >&2; exit 1; }

step() { printf '\n== package test: %s\n' "$*" >&2; }
fail() { echo "test-package: FAIL: $*" >&2; exit 1; }
ok() { echo "  ok: $*" >&2; }

# dpkg has no lock timeout: retry while another apt/dpkg holds the lock (other engineers,
# install-deps), fail at once on any other error.
dpkg_retry() {
  local out i
  for i in $(seq 1 60); do
    if out=$(dpkg "$@" 2>&1); then echo "$out"; return 0; fi
    grep -q "lock" <<<"$out" || { echo "$out" >&2; return 1; }
    sleep 10
  done
  echo "$out" >&2
  return 1
}

# --deb-only: skip the RPM (its tool's first `cargo install` is long); scripts/test.sh runs all.
deb_only=0
[ "${1:-}" = --deb-only ] && deb_only=1

step "build the packages"
if [ "$deb_only" = 1 ]; then
  mapfile -t pkgs < <(scripts/package.sh --deb-only)
  deb=${pkgs[0]:-}
  [ -f "$deb" ] || fail "package.sh made no .deb (got: ${pkgs[*]})"
else
  mapfile -t pkgs < <(scripts/package.sh)
  deb=${pkgs[0]:-} rpm=${pkgs[1]:-}
  [ -f "$deb" ] && [ -f "$rpm" ] || fail "package.sh made no .deb/.rpm (got: ${pkgs[*]})"
fi
ok "${pkgs[*]}"

check_rpm() {
step "rpm -qlp lists the expected files"
rpm_files=$(rpm -qlp "$rpm" 2>/dev/null)
for f in /usr/bin/vm-backup /usr/lib64/bacula/vm-backup-fd.so /usr/lib64/bacula/libvm_backup.so \
         /etc/vm-backup/vm-backup.conf /etc/vm-backup/vm-list.yaml \
         /usr/lib/systemd/system/vm-backup-verify.service /usr/lib/systemd/system/vm-backup-verify.timer \
         /usr/lib/systemd/system/vm-backup-test-restore@.service /usr/lib/systemd/system/vm-backup-test-restore@.timer \
         /usr/lib/systemd/system/vm-backup-prune.timer /usr/lib/systemd/system/vm-backup-report.timer \
         /usr/share/man/man1/vm-backup.1.gz /usr/share/man/man1/vm-backup-backup.1.gz \
         /usr/share/man/man1/vm-backup-status.1.gz \
         /usr/share/bash-completion/completions/vm-backup /usr/share/zsh/site-functions/_vm-backup \
         /usr/share/licenses/vm-backup/LICENSE; do
  grep -qx "$f" <<<"$rpm_files" || fail "the RPM lacks $f"
done
ok "$(wc -l <<<"$rpm_files") files"
rpm_conf=$(rpm -qp --configfiles "$rpm" 2>/dev/null)
for f in /etc/vm-backup/vm-backup.conf /etc/vm-backup/vm-list.yaml; do
  grep -qx "$f" <<<"$rpm_conf" || fail "the RPM does not mark $f as a configuration file"
done
rpm_req=$(rpm -qp --requires "$rpm" 2>/dev/null)
grep -q '^qemu-img' <<<"$rpm_req" || fail "the RPM does not require qemu-img: $rpm_req"
grep -q '^libvirt.so.0' <<<"$rpm_req" || fail "the RPM does not require libvirt.so.0: $rpm_req"
ok "configuration files and requirements (qemu-img, libvirt.so.0)"
}
[ "$deb_only" = 1 ] || check_rpm

step "the .deb's control data"
control=$(dpkg-deb -f "$deb")
grep -q '^Depends:.*libvirt0' <<<"$control" || fail "Depends lacks libvirt0: $control"
grep -q '^Depends:.*qemu-utils' <<<"$control" || fail "Depends lacks qemu-utils"
grep -q '^Recommends:.*bacula-fd' <<<"$control" || fail "Recommends lacks bacula-fd"
conffiles=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./conffiles)
for f in /etc/vm-backup/vm-backup.conf /etc/vm-backup/vm-list.yaml; do
  grep -qx "$f" <<<"$conffiles" || fail "$f is not a conffile"
done
ok "$(grep '^Depends:' <<<"$control")"

step "dpkg -i"
if dpkg-query -W -f='${Status}' vm-backup 2>/dev/null | grep -q installed; then
  dpkg_retry --purge vm-backup >/dev/null
fi
dpkg_retry -i "$deb" >/dev/null
trap 'dpkg --purge vm-backup >/dev/null 2>&1 || true' EXIT
[ "$(/usr/bin/vm-backup --version)" = "vm-backup $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)" ] \
  || fail "vm-backup --version: $(/usr/bin/vm-backup --version)"
for f in /usr/lib/bacula/vm-backup-fd.so /usr/lib/bacula/libvm_backup.so /var/lib/vm-backup; do
  [ -e "$f" ] || fail "$f missing after dpkg -i"
done
ok "installed: $(dpkg-query -W -f='${Package} ${Version}' vm-backup)"

step "man vm-backup-backup renders"
page=$(MANPAGER=cat MANWIDTH=100 man vm-backup-backup 2>&1) || fail "man vm-backup-backup: $page"
grep -q "vm-backup-backup - Back up one VM to the target" <<<"$page" || fail "unexpected page: $page"
grep -q -- "--method" <<<"$page" || fail "the page lacks --method"
MANPAGER=cat man vm-backup-status | grep -q -- "--html" || fail "man vm-backup-status lacks --html"
ok "$(grep -c . <<<"$page") lines"

step "bash completion loads"
bash -c 'source /usr/share/bash-completion/completions/vm-backup && complete -p vm-backup' >/dev/null \
  || fail "bash completion does not register vm-backup"
ok "complete -p vm-backup"

step "systemd-analyze verify"
units=(/lib/systemd/system/vm-backup-{verify,prune,report}.{service,timer})
# A template is verified through an instance.
out=$(systemd-analyze verify "${units[@]}" vm-backup-test-restore@web01.service vm-backup-test-restore@web01.timer 2>&1) \
  || fail "systemd-analyze verify: $out"
# verify prints warnings without failing; ours must be clean.
if grep -i "vm-backup" <<<"$out"; then fail "systemd-analyze verify warns about our units"; fi
ok "${#units[@]} units + the test-restore@ template"

step "an edited conffile survives a reinstall"
echo "# local edit $$" >> /etc/vm-backup/vm-backup.conf
dpkg_retry --force-confold -i "$deb" >/dev/null
grep -q "# local edit $$" /etc/vm-backup/vm-backup.conf || fail "the edit of vm-backup.conf was lost"
ok "kept"

step "Bacula job with the installed plugin"
export VMB_BACULA_LAB=/var/lib/vm-backup-lab/bacula-pkg
inventory=$(mktemp)
cat > "$inventory" <<EOF
vms:
  - name: pkg-agent
    method: auto
    priority: 10
EOF
lab_job() {
  set -euo pipefail
  # The lab's other user may be mid-run: wait until no Director runs (fixed ports).
  for _ in $(seq 1 180); do pgrep -x bacula-dir >/dev/null || break; sleep 10; done
  pgrep -x bacula-dir >/dev/null && fail "a bacula-dir still runs after 30 min"
  # VMB_BUILD_DIR=/usr/bin: the lab generates the jobs with the installed vm-backup.
  VMB_BUILD_DIR=/usr/bin lab/bacula-lab.sh setup --inventory "$inventory"
  # Point the File Daemon at the distribution's Plugin Directory; install-plugin is not run.
  sed -i 's#^\( *Plugin Directory = \).*#\1"/usr/lib/bacula"#' "$VMB_BACULA_LAB/etc/bacula-fd.conf"
  grep -q 'Plugin Directory = "/usr/lib/bacula"' "$VMB_BACULA_LAB/etc/bacula-fd.conf" || fail "Plugin Directory not set"
  [ -z "$(ls -A "$VMB_BACULA_LAB/plugins")" ] || fail "the lab's own plugin folder is not empty"
  VMB_BUILD_DIR=/usr/bin lab/bacula-lab.sh start
  trap 'lab/bacula-lab.sh stop >/dev/null 2>&1 || true' EXIT
  eval "$(lab/bacula-lab.sh env)"
  fd_pid=$(cat "$VMB_BACULA_LAB/work/fd.pid")
  grep -q " /usr/lib/bacula/libvm_backup.so$" "/proc/$fd_pid/maps" \
    || fail "bacula-fd did not map /usr/lib/bacula/libvm_backup.so: $(grep -o '/[^ ]*vm_backup[^ ]*' "/proc/$fd_pid/maps" | sort -u)"
  grep -q "$root/target" "/proc/$fd_pid/maps" && fail "bacula-fd mapped something from the build folder"
  ok "bacula-fd loaded /usr/lib/bacula/vm-backup-fd.so and /usr/lib/bacula/libvm_backup.so"
  result=$(lab/bacula-lab.sh run-job vm-pkg-agent) || { grep -i "vm-backup\|error" "$JOB_LOG" | tail -20 >&2; fail "job: $result"; }
  ok "$result"
  # The File Daemon's message file is written by the time a job has run.
  grep -q "Loaded plugin: vm-backup-fd.so" "$FD_LOG" || { tail "$FD_LOG" >&2; fail "bacula-fd did not log loading the plugin"; }
  backup=$(ls -d "$TARGET"/*/pkg-agent/2* | tail -1)
  (cd "$backup" && sha256sum --quiet -c checksums.sha256) || fail "checksums of $backup"
  [ -s "$TARGET/metadata/status.html" ] || fail "no status page beside the catalog after the run"
  grep -q 'data-vm="pkg-agent"' "$TARGET/metadata/status.html" || fail "the status page lacks pkg-agent"
  ok "backup $backup verified, status page written"
  lab/bacula-lab.sh stop >/dev/null 2>&1 || true
  rm -rf "$VMB_BACULA_LAB"   # its target holds the guest's backup; kept only when a step failed
}
(
  trap 'lab/libvirt-lab.sh down pkg >/dev/null 2>&1 || true' EXIT
  lab/libvirt-lab.sh up pkg --only agent
  export -f lab_job fail ok
  export inventory root
  flock -w 3600 /tmp/vmb-bacula-lab.lock bash -c lab_job
)
rm -f "$inventory"

step "dpkg --purge"
dpkg_retry --purge vm-backup >/dev/null
trap - EXIT
left=$(ls /usr/lib/bacula | grep -E 'vm-backup|vm_backup' || true)
[ -z "$left" ] || fail "left in /usr/lib/bacula: $left"
for f in /usr/bin/vm-backup /etc/vm-backup /var/lib/vm-backup /lib/systemd/system/vm-backup-verify.timer \
         /usr/share/man/man1/vm-backup-backup.1.gz; do
  [ ! -e "$f" ] || fail "$f left after purge"
done
ok "nothing left"

step "the status page in headless Chromium"
VMB_LAB_BROWSER=1 cargo test --quiet --test ops_status status_page_renders_in_headless_chromium
ok "DOM checked, screenshot in target/tmp/status-page.png"

echo "== package tests passed" >&2
