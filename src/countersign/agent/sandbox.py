"""The ``shell`` tool's sandbox: each command under bubblewrap (``COUNTERSIGN_SANDBOX=bwrap``).

Inside, the command sees the system folders read-only, its session's workspace as
``/workspace`` (the only place it can write), a private ``/tmp``, its own ``/proc`` and a
minimal ``/dev``; it has no network (its own empty network namespace), no view of the
server's files, processes or environment, runs as an unprivileged user with no capabilities,
and is held to a CPU-time and an address-space limit (its /tmp and /dev/shm to the same
size). Server folders that lie inside a system folder (the working directory with its ``.env``, the
workspaces, a SQLite database's folder, e.g. under ``/usr/src/app``) are covered by an empty
folder. The server's own bounds (the timeout
that kills the process group, the capped output) apply as without a sandbox.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
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
    "/etc/ssl/certs",  # not the whole of /etc/ssl: /etc/ssl/private holds keys
    "/etc/ssl/openssl.cnf",
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
    hidden: tuple[str, ...] = ()
    """The server's own folders, covered by an empty one where a system folder shows them."""
    no_nested_userns: bool = True
    """``--disable-userns`` (bubblewrap 0.8 and later; older ones go without it)."""

    def wrap(self, argv: Sequence[str], workspace: Path, path: str) -> list[str]:
        """The argv that runs ``argv`` in the sandbox, with ``workspace`` as /workspace."""
        return [
            self.bwrap,
            *_layout(self.memory_bytes, self.hidden, no_nested_userns=self.no_nested_userns),
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


def _layout(size: int, hidden: Sequence[str], *, no_nested_userns: bool) -> list[str]:
    """Namespaces, user and the file system every sandboxed command gets."""
    args = [
        "--unshare-all",  # network, processes, IPC, host name, cgroups
        "--unshare-user",
        *(["--disable-userns"] if no_nested_userns else []),  # none of its own inside
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
    shown: list[str] = []
    for folder in _SYSTEM_FOLDERS:
        if os.path.islink(folder):
            args += ["--symlink", os.readlink(folder), folder]
        elif os.path.isdir(folder):
            args += ["--ro-bind", folder, folder]
            shown.append(folder)
    for entry in _SYSTEM_FILES:
        args += ["--ro-bind-try", entry, entry]
    for folder in covered(hidden, shown):
        args += ["--tmpfs", folder, "--remount-ro", folder]
    # /dev read-only (its devices still work), /dev/shm and /tmp private and bounded.
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(size), "--tmpfs", "/dev/shm"]  # noqa: S108
    args += ["--remount-ro", "/dev", "--size", str(size), "--tmpfs", "/tmp"]  # noqa: S108
    return args


def covered(hidden: Sequence[str], shown: Sequence[str]) -> list[str]:
    """The hidden folders (resolved) that lie strictly inside a shown system folder."""
    found: set[Path] = set()
    for real in (Path(os.path.realpath(folder)) for folder in hidden):
        if any(real == Path(top) for top in shown):
            raise SandboxUnavailable(
                f"the server's folder {real} is a system folder every command sees; "
                "start the server from, and keep its files in, another folder"
            )
        if any(real.is_relative_to(top) for top in shown):
            found.add(real)
    # One inside another is covered with it.
    outer = [real for real in found if not any(real != o and real.is_relative_to(o) for o in found)]
    return sorted(str(real) for real in outer)


def find_sandbox(
    *, required: bool, memory_mb: int, cpu_seconds: int, hidden: Sequence[str] = ()
) -> Sandbox | None:
    """The sandbox of this machine, checked by starting one; None when not ``required`` and
    there is none. Raises SandboxUnavailable when it is required and cannot be had.
    ``hidden``: the server's folders a command must not see."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        if required:
            raise SandboxUnavailable(
                "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
            )
        return None
    sandbox = Sandbox(
        bwrap=bwrap,
        memory_bytes=memory_mb * 1024 * 1024,
        cpu_seconds=cpu_seconds,
        hidden=tuple(hidden),
    )
    problem = _probe(sandbox)
    if problem is not None and "disable-userns" in problem:
        # bubblewrap before 0.8: the same sandbox, minus that one guard.
        sandbox = replace(sandbox, no_nested_userns=False)
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
