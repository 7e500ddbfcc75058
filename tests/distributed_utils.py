"""Launch a test file as its own worker script under `accelerate launch` with N CPU processes (gloo).

`accelerate launch --cpu --num_processes 2` starts a single process unless an MPI host file is given; `--multi_gpu`
on a machine without GPUs starts torchrun workers that Accelerate runs as MULTI_CPU over gloo. One process uses
`--cpu`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional


REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """Returns a TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(
    script: Path,
    script_args: Sequence[str],
    num_processes: int,
    launch_args: Optional[Sequence[str]] = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """Runs `python -m accelerate.commands.launch ... script script_args` on CPU and asserts it exits with 0.

    Args:
        script (`Path`): The worker script (usually the calling test file).
        script_args (`Sequence[str]`): Its command-line arguments.
        num_processes (`int`): Number of worker processes (gloo when > 1).
        launch_args (`Sequence[str]`, *optional*): Extra `accelerate launch` flags (e.g. `--use_fsdp ...`).
        timeout (`int`, defaults to 300): Seconds before the run is killed.

    Returns:
        `subprocess.CompletedProcess`: The finished run (stdout and stderr captured as text).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO_ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    launch_args = list(launch_args or ())
    # Accelerate accepts one mode flag: `--use_fsdp` / `--use_deepspeed` replace `--multi_gpu`.
    plugin = any(a in ("--use_fsdp", "--use_deepspeed") for a in launch_args)
    mode = [] if plugin else (["--multi_gpu"] if num_processes > 1 else ["--cpu"])
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *mode,
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *launch_args,
        str(Path(script).resolve()),
        *script_args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def end_worker() -> None:
    """Ends a worker launched by [`accelerate_launch`]: waits for every rank, then destroys the process group.

    A worker that exits with the gloo process group alive can abort in its teardown ("terminate called without an
    active exception", SIGABRT) after its work is done, which fails the launch at random.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
