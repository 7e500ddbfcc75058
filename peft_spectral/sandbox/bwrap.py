"""The bubblewrap command line that isolates one sandboxed interpreter.

Every program gets its own PID, mount, network, IPC and UTS namespaces, a new session, and a filesystem that holds
only: `/usr` and the `/bin`, `/lib*` links (read-only), the dynamic-loader files of `/etc`, the interpreter's own
installation (read-only, with its `site-packages` hidden), a fresh `/proc` and `/dev`, and a size-limited tmpfs at
`/tmp` that is the working directory. No host `/tmp`, `/home`, `/root`, `/run`, `/var` or socket is visible.

Unprivileged callers get a user namespace too (`--unshare-user --uid 65534 --gid 65534 --disable-userns`): the process
count limit then counts this sandbox's processes only. Root callers do not: root is exempt from `RLIMIT_NPROC` and a
user namespace would keep the kernel uid 0, so bubblewrap keeps only `CAP_SETUID`/`CAP_SETGID` and the program drops
to uid/gid 65534 itself before it runs anything it was sent (see `in_sandbox.py`).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path


__all__ = ["SandboxUnavailableError", "bwrap_argv", "check_sandbox", "interpreter"]

#: Size of the scratch tmpfs at /tmp (bytes).
SCRATCH_BYTES = 64 * 1024 * 1024
#: The uid/gid the sandboxed program runs as.
SANDBOX_ID = 65534

_INSTALL_HINT = (
    "The code sandbox needs bubblewrap (`bwrap`) with permission to create namespaces. Install it with "
    "`apt-get install bubblewrap` (Debian/Ubuntu) or `dnf install bubblewrap` (Fedora)"
)


class SandboxUnavailableError(RuntimeError):
    """bubblewrap is missing, or cannot create the namespaces the sandbox needs on this machine."""


@lru_cache(maxsize=1)
def interpreter() -> str:
    """The real path of the Python interpreter the sandbox runs (this one, outside any virtual environment)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _prefixes() -> list[str]:
    """Directories of the interpreter's own installation that are not already under /usr."""
    paths = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    paths.add(os.path.dirname(interpreter()))
    keep = []
    for path in sorted(paths):
        if path in ("/", "/usr") or path.startswith("/usr/") or not os.path.isdir(path):
            continue
        if not any(path.startswith(other + "/") for other in paths if other != path):
            keep.append(path)
    return keep


def _site_packages(roots: list[str]) -> list[str]:
    """Installed third-party packages under the bound roots, to be hidden (the sandbox runs the standard library)."""
    patterns = []
    for root in roots:
        patterns += [f"{root}/lib/python3*/site-packages", f"{root}/lib/python3*/dist-packages"]
    patterns += ["/usr/lib/python3*/dist-packages", "/usr/lib/python3*/site-packages"]
    patterns += ["/usr/local/lib/python3*/dist-packages", "/usr/local/lib/python3*/site-packages"]
    found = []
    for pattern in patterns:
        found += [p for p in sorted(glob.glob(pattern)) if os.path.isdir(p) and not os.path.islink(p)]
    return found


@lru_cache(maxsize=1)
def _filesystem_args() -> tuple[str, ...]:
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for path in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime"):
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    roots = _prefixes()
    for root in roots:
        parents = [p for p in Path(root).parents if str(p) != "/"]
        for parent in reversed(parents):  # bwrap would create them 0700, closed to the unprivileged sandbox uid
            args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", root, root]
    for hidden in _site_packages(roots):
        args += ["--tmpfs", hidden]
    args += ["--proc", "/proc", "--dev", "/dev"]
    return tuple(args)


def _is_root() -> bool:
    return os.geteuid() == 0


def _bwrap_path() -> str:
    exe = shutil.which("bwrap")
    if exe is None:
        raise SandboxUnavailableError(f"`bwrap` was not found on PATH. {_INSTALL_HINT}.")
    return exe


def bwrap_argv() -> list[str]:
    """The `bwrap ... --` prefix that runs a command in a fresh sandbox.

    Raises:
        `SandboxUnavailableError`: `bwrap` is not on `PATH`.
    """
    return [_bwrap_path(), *_options(_is_root())]


@lru_cache(maxsize=2)
def _options(is_root: bool) -> tuple[str, ...]:
    argv = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if is_root:
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        uid = str(SANDBOX_ID)
        argv += ["--unshare-user", "--uid", uid, "--gid", uid, "--disable-userns"]
    argv += ["--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv"]
    for name, value in (("HOME", "/tmp"), ("TMPDIR", "/tmp"), ("PATH", "/usr/bin:/bin"), ("LANG", "C.UTF-8")):
        argv += ["--setenv", name, value]
    argv += ["--setenv", "OMP_NUM_THREADS", "1"]
    argv += list(_filesystem_args())
    argv += ["--perms", "1777", "--size", str(SCRATCH_BYTES), "--tmpfs", "/tmp", "--chdir", "/tmp", "--"]
    return tuple(argv)


@lru_cache(maxsize=4)
def _probe(exe: str, is_root: bool) -> str:
    """Empty when a sandboxed `python -c pass` works with bwrap `exe`, else the reason."""
    try:
        probe = subprocess.run(
            [exe, *_options(is_root), interpreter(), "-I", "-S", "-c", "pass"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as err:
        return f"starting bwrap failed: {err}"
    if probe.returncode != 0:
        detail = probe.stderr.decode("utf-8", errors="replace").strip().splitlines()
        return f"bwrap could not start a sandbox (exit {probe.returncode}: {detail[-1] if detail else 'no message'})"
    return ""


def check_sandbox() -> None:
    """Raise when the sandbox cannot run on this machine (the probe runs once per bwrap path and user kind).

    util-linux `unshare` is no fallback: it creates namespaces but builds no read-only filesystem view.

    Raises:
        `SandboxUnavailableError`: naming the missing tool or the failure, and how to install bubblewrap.
    """
    reason = _probe(_bwrap_path(), _is_root())
    if reason:
        raise SandboxUnavailableError(
            f"{reason}. {_INSTALL_HINT}; unprivileged users also need user namespaces enabled "
            "(sysctl kernel.unprivileged_userns_clone=1 on older Debian kernels)."
        )
