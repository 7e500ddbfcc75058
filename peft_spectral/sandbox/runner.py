"""Run untrusted Python in bubblewrap sandboxes, and judge model-written code without trusting it.

[`run_tests`] judges a HumanEval-style solution with two sandboxes that talk over pipes:

- the **candidate** sandbox runs the model-written code and answers calls of its entry point;
- the **checker** sandbox runs the problem's trusted stub and test code; `check(candidate)` gets a proxy that sends each
  call's arguments to the candidate and rebuilds the answer from JSON as plain built-in values.

The candidate never sees the tests, the expected values or the verdict, and no object it creates reaches the checker:
the verdict is the checker's exit status plus its final message on a pipe that only the checker holds, read here.
[`run_code`] runs one program and reports whether it exited normally; a program can fake that (`os._exit(0)`), so it
is not how code is judged. See `docs/security.md` for the threat model.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .bwrap import bwrap_argv, check_sandbox, interpreter


__all__ = ["SandboxResult", "run_code", "run_tests"]

#: Largest file (stdout/stderr included) a sandboxed process may write (bytes); beyond it it gets SIGXFSZ.
MAX_OUTPUT_BYTES = 8 * 1024 * 1024
#: Most processes (threads included) a sandboxed program may run.
MAX_PROCESSES = 32
#: Most open files of a sandboxed program.
MAX_OPEN_FILES = 256


@dataclass
class SandboxResult:
    """The outcome of [`run_code`] or [`run_tests`].

    Args:
        passed (`bool`): [`run_tests`]: the checker ran all tests to their end. [`run_code`]: the program exited
            normally within the limits.
        timed_out (`bool`): The wall-clock timeout killed it.
        error (`str`): Empty when passed; otherwise a short reason (the failing assert, the last line of stderr, ...).
    """

    passed: bool
    timed_out: bool = False
    error: str = ""


@lru_cache(maxsize=1)
def _child_source() -> str:
    return Path(__file__).with_name("in_sandbox.py").read_text(encoding="utf-8")


def _limits(timeout: float, memory_mb: int) -> dict:
    cpu = math.ceil(timeout) + 1
    limits = {
        "RLIMIT_CPU": [cpu, cpu + 1],
        "RLIMIT_NPROC": MAX_PROCESSES,
        "RLIMIT_FSIZE": MAX_OUTPUT_BYTES,
        "RLIMIT_CORE": 0,
        "RLIMIT_NOFILE": MAX_OPEN_FILES,
    }
    if memory_mb > 0:
        limits["RLIMIT_AS"] = memory_mb * 1024 * 1024
    return limits


def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _tail(fd: int, limit: int = 2000) -> str:
    size = os.fstat(fd).st_size
    return os.pread(fd, limit, max(0, size - limit)).decode("utf-8", errors="replace")


class _Sandbox:
    """One interpreter in its own bubblewrap sandbox, with stdout/stderr captured in memory files."""

    def __init__(self, role: str, job: dict, limits: dict, fds: tuple[int, ...] = ()):
        self.stdout, self.stderr = _memfd("sandbox-stdout"), _memfd("sandbox-stderr")
        stdin = _memfd("sandbox-job", json.dumps(job).encode("utf-8", errors="surrogatepass"))
        cmd = [*bwrap_argv(), interpreter(), "-I", "-S", "-B", "-c", _child_source(), role, json.dumps(limits)]
        try:
            self.proc = subprocess.Popen(
                [*cmd, *map(str, fds)],
                stdin=stdin,
                stdout=self.stdout,
                stderr=self.stderr,
                pass_fds=fds,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                start_new_session=True,
            )
        except BaseException:
            self.close()
            raise
        finally:
            os.close(stdin)

    def wait(self, deadline: float) -> bool:
        """Whether the sandbox ended before `deadline` (a `time.monotonic()` value)."""
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        """Kill bwrap; its PID-1 child dies with it (`--die-with-parent`), and with it every process it contains."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()

    def last_error_line(self) -> str:
        lines = _tail(self.stderr).strip().splitlines()
        return lines[-1] if lines else ""

    def close(self) -> None:
        for fd in (self.stdout, self.stderr):
            os.close(fd)


def _check_arguments(code: str, timeout: float, memory_mb: int) -> None:
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    if memory_mb < 0:
        raise ValueError(f"memory_mb must be >= 0, got {memory_mb}")


def _exit_reason(returncode: int | None, last_line: str) -> str:
    if returncode is not None and returncode < 0:
        try:
            reason = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            reason = f"killed by signal {-returncode}"
    elif returncode == 3:
        reason = "exited before the end of the program"
    else:
        reason = f"exit code {returncode}"
    return f"{reason}: {last_line}" if last_line else reason


def run_code(code: str, *, timeout: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Run `code` as a Python program in a fresh sandbox.

    `passed` means the program ran to its end within the limits (an uncaught exception or `SystemExit` is a
    failure). The program itself can fake that with `os._exit(0)`, so this does not
    judge code whose tests run in the same program: use [`run_tests`] for that.

    Args:
        code (`str`): The full program.
        timeout (`float`, defaults to 5.0): Wall-clock seconds before the sandbox and everything in it is killed.
        memory_mb (`int`, defaults to 512): Address-space limit in MiB (`0` disables it).

    Returns:
        [`SandboxResult`]: never raises for anything the code does.

    Raises:
        `SandboxUnavailableError`: bubblewrap is missing or cannot create namespaces here.
    """
    _check_arguments(code, timeout, memory_mb)
    check_sandbox()
    deadline = time.monotonic() + timeout
    box = _Sandbox("program", {"code": code}, _limits(timeout, memory_mb))
    try:
        finished = box.wait(deadline)
        box.kill()
        if not finished:
            return SandboxResult(passed=False, timed_out=True, error=f"timed out after {timeout:g} s")
        if box.proc.returncode == 0:
            return SandboxResult(passed=True)
        return SandboxResult(passed=False, error=_exit_reason(box.proc.returncode, box.last_error_line()))
    finally:
        box.close()


def _read_verdict(fd: int) -> dict:
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            if sum(map(len, chunks)) > 65536:
                break
    except BlockingIOError:
        pass
    try:
        verdict = json.loads(b"".join(chunks).split(b"\n", 1)[0])
    except ValueError:
        return {}
    return verdict if isinstance(verdict, dict) else {}


def run_tests(
    code: str,
    *,
    test: str,
    entry_point: str,
    prelude: str = "",
    timeout: float = 5.0,
    memory_mb: int = 512,
) -> SandboxResult:
    """Judge a HumanEval-style solution: `check(entry_point)` from `test` against `code`, in two sandboxes.

    `code` (the stub plus the model's completion) runs in the candidate sandbox and only answers calls of
    `entry_point`; `prelude` (the trusted stub, with its imports and helpers such as HumanEval's `poly`) and `test` run
    in the checker sandbox. Arguments and answers cross as JSON of built-in values (`None`, `bool`, `int`, `float`,
    `complex`, `str`, `bytes`, `list`, `tuple`, `dict`, `set`, `frozenset`). A call cannot mutate the checker's
    arguments. Whatever the candidate raises (any class, `StopIteration` and `SystemExit` included), or a crash or a
    garbled answer, reaches the test as one `CandidateError` (an `Exception`, defined in the test's namespace, with the
    raised class's name in `type_name`), so the candidate cannot steer the test's control flow (a `StopIteration` would
    end a `map()` early). A test that expects a raise writes
    `except CandidateError as err: assert err.type_name == "ValueError"`.

    Args:
        code (`str`): The candidate program (untrusted).
        test (`str`): Test code defining `check(candidate)` (trusted).
        entry_point (`str`): Name of the function under test.
        prelude (`str`, defaults to `""`): Trusted code run before `test` in the checker (the problem's stub). If it
            does not compile, the tests run without it.
        timeout (`float`, defaults to 5.0): Wall-clock seconds for the whole check, after which both sandboxes are killed.
        memory_mb (`int`, defaults to 512): Address-space limit of each sandboxed process in MiB (`0` disables it).

    Returns:
        [`SandboxResult`]: `passed` only when the checker ran `check` to its end; never raises for anything the code
        does.

    Raises:
        `SandboxUnavailableError`: bubblewrap is missing or cannot create namespaces here.
    """
    _check_arguments(code, timeout, memory_mb)
    for name, value in (("test", test), ("entry_point", entry_point), ("prelude", prelude)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not entry_point.isidentifier():
        raise ValueError(f"entry_point must be a Python identifier, got {entry_point!r}")
    check_sandbox()
    deadline = time.monotonic() + timeout
    limits = _limits(timeout, memory_mb)
    request_r, request_w = os.pipe()
    response_r, response_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    boxes: list[_Sandbox] = []
    try:
        boxes.append(
            _Sandbox("candidate", {"code": code, "entry_point": entry_point}, limits, (request_r, response_w))
        )
        job = {"prelude": prelude, "test": test, "entry_point": entry_point}
        boxes.append(_Sandbox("checker", job, limits, (request_w, response_r, verdict_w)))
        for fd in (request_r, request_w, response_r, response_w, verdict_w):
            os.close(fd)
        request_r = request_w = response_r = response_w = verdict_w = -1
        candidate, checker = boxes
        finished = checker.wait(deadline)
        for box in boxes:
            box.kill()
        if not finished:
            return SandboxResult(passed=False, timed_out=True, error=f"timed out after {timeout:g} s")
        verdict = _read_verdict(verdict_r)
        if checker.proc.returncode == 0 and verdict.get("passed") is True:
            return SandboxResult(passed=True)
        error = str(verdict.get("error") or _exit_reason(checker.proc.returncode, checker.last_error_line()))
        candidate_error = candidate.last_error_line()
        if candidate_error and "candidate" in error:
            error += f" (candidate stderr: {candidate_error})"
        return SandboxResult(passed=False, error=error)
    finally:
        for box in boxes:
            if box.proc.poll() is None:
                box.kill()
            box.close()
        for fd in (request_r, request_w, response_r, response_w, verdict_r, verdict_w):
            if fd >= 0:
                os.close(fd)
