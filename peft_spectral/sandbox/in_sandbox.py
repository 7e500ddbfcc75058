"""The program that the sandboxed interpreter runs (standard library only).

The runner reads this file as text and starts it with `python -I -S -B -c <this file> ROLE LIMITS FD...` inside the
bubblewrap sandbox; it is never imported by the package itself (tests import it for its value codec). The job comes
as JSON on stdin. First it applies the resource limits and, when started as root, drops to uid/gid 65534 (bubblewrap
kept only `CAP_SETUID`/`CAP_SETGID` for that step); only then does it run anything it was sent.

Roles:

- `program`: run `code` as `__main__`; exit status 0 when it ran to its end, 3 on `SystemExit`, 1 on an exception.
  Nothing here is a verdict a hostile program cannot fake (it can call `os._exit(0)`).
- `candidate`: run the model-written `code`, then answer calls of `entry_point` read from the request pipe, one JSON
  line per call, with the result (or the exception's type name and message) on the response pipe. This process never
  sees the tests.
- `checker`: run the trusted `prelude` (the problem's stub with its helpers) and `test` code, then `check(proxy)`,
  where `proxy(*args)` sends the call to the candidate and rebuilds the answer from JSON with [`decode`], which builds
  only `None`, `bool`, `int`, `float`, `complex`, `str`, `bytes`, `list`, `tuple`, `dict`, `set` and `frozenset`
  values; every failure of a call (whatever the candidate raised) is a [`CandidateError`]. The checker never runs
  candidate code. Its verdict goes to a pipe only it holds.
"""

import json
import os
import sys


NOBODY = 65534
#: Deepest nesting of a value on the wire.
MAX_DEPTH = 100
#: Longest message line on the wire (bytes).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class WireError(ValueError):
    """A value that cannot cross the wire (unsupported type, too deep, malformed)."""


class CandidateError(Exception):
    """Every failure of a call of the candidate, as seen by the checker: the candidate raised, crashed, or answered
    garbage.

    It is the only exception a call of the candidate raises in the checker, whatever the candidate raised
    (`StopIteration`, `GeneratorExit`, `SystemExit`, ... included), so nothing the candidate does can steer the test's
    control flow: a `StopIteration` re-raised as itself inside `map(lambda x: candidate(x) == y, xs)` would end the
    iteration early and let `all(...)` pass. A test that expects the candidate to raise checks
    `except CandidateError as err: assert err.type_name == "ValueError"` (the name is in the test's namespace).

    Args:
        message (`str`): What happened.
        type_name (`str`, defaults to `""`): The class name of the exception the candidate raised, if it raised one.
    """

    def __init__(self, message, type_name=""):
        super().__init__(message)
        self.type_name = type_name


def encode(value, depth=0):
    """A JSON-ready tagged tree of `value` (built-in scalars and containers only; subclasses count as their base)."""
    if depth > MAX_DEPTH:
        raise WireError(f"value nested deeper than {MAX_DEPTH}")
    if value is None:
        return ["N"]
    if isinstance(value, bool):
        return ["b", bool(value)]
    if isinstance(value, int):
        return ["i", hex(int(value))]
    if isinstance(value, float):
        return ["f", float.__repr__(float(value))]
    if isinstance(value, complex):
        value = complex(value)
        return ["c", float.__repr__(value.real), float.__repr__(value.imag)]
    if isinstance(value, str):
        return ["s", str.__str__(value)]
    if isinstance(value, (bytes, bytearray)):
        return ["y", bytes(value).hex()]
    for kind, tag in ((list, "l"), (tuple, "t"), (set, "S"), (frozenset, "F")):
        if isinstance(value, kind):
            return [tag, [encode(item, depth + 1) for item in kind.__iter__(value)]]
    if isinstance(value, dict):
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.items(value)]]
    raise WireError(f"cannot send a value of type {type(value).__name__}")


def decode(tree, depth=0):
    """Rebuild a value from [`encode`]'s tree, accepting only well-formed trees; the result holds built-in types only."""
    if depth > MAX_DEPTH:
        raise WireError(f"value nested deeper than {MAX_DEPTH}")
    if type(tree) is not list or not tree or type(tree[0]) is not str:
        raise WireError("malformed value")
    tag, rest = tree[0], tree[1:]
    if tag == "N" and not rest:
        return None
    if len(rest) == 1:
        (payload,) = rest
        if tag == "b" and type(payload) is bool:
            return payload
        if tag == "i" and type(payload) is str:
            return int(payload, 16)
        if tag == "f" and type(payload) is str:
            return float(payload)
        if tag == "s" and type(payload) is str:
            return payload
        if tag == "y" and type(payload) is str:
            return bytes.fromhex(payload)
        if tag in ("l", "t", "S", "F") and type(payload) is list:
            items = [decode(item, depth + 1) for item in payload]
            return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
        if tag == "d" and type(payload) is list:
            out = {}
            for pair in payload:
                if type(pair) is not list or len(pair) != 2:
                    raise WireError("malformed dict item")
                out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
            return out
    if tag == "c" and len(rest) == 2 and all(type(part) is str for part in rest):
        return complex(float(rest[0]), float(rest[1]))
    raise WireError(f"malformed value with tag {tag!r}")


def _dumps(message):
    return (json.dumps(message, separators=(",", ":")) + "\n").encode("utf-8", errors="surrogatepass")


def _read_line(stream):
    line = stream.readline(MAX_MESSAGE_BYTES + 1)
    if len(line) > MAX_MESSAGE_BYTES:
        raise WireError(f"message longer than {MAX_MESSAGE_BYTES} bytes")
    return line


def _apply_limits(limits):
    import resource

    for name, value in limits.items():
        soft, hard = value if isinstance(value, list) else (value, value)
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if os.getuid() == 0 or os.geteuid() == 0:
        # Root mode: without a user namespace, bubblewrap left CAP_SETUID/CAP_SETGID for exactly this step. The
        # process-count limit is per user, and root is exempt from it, hence an unprivileged uid.
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    with open("/proc/self/status") as handle:
        status = dict(line.split(":", 1) for line in handle if ":" in line)
    if 0 in os.getresuid() or int(status.get("CapEff", "0").strip(), 16) or int(status.get("CapPrm", "0").strip(), 16):
        sys.stderr.write("sandbox: could not drop privileges\n")
        os._exit(70)


def _run_program(job):
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(job["code"], "<sandbox>", "exec"), namespace)
    except SystemExit as err:
        sys.stderr.write(f"SystemExit({err.code!r}) before the end of the program\n")
        sys.stderr.flush()
        os._exit(3)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve_candidate(job, request_fd, response_fd):
    requests = os.fdopen(request_fd, "rb")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(job["code"], "<candidate>", "exec"), namespace)
    function = namespace.get(job["entry_point"])
    while True:
        line = _read_line(requests)
        if not line:
            break
        try:
            call = json.loads(line)
            args = decode(call["a"])
            kwargs = decode(call["k"])
            if function is None:
                raise NameError(f"name {job['entry_point']!r} is not defined")
            reply = {"ok": encode(function(*args, **kwargs))}
        except BaseException as err:  # every failure of a call is an answer, not a crash
            reply = {"err": [type(err).__name__, str(err)[:2000]]}
        sys.stdout.flush()
        os.write(response_fd, _dumps(reply))


def _candidate_answer(reply):
    """The value of the candidate's decoded JSON `reply`; every other outcome is a [`CandidateError`]."""
    if type(reply) is dict and set(reply) == {"ok"}:
        return decode(reply["ok"])
    if type(reply) is dict and set(reply) == {"err"} and type(reply["err"]) is list and len(reply["err"]) == 2:
        name, message = (str(part) for part in reply["err"])
        raise CandidateError(f"the candidate raised {name[:100]}: {message[:2000]}", type_name=name[:100])
    raise CandidateError("malformed answer from the candidate")


def _run_checker(job, request_fd, response_fd, verdict_fd):
    responses = os.fdopen(response_fd, "rb")
    calls = [0]

    def candidate(*args, **kwargs):
        calls[0] += 1
        request = _dumps({"a": encode(list(args)), "k": encode(dict(kwargs))})  # the test's values: its own errors
        try:
            os.write(request_fd, request)
            line = _read_line(responses)
            if not line:
                raise CandidateError("the candidate's process ended before answering (it crashed or exited)")
            return _candidate_answer(json.loads(line))
        except CandidateError:
            raise
        except Exception as err:  # a broken pipe, an unreadable or oversized answer: the candidate's doing
            raise CandidateError(f"unreadable answer from the candidate: {type(err).__name__}: {err}") from None

    entry_point = job["entry_point"]
    candidate.__name__ = candidate.__qualname__ = entry_point
    namespace = {"__name__": "__main__", "__builtins__": __builtins__, "CandidateError": CandidateError}
    try:
        exec(compile(job["prelude"], "<prompt>", "exec"), namespace)
    except Exception as err:  # a prompt that is not code alone: the tests run without its helpers
        sys.stderr.write(f"sandbox: the prompt did not run ({type(err).__name__}: {err}); testing without it\n")
    namespace[entry_point] = candidate
    import linecache

    linecache.cache["<test>"] = (len(job["test"]), None, job["test"].splitlines(True), "<test>")
    try:
        exec(compile(job["test"], "<test>", "exec"), namespace)
        namespace["check"](candidate)
    except BaseException as err:  # any failure is a failed check
        import traceback

        frames = traceback.extract_tb(err.__traceback__)
        where = next((f"test line {f.lineno}: {f.line}" for f in reversed(frames) if f.filename == "<test>"), "")
        reason = f"{type(err).__name__}: {err}"[:1000] + (f" at {where}" if where else "")
        os.write(verdict_fd, _dumps({"passed": False, "calls": calls[0], "error": reason}))
        os._exit(1)
    os.write(verdict_fd, _dumps({"passed": True, "calls": calls[0]}))
    os._exit(0)


def main(argv):
    """Entry point inside the sandbox: `argv` is `[role, limits_json, fd, ...]`."""
    role, limits, fds = argv[0], json.loads(argv[1]), [int(fd) for fd in argv[2:]]
    _apply_limits(limits)
    job = json.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    os.close(0)
    if role == "program":
        _run_program(job)
    elif role == "candidate":
        _serve_candidate(job, *fds)
    elif role == "checker":
        _run_checker(job, *fds)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
