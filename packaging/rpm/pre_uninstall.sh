# vm-backup: on erase (not upgrade), stop and disable the timers.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl stop 'vm-backup-*.timer' 'vm-backup-test-restore@*.timer' >/dev/null 2>&1 || :
    rm -f /etc/systemd/system/timers.target.wants/vm-backup-*.timer
fi
