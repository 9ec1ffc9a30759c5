#!/usr/bin/env bash
# The demo: the main job on the embedded lab. Installs what it needs, brings up a tiny demo
# guest (libvirt, TCG) and the Bacula daemons with the vm-backup plugin, runs the guest's
# backup job from bconsole, and shows the job's result and the backup on disk.
# Stop everything afterwards with: lab/bacula-lab.sh stop; lab/libvirt-lab.sh down demo
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
exec scripts/demo-bacula.sh
