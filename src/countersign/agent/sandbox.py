"""The ``shell`` tool's sandbox: each command under bubblewrap (``COUNTERSIGN_SANDBOX=bwrap``).

Inside, the command sees the system folders read-only, its session's workspace as
``/workspace`` (the only place it can write), a private ``/tmp``, its own ``/proc`` and a
minimal ``/dev``; it has no network (its own empty network namespace), no view of the
server's files, processes or environment, runs as an unprivileged user with no capabilities,
and is held to a CPU-time and an address-space limit. The server's own bounds (the timeout
that kills the process group, the capped output) apply as without a sandbox.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

WORKSPACE = "/workspace"
"""Where the session's workspace is inside the sandbox (its working directory and HOME)."""

_SYSTEM_FOLDERS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
"""Read-only inside; on a merged-/usr system most are symlinks into /usr, kept as such."""
_SYSTEM_FILES = (
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
)
"""The parts of /etc that programs need to start (the dynamic linker's cache, the
alternatives' symlinks, time zone, certificates); none holds a secret."""
_NOBODY = "65534"
_PROBE_TIMEOUT_SECONDS = 10.0


class SandboxUnavailable(Exception):
    """bubblewrap is missing or cannot make a sandbox on this machine; the message says why."""


@dataclass(frozen=True, slots=True)
class Sandbox:
    """How to run one command under bubblewrap."""

    bwrap: str
    """The ``bwrap`` executable."""
    memory_bytes: int
    """The address-space limit of each process of the command (RLIMIT_AS)."""
    cpu_seconds: int
    """The CPU time each process of the command may use (RLIMIT_CPU)."""

    def wrap(self, argv: Sequence[str], workspace: Path, path: str) -> list[str]:
        """The argv that runs ``argv`` in the sandbox, with ``workspace`` as /workspace."""
        return [
            self.bwrap,
            *_layout(),
            "--bind",
            str(workspace),
            WORKSPACE,
            # Last, once every mount point exists: nothing but /workspace and /tmp is writable.
            "--remount-ro",
            "/",
            "--chdir",
            WORKSPACE,
            "--clearenv",
            "--setenv",
            "PATH",
            path,
            "--setenv",
            "HOME",
            WORKSPACE,
            "--setenv",
            "LANG",
            "C.UTF-8",
            "--",
            *argv,
        ]

    def limit(self) -> None:
        """Set the command's resource limits (run in the child, before bwrap starts)."""
        resource.setrlimit(resource.RLIMIT_AS, (self.memory_bytes, self.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (self.cpu_seconds, self.cpu_seconds))


def _layout() -> list[str]:
    """Namespaces, user and the file system every sandboxed command gets."""
    args = [
        "--unshare-all",  # network, processes, IPC, host name, cgroups
        "--unshare-user",
        "--uid",
        _NOBODY,
        "--gid",
        _NOBODY,
        "--cap-drop",
        "ALL",
        "--die-with-parent",
        "--new-session",  # no access to a controlling terminal
        "--hostname",
        "sandbox",
    ]
    for folder in _SYSTEM_FOLDERS:
        if os.path.islink(folder):
            args += ["--symlink", os.readlink(folder), folder]
        elif os.path.isdir(folder):
            args += ["--ro-bind", folder, folder]
    for entry in _SYSTEM_FILES:
        args += ["--ro-bind-try", entry, entry]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]  # noqa: S108 - private
    return args


def find_sandbox(*, required: bool, memory_mb: int, cpu_seconds: int) -> Sandbox | None:
    """The sandbox of this machine, checked by starting one; None when not ``required`` and
    there is none. Raises SandboxUnavailable when it is required and cannot be had."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        if required:
            raise SandboxUnavailable(
                "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
            )
        return None
    sandbox = Sandbox(bwrap=bwrap, memory_bytes=memory_mb * 1024 * 1024, cpu_seconds=cpu_seconds)
    problem = _probe(sandbox)
    if problem is not None:
        if required:
            raise SandboxUnavailable(f"bwrap cannot make a sandbox here ({problem})")
        return None
    return sandbox


def _probe(sandbox: Sandbox) -> str | None:
    """Start ``true`` in a sandbox once; the first line of what went wrong, or None."""
    try:
        with tempfile.TemporaryDirectory(prefix="countersign-sandbox-") as workspace:
            done = subprocess.run(
                sandbox.wrap(["true"], Path(workspace), "/usr/bin:/bin"),
                env={},
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=_PROBE_TIMEOUT_SECONDS,
                check=False,
                preexec_fn=sandbox.limit,
            )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", errors="replace").strip().splitlines()
        return lines[0] if lines else f"exit code {done.returncode}"
    return None


def startup_failure(output: str) -> str | None:
    """When bwrap itself could not start the command (not found, not executable), the reason
    as the tool says it without a sandbox; None when the command ran."""
    prefix = "bwrap: execvp "
    if not output.startswith(prefix):
        return None
    line = output.splitlines()[0][len(prefix) :]
    command, _, reason = line.rpartition(": ")
    if reason == "No such file or directory":
        return f"command not found: {command}"
    if reason == "Permission denied":
        return f"permission denied: {command}"
    return f"cannot run {command}: {reason}"
