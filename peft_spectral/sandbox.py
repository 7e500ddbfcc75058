"""Run untrusted Python (model-written code plus its tests) in a separate, restricted process.

Layers of protection, from strongest to weakest (each one is used when the platform allows it):

1. A new network namespace (`unshare -n`, or `unshare -rn` without root): no network interface at all.
2. When running as root, the child drops to the `nobody` user, so it cannot write or delete the caller's files.
3. Resource limits: address space (`RLIMIT_AS`), output file size, no core dumps, and a process-count limit when
   running as `nobody`; a wall-clock timeout that kills the whole process group.
4. A fresh, empty scratch directory as the working directory, removed afterwards.
5. A human-eval-style reliability guard inside the child before the user code runs: `socket` disabled, file
   deletion/renaming/`chmod`, `subprocess`, `os.system`, `fork` and `ctypes` removed, and `open` refusing to write
   outside the scratch directory.

The code passes only if it runs to its end: a non-zero exit, an exception, a timeout, a signal or an early
`sys.exit`/`os._exit` all count as failure. Nothing the child does raises in the caller.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache


__all__ = ["SandboxResult", "run_code"]

#: Largest stdout/stderr file the child may write (bytes); beyond it the child gets SIGXFSZ.
MAX_OUTPUT_BYTES = 8 * 1024 * 1024


@dataclass
class SandboxResult:
    """The outcome of [`run_code`].

    Args:
        passed (`bool`): The code ran to its end without error within the limits.
        timed_out (`bool`): The wall-clock timeout killed it.
        error (`str`): Empty when passed; otherwise a short reason (the last lines of stderr, the signal, ...).
    """

    passed: bool
    timed_out: bool = False
    error: str = ""


# The program the child interpreter runs. It reads the completion token and the user code from stdin, locks itself
# down, runs the code, and prints the token only if the code ran to its end.
_LAUNCHER = r"""
import sys
_PRELOAD = (
    "abc", "array", "base64", "binascii", "bisect", "calendar", "cmath", "collections", "collections.abc",
    "contextlib", "copy", "dataclasses", "datetime", "decimal", "enum", "fractions", "functools", "hashlib", "heapq",
    "inspect", "io", "itertools", "json", "linecache", "math", "numbers", "operator", "pwd", "random", "re",
    "statistics", "string", "struct", "textwrap", "time", "traceback", "types", "typing", "unicodedata", "warnings",
    "socket", "_socket", "shutil", "subprocess", "faulthandler", "encodings.idna",
)
_token = sys.stdin.readline().strip()
_memory = int(sys.stdin.readline())
_code = sys.stdin.read()
sys.stdin.close()

def _lockdown(memory_bytes):
    import builtins, faulthandler, io, os, resource
    scratch = os.path.realpath(os.getcwd())
    limit = lambda res, value: resource.setrlimit(res, (value, value))
    if memory_bytes > 0:
        limit(resource.RLIMIT_AS, memory_bytes)
        try:
            limit(resource.RLIMIT_DATA, memory_bytes)
        except (ValueError, OSError):
            pass
    limit(resource.RLIMIT_CORE, 0)
    # Import the standard library modules programs commonly use while the interpreter's files are still readable
    # (after dropping to `nobody` they may not be, e.g. a Python installed under /root).
    import importlib
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:
            pass
    if os.geteuid() == 0:
        try:
            import pwd
            nobody = pwd.getpwnam("nobody")
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            limit(resource.RLIMIT_NPROC, 16)
        except (KeyError, OSError):
            pass  # e.g. uid 0 inside a user namespace where `nobody` is not mapped
    os.environ.clear()
    os.environ.update({"OMP_NUM_THREADS": "1", "HOME": scratch, "TMPDIR": scratch})
    faulthandler.disable()

    import socket, _socket
    def _no_network(*args, **kwargs):
        raise PermissionError("network access is disabled in the sandbox")
    for module in (socket, _socket):
        for name in ("socket", "socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo",
                     "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(module, name):
                setattr(module, name, _no_network)

    real_open = builtins.open
    def _inside(path):
        if isinstance(path, int):
            return True
        full = os.path.realpath(os.fspath(path))
        return full == scratch or full.startswith(scratch + os.sep) or full == os.devnull
    def _guarded_open(file, mode="r", *args, **kwargs):
        if any(ch in mode for ch in "wax+") and not _inside(file):
            raise PermissionError(f"writing outside the sandbox is not allowed: {file!r}")
        return real_open(file, mode, *args, **kwargs)
    builtins.open = io.open = _guarded_open
    import _io
    class _GuardedFileIO(_io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(ch in mode for ch in "wax+") and not _inside(file):
                raise PermissionError(f"writing outside the sandbox is not allowed: {file!r}")
            super().__init__(file, mode, *args, **kwargs)
    io.FileIO = _io.FileIO = _GuardedFileIO
    real_os_open = os.open
    def _guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and not _inside(path):
            raise PermissionError(f"writing outside the sandbox is not allowed: {path!r}")
        return real_os_open(path, flags, *args, **kwargs)
    os.open = _guarded_os_open

    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
                 "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
                 "chroot", "lchflags", "lchmod", "lchown", "chdir", "link", "symlink", "execv", "execve", "execvp",
                 "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnl", "spawnle",
                 "posix_spawn", "posix_spawnp", "popen", "setgid", "setgroups", "setreuid", "setresuid"):
        if hasattr(os, name):
            setattr(os, name, None)
    import shutil, subprocess
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = None
    builtins.exit = builtins.quit = builtins.help = None
    for name in ("ctypes", "_ctypes", "ipdb", "joblib", "resource", "psutil", "tkinter", "multiprocessing", "pty"):
        sys.modules[name] = None

_lockdown(_memory)
del _lockdown
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(_code, "<sandbox>", "exec"), _globals)
except SystemExit as err:
    print(f"SystemExit({err.code!r}) before the end of the program", file=sys.stderr)
    sys.stderr.flush()
    raise
sys.stdout.flush()
sys.stdout.write("\n" + _token + "\n")
sys.stdout.flush()
"""


@lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """The `unshare` invocation that gives the child its own (empty) network namespace here, or `()`."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    for flags in (("-n",), ("-r", "-n")):
        cmd = (exe, *flags, "--")
        try:
            probe = subprocess.run([*cmd, sys.executable, "-c", "pass"], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return cmd
    return ()


def _tail(path: str, limit: int = 2000) -> str:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - limit))
        return handle.read().decode("utf-8", errors="replace")


def _set_output_limit() -> None:  # runs in the child between fork and exec
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_OUTPUT_BYTES, MAX_OUTPUT_BYTES))


def run_code(code: str, *, timeout: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Run `code` as a Python program in a restricted child process.

    Args:
        code (`str`): The full program (e.g. HumanEval prompt + completion + tests + `check(entry_point)`).
        timeout (`float`, defaults to 5.0): Wall-clock seconds before the whole process group is killed.
        memory_mb (`int`, defaults to 512): Address-space limit of the child in MiB (`0` disables it).

    Returns:
        [`SandboxResult`]: never raises for anything the code does.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    if memory_mb < 0:
        raise ValueError(f"memory_mb must be >= 0, got {memory_mb}")
    token = secrets.token_hex(16)
    outer = tempfile.mkdtemp(prefix="peft_spectral_sandbox_")
    try:
        scratch = os.path.join(outer, "scratch")
        os.mkdir(scratch)
        os.chmod(outer, 0o711)
        os.chmod(scratch, 0o777)
        stdout_path, stderr_path = os.path.join(outer, "stdout"), os.path.join(outer, "stderr")
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            return _run(code, token, scratch, out, err, stdout_path, stderr_path, timeout, memory_mb)
    except Exception as exc:  # the sandbox itself failed (e.g. cannot start a process): a failed run, not a crash
        return SandboxResult(passed=False, error=f"sandbox error: {type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def _run(code, token, scratch, out, err, stdout_path, stderr_path, timeout, memory_mb) -> SandboxResult:
    cmd = [*_unshare_prefix(), sys.executable, "-I", "-c", _LAUNCHER]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    proc = subprocess.Popen(
        cmd,
        cwd=scratch,
        stdin=subprocess.PIPE,
        stdout=out,
        stderr=err,
        env=env,
        start_new_session=True,
        preexec_fn=_set_output_limit,
    )
    payload = f"{token}\n{memory_mb * 1024 * 1024}\n{code}".encode("utf-8", errors="replace")
    timed_out = False
    try:
        proc.communicate(input=payload, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    except BrokenPipeError:
        pass
    finally:
        _kill_group(proc)
    if timed_out:
        return SandboxResult(passed=False, timed_out=True, error=f"timed out after {timeout:g} s")
    stdout_tail = _tail(stdout_path, 256)
    stderr_tail = _tail(stderr_path).strip()
    finished = stdout_tail.rstrip().endswith(token)
    if proc.returncode == 0 and finished:
        return SandboxResult(passed=True)
    if proc.returncode is not None and proc.returncode < 0:
        try:
            reason = f"killed by {signal.Signals(-proc.returncode).name}"
        except ValueError:
            reason = f"killed by signal {-proc.returncode}"
    elif proc.returncode == 0:
        reason = "exited before the end of the program"
    else:
        reason = f"exit code {proc.returncode}"
    last = stderr_tail.splitlines()[-1] if stderr_tail else ""
    return SandboxResult(passed=False, error=f"{reason}: {last}" if last else reason)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - unkillable child
        pass
