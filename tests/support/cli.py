"""Running the real ``countersign`` command line in subprocesses, the way an operator does."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CLI_TIMEOUT = 60
"""Seconds any one CLI subprocess may take before the test fails."""


def cli_env(url: str | None = None, **extra: str) -> dict[str, str]:
    """This process's environment without COUNTERSIGN_* variables, plus the database URL."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("COUNTERSIGN_")}
    if url is not None:
        env["COUNTERSIGN_DATABASE_URL"] = url
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str], cwd: Path, stdin: str = "", timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, bounded by ``timeout``; no checks."""
    return subprocess.run(
        [sys.executable, "-m", "countersign", *args],
        env=env,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def countersign(
    *args: str, env: dict[str, str], cwd: Path, stdin: str = "", timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess; it never prints a traceback, whatever happens."""
    finished = run_cli(*args, env=env, cwd=cwd, stdin=stdin, timeout=timeout)
    assert "Traceback" not in finished.stdout + finished.stderr, finished.stderr
    return finished


@dataclass(frozen=True)
class Call:
    """One CLI invocation, for :func:`countersign_all`."""

    args: Sequence[str]
    env: dict[str, str]
    cwd: Path
    stdin: str = ""
    timeout: float = CLI_TIMEOUT


def countersign_all(
    calls: Sequence[Call], *, check: bool = True
) -> list[subprocess.CompletedProcess[str]]:
    """Run independent CLI invocations side by side; the results in the order of ``calls``.

    With ``check`` (the default) each is checked like :func:`countersign`; without, the
    caller checks each result itself (so that one bad result does not hide the others).
    """
    runner = countersign if check else run_cli
    with ThreadPoolExecutor(max_workers=max(1, min(len(calls), os.cpu_count() or 2))) as pool:
        futures = [
            pool.submit(
                runner,
                *call.args,
                env=call.env,
                cwd=call.cwd,
                stdin=call.stdin,
                timeout=call.timeout,
            )
            for call in calls
        ]
        return [future.result() for future in futures]
