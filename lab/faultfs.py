#!/usr/bin/python3
# SPDX-License-Identifier: AGPL-3.0-or-later
"""faultfs: a FUSE pass-through filesystem that fails writes on demand (a broken NFS share).

Usage: faultfs.py BACKING_DIR MOUNTPOINT CONTROL_FILE   (runs in the foreground; root)

Every operation on MOUNTPOINT is passed to BACKING_DIR. CONTROL_FILE holds JSON:
    {"fail_after": BYTES or null, "errno": "EIO" | "ENOSPC" | "EROFS" | "EDQUOT", "fail_fsync": bool,
     "fail_ops": {"rename": REGEX, "mkdir": REGEX, "unlink": REGEX, "rmdir": REGEX, "create": REGEX},
     "write_delay_ms": MS, "corrupt_after": BYTES or null}
Once BYTES bytes have been written through the mount (counted from the moment the control
file last changed), every further write fails with that errno (the write that crosses the
limit is cut short); with "fail_fsync", fsync fails too. "fail_ops" fails a namespace operation
with that errno when its (source) path, as seen in the mount ("/host/vm/stamp.partial"), matches
the regular expression (re.search): e.g. {"rename": "\\.partial$"} fails the publish of a
backup and nothing else. "write_delay_ms" sleeps before each write (a slow share, so that a test
can act while a copy is under way). "corrupt_after" makes every write past BYTES (counted like
"fail_after") succeed but store its bytes inverted: a share that acknowledges what it does not
hold, which only reading the data back from the share can catch. The control file is re-read when it is replaced, so
`lab/share.sh fault DIR ...` changes the behaviour of a live mount.

Written with python3-fuse (Debian package, libfuse 2 API), single-threaded for simplicity.
"""

import errno
import json
import os
import re
import sys
import time

import fuse
from fuse import Fuse

fuse.fuse_python_api = (0, 2)


class Faults:
    """The fault policy, reloaded from the control file when it changes."""

    def __init__(self, ctl):
        self.ctl = ctl
        self.key = None
        self.fail_after = None
        self.errno = errno.EIO
        self.fail_fsync = False
        self.fail_ops = {}
        self.write_delay = 0.0
        self.corrupt_after = None
        self.written = 0

    def refresh(self):
        try:
            st = os.stat(self.ctl)
        except OSError:
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self.key:
            return
        self.key = key
        try:
            with open(self.ctl) as f:
                conf = json.load(f)
        except (OSError, ValueError) as e:
            log(f"control file unreadable, keeping the previous policy: {e}")
            return
        self.fail_after = conf.get("fail_after")
        self.errno = getattr(errno, conf.get("errno") or "EIO", errno.EIO)
        self.fail_fsync = bool(conf.get("fail_fsync"))
        self.fail_ops = {op: re.compile(rx) for op, rx in (conf.get("fail_ops") or {}).items()}
        self.write_delay = (conf.get("write_delay_ms") or 0) / 1000.0
        self.corrupt_after = conf.get("corrupt_after")
        self.written = 0
        log(f"policy: {conf}")

    def check(self, op, path):
        """Raises OSError(self.errno) when `op` on `path` is told to fail."""
        self.refresh()
        rx = self.fail_ops.get(op)
        if rx is not None and rx.search(path):
            log(f"{op} {path}: failing with {errno.errorcode[self.errno]}")
            raise OSError(self.errno, os.strerror(self.errno))

    def allow(self, length):
        """How many of `length` bytes may be written now (0 = fail with self.errno)."""
        self.refresh()
        if self.fail_after is None:
            return length
        return max(0, min(length, self.fail_after - self.written))


def log(msg):
    print(f"faultfs: {msg}", file=sys.stderr, flush=True)


def make_fs(backing, faults):
    def real(path):
        return os.path.join(backing, path.lstrip("/"))

    def guarded(fn):
        """Turns OSError into the negative errno python-fuse expects."""

        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except OSError as e:
                return -(e.errno or errno.EIO)

        return wrapper

    class FaultFile:
        """An open file of the mount, backed by a file descriptor of the backing folder."""

        def __init__(self, path, flags, *mode):
            # An OSError raised here reaches the application as its errno (python-fuse does so).
            # O_DIRECT needs aligned buffers, which Python does not give: the backing file is
            # opened without it (the mount still accepts O_DIRECT opens from the application).
            flags &= ~getattr(os, "O_DIRECT", 0)
            if flags & os.O_CREAT:
                faults.check("create", path)
            self.fd = os.open(real(path), flags, *mode)
            self.path = path

        @guarded
        def read(self, length, offset):
            return os.pread(self.fd, length, offset)

        @guarded
        def write(self, buf, offset):
            n = faults.allow(len(buf))
            if faults.write_delay:
                time.sleep(faults.write_delay)
            if n == 0:
                log(f"write {self.path} @{offset}: failing with {errno.errorcode[faults.errno]}")
                return -faults.errno
            data = buf[:n]
            if faults.corrupt_after is not None and faults.written + n > faults.corrupt_after:
                log(f"write {self.path} @{offset}: storing {n} bytes inverted")
                data = bytes(b ^ 0xFF for b in data)
            done = os.pwrite(self.fd, data, offset)
            faults.written += done
            return done

        @guarded
        def fsync(self, datasync):
            faults.refresh()
            if faults.fail_fsync:
                log(f"fsync {self.path}: failing with {errno.errorcode[faults.errno]}")
                return -faults.errno
            if datasync:
                os.fdatasync(self.fd)
            else:
                os.fsync(self.fd)

        def flush(self):
            return 0

        @guarded
        def release(self, flags):
            os.close(self.fd)

        @guarded
        def fgetattr(self):
            return os.fstat(self.fd)

        @guarded
        def ftruncate(self, length):
            os.ftruncate(self.fd, length)

    class FaultFs(Fuse):
        """Pass-through of the namespace operations to the backing folder."""

        @guarded
        def getattr(self, path):
            return os.lstat(real(path))

        @guarded
        def readdir(self, path, offset):
            return [fuse.Direntry(e) for e in [".", ".."] + os.listdir(real(path))]

        @guarded
        def readlink(self, path):
            return os.readlink(real(path))

        @guarded
        def unlink(self, path):
            faults.check("unlink", path)
            os.unlink(real(path))

        @guarded
        def rmdir(self, path):
            faults.check("rmdir", path)
            os.rmdir(real(path))

        @guarded
        def symlink(self, target, path):
            os.symlink(target, real(path))

        @guarded
        def rename(self, old, new):
            faults.check("rename", old)
            os.rename(real(old), real(new))

        @guarded
        def link(self, old, new):
            os.link(real(old), real(new))

        @guarded
        def chmod(self, path, mode):
            os.chmod(real(path), mode)

        @guarded
        def chown(self, path, uid, gid):
            os.chown(real(path), uid, gid)

        @guarded
        def truncate(self, path, length):
            os.truncate(real(path), length)

        @guarded
        def mknod(self, path, mode, dev):
            os.mknod(real(path), mode, dev)

        @guarded
        def mkdir(self, path, mode):
            faults.check("mkdir", path)
            os.mkdir(real(path), mode)

        @guarded
        def utimens(self, path, ts_acc, ts_mod):
            os.utime(real(path), ns=(ts_acc.tv_sec * 10**9 + ts_acc.tv_nsec,
                                     ts_mod.tv_sec * 10**9 + ts_mod.tv_nsec))

        @guarded
        def access(self, path, mode):
            if not os.access(real(path), mode):
                return -errno.EACCES

        @guarded
        def statfs(self):
            return os.statvfs(backing)

    return FaultFs, FaultFile


def main():
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    backing, mountpoint, ctl = (os.path.abspath(a) for a in sys.argv[1:])
    faults = Faults(ctl)
    faults.refresh()
    fs_class, file_class = make_fs(backing, faults)
    server = fs_class(version="faultfs", usage="faultfs", dash_s_do="setsingle")
    server.multithreaded = False
    server.file_class = file_class
    server.fuse_args.setmod("foreground")
    server.fuse_args.mountpoint = mountpoint
    for opt in ("big_writes", "max_write=131072", "default_permissions", "fsname=vmb-faultfs"):
        server.fuse_args.add(opt)
    log(f"mounting {backing} on {mountpoint}")
    server.main()


if __name__ == "__main__":
    main()
