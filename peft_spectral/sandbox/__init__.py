"""Run untrusted Python (model-written code and its tests) in bubblewrap sandboxes.

- [`run_tests`]: judge a HumanEval-style solution; the verdict comes from a checker sandbox the tested code cannot
  reach (see `docs/security.md`).
- [`run_code`]: run one program in a sandbox and report whether it exited normally.
- [`check_sandbox`]: raise [`SandboxUnavailableError`] early when bubblewrap cannot run here.
"""

from .bwrap import SandboxUnavailableError, check_sandbox
from .runner import SandboxResult, run_code, run_tests


__all__ = ["SandboxResult", "SandboxUnavailableError", "check_sandbox", "run_code", "run_tests"]
