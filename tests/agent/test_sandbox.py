"""The shell tool under bubblewrap (``COUNTERSIGN_SANDBOX=bwrap``): real bwrap, real commands.

Without ``bwrap`` these tests skip with a sentence saying how to get it, except under CI (the
``CI`` variable set), where they fail: ``.ci/run`` installs bubblewrap first.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from countersign.agent.sandbox import Sandbox, find_sandbox
from countersign.agent.tools import ToolLimits
from countersign.app import shell_sandbox
from countersign.config import Settings
from countersign.domain.errors import ConfigError
from tests.agent.test_tools import Turn, alive, populate
from tests.api.test_errors import MakeAccount
from tests.api.test_runs import events, new_session, send
from tests.conftest import make_settings


def _bwrap() -> Sandbox:
    if shutil.which("bwrap") is None:
        message = "no bubblewrap for the sandbox tests: `apt-get install -y bubblewrap`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    sandbox = find_sandbox(required=True, memory_mb=512, cpu_seconds=5)
    assert sandbox is not None
    return sandbox


@pytest.fixture
def sandboxed(workspace: Path) -> Turn:
    return Turn(workspace, limits=ToolLimits(sandbox=_bwrap(), shell_interpreter=True))


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return tmp_path / "workspace"


async def test_a_command_can_write_in_the_workspace_and_only_there(
    sandboxed: Turn, workspace: Path
) -> None:
    populate(workspace, {"in.txt": "from outside"})

    output = await sandboxed.call(
        "shell", command="cat in.txt; echo made > out.txt; pwd; echo $HOME; touch /tmp/t; ls /tmp"
    )

    assert output == "from outside/workspace\n/workspace\nt\n"
    assert (workspace / "out.txt").read_text() == "made\n"
    # System folders are read-only; the private /tmp is gone with the command.
    for target in ("/usr/made", "/etc/made", "/made"):
        refused = await sandboxed.call("shell", command=f"touch {target}")
        assert refused.startswith("exit code 1\n"), refused
    assert not await asyncio.to_thread(Path("/usr/made").exists)


@pytest.fixture
def app_under_usr(tmp_path: Path) -> Iterator[Path]:
    """A server folder inside /usr, as a container's ``WORKDIR /usr/src/app`` makes it."""
    if os.geteuid() != 0 and not os.access("/usr/local", os.W_OK):
        message = "this user cannot make a folder under /usr/local"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    folder = Path(tempfile.mkdtemp(prefix="countersign-app-", dir="/usr/local"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


async def test_server_folders_inside_a_system_folder_are_covered(
    app_under_usr: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server started in /usr/local/…/ with its .env, database and workspaces there: the
    sandbox binds /usr, yet a command sees none of them (an empty, read-only folder)."""
    _bwrap()
    (app_under_usr / ".env").write_text("COUNTERSIGN_SECRET_KEY=the-server-secret\n")
    (app_under_usr / "data").mkdir()
    (app_under_usr / "data" / "countersign.db").write_text("the server's database")
    workspaces = app_under_usr / "workspaces"
    workspace = workspaces / "one-session"
    monkeypatch.chdir(app_under_usr)
    url = f"sqlite+aiosqlite:///{app_under_usr / 'data' / 'countersign.db'}"
    settings = make_settings(url, sandbox="bwrap", workspace_root=workspaces)
    sandbox = shell_sandbox(settings)
    assert sandbox is not None
    turn = Turn(workspace, limits=ToolLimits(sandbox=sandbox, shell_interpreter=True))
    populate(workspace, {"mine.txt": "the session's own"})

    for path in (".env", "data/countersign.db", "workspaces/one-session/mine.txt"):
        output = await turn.call("shell", command=f"cat {app_under_usr / path}")
        assert output.startswith("exit code 1\n"), output
        assert "No such file or directory" in output
    assert await turn.call("shell", command=f"ls -A {app_under_usr}; echo end") == "end\n"
    refused = await turn.call("shell", command=f"touch {app_under_usr}/x")
    assert refused.startswith("exit code 1\n"), refused
    # Its own workspace is still there, as /workspace; the rest of /usr/local still shows.
    assert await turn.call("shell", command="cat mine.txt") == "the session's own"
    assert app_under_usr.parent.name in await turn.call("shell", command="ls /usr")


async def test_tmp_and_dev_are_bounded_and_no_namespace_inside(sandboxed: Turn) -> None:
    """/tmp and /dev/shm hold no more than the memory limit (512 MiB here), /dev is read-only
    (its devices still work) and a command cannot make a user namespace of its own."""
    populate(sandboxed.workspace)

    filled = await sandboxed.call(
        "shell", command="head -c 600M /dev/zero > /tmp/big; echo $?; du -m /tmp/big | cut -f1"
    )
    assert filled.splitlines()[-2:] == ["1", "512"], filled
    shm = await sandboxed.call("shell", command="head -c 600M /dev/zero > /dev/shm/big; echo $?")
    assert shm.splitlines()[-1] == "1", shm
    assert (await sandboxed.call("shell", command="touch /dev/x")).startswith("exit code 1\n")
    assert await sandboxed.call("shell", command="echo x > /dev/null && echo ok") == "ok\n"
    nested = await sandboxed.call("shell", command="unshare -U true")
    assert nested.startswith("exit code 1\n"), nested


async def test_a_command_cannot_read_the_servers_files(
    sandboxed: Turn, workspace: Path, tmp_path: Path
) -> None:
    populate(workspace)
    database = tmp_path / "countersign.db"
    database.write_text("the server's database")
    workspace_parent = workspace.parent

    for path in (database, Path(__file__), Path("/etc/shadow"), Path("/root")):
        output = await sandboxed.call("shell", command=f"cat {path}")
        assert output.startswith("exit code 1\n"), output
        assert "No such file or directory" in output
    assert "countersign.db" not in await sandboxed.call("shell", command=f"ls {workspace_parent}")


_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
_HAS_BUNDLE = Path(_BUNDLE).is_file()


@pytest.mark.skipif(
    not Path("/etc/ssl/private").is_dir(), reason="this machine has no /etc/ssl/private"
)
async def test_private_keys_stay_outside_and_certificates_inside(sandboxed: Turn) -> None:
    """/etc/ssl/private (keys; readable from inside when the server runs as root, since the
    sandbox's user maps to the server's) is not there; the CA certificates are."""
    seen = "if test -e {0}; then echo there; else echo absent; fi"
    assert await sandboxed.call("shell", command=seen.format("/etc/ssl/private")) == "absent\n"
    assert await sandboxed.call("shell", command=seen.format(_BUNDLE)) == (
        "there\n" if _HAS_BUNDLE else "absent\n"
    )


async def test_escapes_by_symlink_dotdot_and_proc_fail(
    sandboxed: Turn, workspace: Path, tmp_path: Path
) -> None:
    populate(workspace)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    (workspace / "link").symlink_to(secret)
    (workspace / "dir-link").symlink_to(tmp_path)

    attempts = [
        "cat link",
        "cat dir-link/secret.txt",
        "cat ../../secret.txt",
        f"cat /workspace/../{secret}",
        f"cat /proc/{os.getpid()}/root{secret}",
        f"cat /proc/1/root{secret}",
        f"cat /proc/{os.getpid()}/environ",
        "ln -s /proc/1/root/.. up; cat up" + str(secret),
    ]
    for command in attempts:
        output = await sandboxed.call("shell", command=command)
        assert "do not read" not in output, command
        assert output.startswith("exit code 1\n"), (command, output)
    # Its own processes only: the server's are not there.
    processes = await sandboxed.call("shell", command="ls /proc | grep -c '^[0-9]'")
    assert int(processes) <= 5


async def test_a_command_cannot_see_the_servers_environment(
    sandboxed: Turn, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    populate(workspace)
    monkeypatch.setenv("COUNTERSIGN_SECRET_KEY", "s" * 40)

    environment = await sandboxed.call("shell", command="env")
    every_process = await sandboxed.call("shell", command="cat /proc/*/environ | tr '\\0' '\\n'")

    assert sorted(environment.splitlines()) == [
        "HOME=/workspace",
        "LANG=C.UTF-8",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PWD=/workspace",
    ]
    assert "COUNTERSIGN" not in every_process
    assert "s" * 40 not in every_process


async def test_a_command_cannot_open_a_connection(sandboxed: Turn, workspace: Path) -> None:
    populate(workspace)
    accepted: list[str] = []
    connected = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append("connection")
        connected.set()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        script = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        output = await sandboxed.call("shell", command=f'python3 -c "{script}"')
        # Outside the sandbox the same script connects, so the refusal is the sandbox's.
        unsandboxed = await asyncio.create_subprocess_exec(sys.executable, "-c", script)
        async with asyncio.timeout(10):
            await unsandboxed.wait()
            await connected.wait()
    finally:
        server.close()
        await server.wait_closed()
    assert output.startswith("exit code 1\n"), output
    assert "ConnectionRefusedError" in output
    assert unsandboxed.returncode == 0
    assert accepted == ["connection"]


async def test_memory_and_cpu_are_limited(workspace: Path) -> None:
    sandbox = _bwrap()
    turn = Turn(workspace, limits=ToolLimits(sandbox=sandbox, shell_interpreter=True))
    populate(workspace)

    too_big = sandbox.memory_bytes * 2
    memory = await turn.call("shell", command=f"python3 -c 'bytearray({too_big})'")
    assert "MemoryError" in memory

    tight = Sandbox(bwrap=sandbox.bwrap, memory_bytes=sandbox.memory_bytes, cpu_seconds=1)
    spinning = Turn(workspace, limits=ToolLimits(sandbox=tight, shell_timeout=20))
    output = await spinning.call("shell", command="python3 -c 'while True: pass'")
    assert output.startswith("exit code "), output
    assert not output.startswith("timed out"), output


async def test_the_timeout_stops_every_process_of_a_sandboxed_command(workspace: Path) -> None:
    turn = Turn(
        workspace,
        limits=ToolLimits(sandbox=_bwrap(), shell_interpreter=True, shell_timeout=0.5),
    )
    populate(workspace)

    output = await turn.call("shell", command="sleep 60 & echo $! > /workspace/pid; sleep 60")

    assert output.startswith("timed out after 0.5 s")
    # The sandbox's processes are gone: no sleep of this command is left on the machine.
    pgrep = await asyncio.create_subprocess_exec(
        "pgrep", "-f", "^sleep 60$", stdout=asyncio.subprocess.PIPE
    )
    found, _ = await pgrep.communicate()
    assert not [pid for pid in found.split() if alive(int(pid))]


async def test_what_cannot_start_reads_as_without_a_sandbox(workspace: Path) -> None:
    turn = Turn(workspace, limits=ToolLimits(sandbox=_bwrap()))
    populate(workspace, {"script.sh": "echo hi"})

    assert await turn.call("shell", command="no-such-command") == (
        "command not found: no-such-command"
    )
    assert await turn.call("shell", command="./script.sh") == "permission denied: ./script.sh"


def test_bwrap_asked_for_and_missing_is_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"

    with pytest.raises(ConfigError) as refused:
        shell_sandbox(make_settings(url, sandbox="bwrap"))

    assert refused.value.message == (
        "COUNTERSIGN_SANDBOX=bwrap cannot be used: bwrap is not installed "
        "(Debian/Ubuntu: apt-get install bubblewrap)"
    )
    # auto in prod insists on it too (none is the way to go without one); elsewhere auto
    # and none never look.
    prod = {"profile": "prod", "secret_key": "k" * 40}
    with pytest.raises(ConfigError) as refused_in_prod:
        shell_sandbox(make_settings(url, sandbox="auto", **prod))
    assert refused_in_prod.value.message == (
        "the prod profile runs shell commands in a sandbox and there is none here: bwrap is "
        "not installed (Debian/Ubuntu: apt-get install bubblewrap); make bwrap work, or set "
        "COUNTERSIGN_SANDBOX=none to run them without one"
    )
    assert shell_sandbox(make_settings(url, sandbox="none", **prod)) is None
    assert shell_sandbox(make_settings(url, sandbox="auto")) is None
    assert shell_sandbox(make_settings(url, sandbox="none")) is None


def test_auto_is_the_sandbox_in_prod_only(tmp_path: Path) -> None:
    _bwrap()
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    prod = {"profile": "prod", "secret_key": "k" * 40}

    assert shell_sandbox(make_settings(url, sandbox="auto", **prod)) is not None
    assert shell_sandbox(make_settings(url, sandbox="auto")) is None
    assert shell_sandbox(make_settings(url, sandbox="none", **prod)) is None
    assert shell_sandbox(make_settings(url, sandbox="bwrap")) is not None


@pytest.fixture
def settings(settings: Settings) -> Settings:
    _bwrap()
    return settings.model_copy(update={"sandbox": "bwrap"})


async def test_the_server_runs_approved_commands_in_the_sandbox(
    client: httpx.AsyncClient, make_account: MakeAccount, settings: Settings
) -> None:
    account = await make_account()
    session_id = await new_session(client, account)
    run_id = (await send(client, account, session_id, '/tool shell {"command": "ls -a /"}'))["run"][
        "id"
    ]
    approval_id = (await events(client, account, session_id, run_id))[-1].data["approval_id"]
    decided = await client.post(
        f"/api/v1/sessions/{session_id}/approvals/{approval_id}",
        json={"decision": "approve"},
        headers=account.headers,
    )
    assert decided.status_code == 200

    async with asyncio.timeout(30):
        while True:
            log = await events(client, account, session_id, run_id)
            if log[-1].event == "run.finished":
                break
            await asyncio.sleep(0.05)
    result = next(e for e in log if e.event == "tool.result").data
    listed = set(str(result["output"]).split())
    assert "workspace" in listed
    assert "root" not in listed
    assert "home" not in listed


async def test_a_workspace_root_under_usr_made_at_start_is_covered(
    app_under_usr: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workspaces live under /usr and do not exist yet when the server starts (from
    elsewhere): the start makes them, so that the sandbox can cover them."""
    _bwrap()
    monkeypatch.chdir(tmp_path)
    workspaces = app_under_usr / "not-yet" / "workspaces"
    url = f"sqlite+aiosqlite:///{tmp_path / 'countersign.db'}"
    sandbox = shell_sandbox(make_settings(url, sandbox="bwrap", workspace_root=workspaces))
    assert sandbox is not None
    assert workspaces.is_dir()
    populate(workspaces / "other-session", {"theirs.txt": "another session's"})
    turn = Turn(workspaces / "mine", limits=ToolLimits(sandbox=sandbox, shell_interpreter=True))
    populate(turn.workspace)
    output = await turn.call("shell", command=f"cat {workspaces}/other-session/theirs.txt")
    assert output.startswith("exit code 1\n"), output


def test_a_server_folder_that_is_a_system_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started from /usr itself, the server's files cannot be covered without covering every
    program: the sandbox is refused in one sentence."""
    _bwrap()
    monkeypatch.chdir("/usr")
    url = f"sqlite+aiosqlite:///{tmp_path / 'countersign.db'}"
    with pytest.raises(ConfigError) as refused:
        shell_sandbox(make_settings(url, sandbox="bwrap", workspace_root=tmp_path / "ws"))
    assert refused.value.message == (
        "COUNTERSIGN_SANDBOX=bwrap cannot be used: the server's folder /usr is a system folder "
        "every command sees; start the server from, and keep its files in, another folder"
    )
