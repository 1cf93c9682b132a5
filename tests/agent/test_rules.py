"""Argument rules: each matcher, first match wins, the checks made when an agent is saved, and
properties that no command crafted around a prefix matches it unless what runs really starts
with it (checked against the real ``/bin/sh`` when commands run through it)."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from countersign.agent.rules import ArgumentKind, PolicyDecision, check_rules, decide
from countersign.agent.tools import ARGUMENT_KINDS, tool_parameters
from countersign.domain.errors import InvalidInput
from countersign.domain.models import ToolPolicy, ToolSetting

AUTO, ASK, DENY = ToolPolicy.AUTO, ToolPolicy.ASK, ToolPolicy.DENY
SHELL_KINDS = ARGUMENT_KINDS["shell"]
PATH_KINDS = ARGUMENT_KINDS["write_file"]


def setting(
    name: str, policy: ToolPolicy, *rules: tuple[dict[str, dict[str, str]], str]
) -> ToolSetting:
    return ToolSetting.from_json(
        {"name": name, "policy": policy, "rules": [{"when": w, "policy": p} for w, p in rules]}
    )


def shell_rule(matcher: str, value: str, policy: str = "auto") -> ToolSetting:
    return setting("shell", ASK, ({"command": {matcher: value}}, policy))


def on_command(
    tool: ToolSetting, command: str, *, tmp: Path, interpreter: bool = False
) -> PolicyDecision:
    return decide(
        tool, {"command": command}, kinds=SHELL_KINDS, workspace=tmp, interpreter=interpreter
    )


# --- matchers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "policy"),
    [
        ("git status", AUTO),
        ("git status -s", AUTO),
        ("  git\tstatus  ", AUTO),
        ("'git' \"status\"", AUTO),
        ("git status; rm -rf /", ASK),
        ("git statusx", ASK),
        ("git", ASK),
        ("FOO=1 git status", ASK),
        ("git 'status; rm -rf /'", ASK),
    ],
)
def test_a_command_prefix_matches_the_argument_list(
    command: str, policy: ToolPolicy, tmp_path: Path
) -> None:
    assert on_command(shell_rule("prefix", "git status"), command, tmp=tmp_path).policy is policy


def test_equals_glob_and_regex_on_a_command(tmp_path: Path) -> None:
    equals = shell_rule("equals", "ls -la")
    assert on_command(equals, "ls   -la", tmp=tmp_path).policy is AUTO
    assert on_command(equals, "ls -la x", tmp=tmp_path).policy is ASK
    glob = shell_rule("glob", "pytest *")
    assert on_command(glob, "pytest tests", tmp=tmp_path).policy is AUTO
    assert on_command(glob, "pytest tests/x", tmp=tmp_path).policy is ASK  # * stops at /
    regex = shell_rule("regex", r"git (status|log)( -\w+)*")
    assert on_command(regex, "git log -p", tmp=tmp_path).policy is AUTO
    assert on_command(regex, "git log -p; rm x", tmp=tmp_path).policy is ASK  # whole value
    # glob and regex see the list joined back with quoting: a quoted ";" stays quoted.
    assert on_command(shell_rule("glob", "echo **"), "echo 'a; b'", tmp=tmp_path).policy is AUTO
    assert on_command(shell_rule("regex", "echo a; b"), "echo 'a; b'", tmp=tmp_path).policy is ASK


def test_paths_are_compared_as_the_workspace_path_they_lead_to(tmp_path: Path) -> None:
    rule = setting("write_file", ASK, ({"path": {"glob": "notes/*.md"}}, "auto"))

    def policy(path: str) -> ToolPolicy:
        return decide(
            rule, {"path": path, "content": "x"}, kinds=PATH_KINDS, workspace=tmp_path
        ).policy

    assert policy("notes/a.md") is AUTO
    assert policy("./notes/../notes/a.md") is AUTO
    assert policy("notes/deep/a.md") is ASK  # * does not cross /
    assert policy("src/../notes/a.md") is AUTO
    # A symlink inside the workspace is followed: the path it leads to is what is matched.
    (tmp_path / "secret").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "link.md").symlink_to(tmp_path / "secret" / "keys.md")
    assert policy("notes/link.md") is ASK
    # Outside the workspace: the rule cannot be evaluated, so the call asks.
    outside = decide(
        rule, {"path": "../x.md", "content": "x"}, kinds=PATH_KINDS, workspace=tmp_path
    )
    assert outside.policy is ASK
    assert "outside the workspace" in outside.because


def test_the_first_matching_rule_wins_and_the_policy_is_the_fallback(tmp_path: Path) -> None:
    tool = setting(
        "shell",
        AUTO,
        ({"command": {"prefix": "rm"}}, "deny"),
        ({"command": {"prefix": "git push"}}, "ask"),
        ({"command": {"prefix": "git"}}, "auto"),
    )
    assert on_command(tool, "rm -rf x", tmp=tmp_path) == PolicyDecision(
        DENY, "rule 1: command prefix 'rm' → deny"
    )
    assert on_command(tool, "git push origin", tmp=tmp_path).policy is ASK
    assert on_command(tool, "git push origin", tmp=tmp_path).because.startswith("rule 2")
    assert on_command(tool, "git log", tmp=tmp_path).because.startswith("rule 3")
    assert on_command(tool, "ls", tmp=tmp_path) == PolicyDecision(AUTO, "policy auto")


def test_every_condition_of_a_rule_must_hold(tmp_path: Path) -> None:
    tool = setting(
        "write_file",
        ASK,
        ({"path": {"prefix": "out/"}, "content": {"regex": "[a-z ]*"}}, "auto"),
    )

    def policy(path: str, content: str) -> ToolPolicy:
        arguments = {"path": path, "content": content}
        return decide(tool, arguments, kinds=PATH_KINDS, workspace=tmp_path).policy

    assert policy("out/a.txt", "plain words") is AUTO
    assert policy("out/a.txt", "Not plain!") is ASK
    assert policy("in/a.txt", "plain words") is ASK


def test_a_condition_that_cannot_be_evaluated_asks_or_keeps_a_deny(tmp_path: Path) -> None:
    unsplittable = on_command(shell_rule("prefix", "git"), "git 'unclosed", tmp=tmp_path)
    assert unsplittable.policy is ASK
    assert "cannot be split" in unsplittable.because
    denied = setting("shell", DENY, ({"command": {"prefix": "git"}}, "auto"))
    assert on_command(denied, "git 'unclosed", tmp=tmp_path).policy is DENY


def test_under_the_interpreter_a_metacharacter_never_matches_an_auto_rule(tmp_path: Path) -> None:
    tool = setting(
        "shell",
        ASK,
        ({"command": {"prefix": "echo"}}, "auto"),
        ({"command": {"prefix": "echo"}}, "deny"),
    )
    assert on_command(tool, "echo hi", tmp=tmp_path, interpreter=True).policy is AUTO
    # The auto rule is passed over; the next rule (a deny) still applies.
    assert on_command(tool, "echo $HOME", tmp=tmp_path, interpreter=True).policy is DENY
    assert on_command(tool, "echo $HOME", tmp=tmp_path, interpreter=False).policy is AUTO


def test_under_the_interpreter_no_rule_sees_through_metacharacters_so_auto_asks(
    tmp_path: Path,
) -> None:
    """A tool whose own policy is auto, with deny and ask rules: `true; rm -rf x` would slip
    past the `rm` rule under /bin/sh, so it asks instead."""
    tool = setting(
        "shell",
        AUTO,
        ({"command": {"prefix": "rm"}}, "deny"),
        ({"command": {"prefix": "git push"}}, "ask"),
    )
    for command in ("true; rm -rf x", "git status && git push", "echo $(rm x)"):
        decision = on_command(tool, command, tmp=tmp_path, interpreter=True)
        assert decision == PolicyDecision(ASK, "the command holds shell metacharacters")
    assert on_command(tool, "ls -la", tmp=tmp_path, interpreter=True).policy is AUTO
    assert on_command(tool, "rm x", tmp=tmp_path, interpreter=True).policy is DENY


def test_a_command_glob_matches_word_by_word(tmp_path: Path) -> None:
    tmp_files = shell_rule("glob", "rm *.tmp")
    assert on_command(tmp_files, "rm a.tmp", tmp=tmp_path).policy is AUTO
    assert on_command(tmp_files, "rm -rf .git src a.tmp", tmp=tmp_path).policy is ASK
    assert on_command(tmp_files, "rm 'a b.tmp'", tmp=tmp_path).policy is AUTO  # one argument
    any_arguments = shell_rule("glob", "pytest **")
    assert on_command(any_arguments, "pytest", tmp=tmp_path).policy is AUTO
    assert on_command(any_arguments, "pytest -x tests/a.py", tmp=tmp_path).policy is AUTO
    assert (
        on_command(
            shell_rule("glob", "** --version"), "python3 evil.py --version", tmp=tmp_path
        ).policy
        is AUTO
    )
    assert (
        on_command(
            shell_rule("glob", "* --version"), "python3 evil.py --version", tmp=tmp_path
        ).policy
        is ASK
    )


def test_a_regex_dot_also_matches_a_newline(tmp_path: Path) -> None:
    tool = setting("shell", AUTO, ({"command": {"regex": "rm .*"}}, "deny"))
    assert on_command(tool, "rm -rf x 'a\nb'", tmp=tmp_path).policy is DENY


def test_path_values_read_as_workspace_paths(tmp_path: Path) -> None:
    def policy(rule: dict[str, str], path: str) -> ToolPolicy:
        tool = setting("read_file", AUTO, ({"path": rule}, "deny"))
        return decide(tool, {"path": path}, kinds=PATH_KINDS, workspace=tmp_path).policy

    assert policy({"glob": "**/.env"}, ".env") is DENY  # **/ includes the top
    assert policy({"glob": "**/.env"}, "a/b/.env") is DENY
    assert policy({"glob": "**/.git/**"}, ".git/config") is DENY
    assert policy({"prefix": "notes"}, "notes/a.md") is DENY
    assert policy({"prefix": "notes"}, "notes.sh") is AUTO  # whole components
    assert policy({"prefix": "./secret/"}, "secret/keys") is DENY
    assert policy({"equals": "secret/"}, "secret") is DENY
    assert policy({"equals": "."}, ".") is DENY  # the workspace itself


def test_an_argument_rules_cannot_read_asks(tmp_path: Path) -> None:
    tool = setting("shell", AUTO, ({"command": {"prefix": "rm"}}, "deny"))
    long = on_command(tool, "echo " + "x" * 20_000, tmp=tmp_path)
    assert long.policy is ASK
    assert "longer than rules read" in long.because
    surrogate = on_command(tool, "echo " + chr(0xD800), tmp=tmp_path)  # a lone surrogate
    assert surrogate.policy is ASK


# --- checks when an agent is saved ----------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "when", "problem"),
    [
        ("shell", {"cmd": {"prefix": "git"}}, "has no argument 'cmd'"),
        ("shell", {"command": {"regex": "(a)\\1"}}, "not valid RE2"),
        ("shell", {"command": {"prefix": "git 'x"}}, "cannot be split"),
        ("shell", {"command": {"equals": ""}}, "is empty"),
        ("write_file", {"path": {"glob": "x" * 1001}}, "longer than"),
        ("shell", {}, "at least one condition"),
        ("write_file", {"path": {"prefix": "/etc"}}, "inside the workspace"),
        ("write_file", {"path": {"glob": "../*"}}, "inside the workspace"),
    ],
)
def test_rules_that_could_never_work_are_refused_naming_the_rule(
    tool: str, when: dict[str, dict[str, str]], problem: str
) -> None:
    bad = setting(tool, ASK, ({"command": {"prefix": "ok"}}, "auto"), (when, "auto"))
    if tool == "write_file":
        bad = setting(tool, ASK, (when, "auto"))
    with pytest.raises(InvalidInput) as raised:
        check_rules(bad, tool_parameters(tool), ARGUMENT_KINDS[tool])
    assert problem in raised.value.message
    assert f"tool {tool}, rule" in raised.value.message


# --- properties ----------------------------------------------------------------------------

PREFIX = ["git", "status"]
SEPARATORS = [";", "&&", "||", "|", "&", "\n", "\r\n", "$(", "`", ">", "<", "(", ")", "{", "}"]
NOISE = st.sampled_from(
    [*SEPARATORS, " ", "\t", "'", '"', "\\", "$", "=", "FOO=1 ", "pwn", "-s", "x", "#", "*", "~"]
)
crafted = st.builds(
    lambda lead, middle, tail: lead + middle + "".join(tail),
    st.sampled_from(["", " ", "\t", "  \t", "FOO=1 ", "'", '"', "\\"]),
    st.sampled_from(
        [
            "git status",
            "git  status",
            "git'' status",
            'git "status"',
            "gi't' status",
            "git\\ status",
            "git status;",
            "git status&&",
            "git statu",
            "git",
        ]
    ),
    st.lists(NOISE, max_size=8),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=crafted)
@example(command="git status; pwn")
@example(command="git status && pwn")
@example(command="git status\npwn")
@example(command="git status $(pwn)")
@example(command="git status `pwn`")
@example(command="FOO=1 git status")
@example(command="\tgit status | pwn")
def test_no_crafted_command_matches_a_prefix_unless_its_arguments_start_with_it(
    command: str, tmp_path: Path
) -> None:
    """Without an interpreter the tool runs the argument list shlex makes of the command: a
    match means that list really starts with the prefix's words."""
    decision = on_command(shell_rule("prefix", "git status"), command, tmp=tmp_path)
    if decision.policy is AUTO:
        assert shlex.split(command)[:2] == PREFIX


@pytest.fixture(scope="module")
def recorders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of stand-ins for `git` and `pwn` that log each run's arguments, one line each
    (arguments joined by NUL)."""
    folder = tmp_path_factory.mktemp("bin")
    for name in ("git", "pwn"):
        script = folder / name
        script.write_text(
            "#!/bin/sh\n"
            f'printf "%s" "{name}" >> "$RECORD"\n'
            'for a in "$@"; do printf "\\0%s" "$a" >> "$RECORD"; done\n'
            'printf "\\n" >> "$RECORD"\n'
        )
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(command=crafted)
@example(command="git status; pwn")
@example(command="git status $(pwn)")
@example(command="git status `pwn`")
@example(command="git status\npwn")
def test_under_the_interpreter_a_matched_command_runs_nothing_but_the_prefix(
    command: str, recorders: Path, tmp_path: Path
) -> None:
    """With commands run through /bin/sh, what matters is what the shell runs: run it for real
    (only the stand-ins are on PATH) and check that a command matching the auto rule ran
    `git status ...` and nothing else."""
    decision = on_command(
        shell_rule("prefix", "git status"), command, tmp=tmp_path, interpreter=True
    )
    if decision.policy is not AUTO:
        return
    record = tmp_path / "record"
    record.unlink(missing_ok=True)
    subprocess.run(
        ["/bin/sh", "-c", command],
        cwd=tmp_path,
        env={"PATH": str(recorders), "RECORD": str(record)},
        capture_output=True,
        timeout=10,
        check=False,
    )
    runs = record.read_text().splitlines() if record.exists() else []
    assert runs, f"{command!r} matched but git did not run"
    for run in runs:
        assert run.split("\0")[:2] == PREFIX, (command, runs)


def test_the_recorders_do_see_a_command_that_slips_past_a_prefix(
    recorders: Path, tmp_path: Path
) -> None:
    """The oracle above can fail: a command that would slip a program past the prefix is
    seen running it (and is not matched by the rule)."""
    command = "git status; pwn"
    record = tmp_path / "record"
    subprocess.run(
        ["/bin/sh", "-c", command],
        cwd=tmp_path,
        env={"PATH": str(recorders), "RECORD": str(record), **_no_env()},
        timeout=10,
        check=False,
    )
    assert [run.split("\0")[0] for run in record.read_text().splitlines()] == ["git", "pwn"]
    decision = on_command(
        shell_rule("prefix", "git status"), command, tmp=tmp_path, interpreter=True
    )
    assert decision.policy is ASK


def _no_env() -> dict[str, str]:
    return {key: "" for key in ("ENV", "BASH_ENV") if key in os.environ}


def test_argument_kinds_cover_every_built_in() -> None:
    assert set(ARGUMENT_KINDS) == {"list_files", "read_file", "write_file", "shell"}
    assert all(set(kinds) <= set(tool_parameters(tool)) for tool, kinds in ARGUMENT_KINDS.items())
    assert ArgumentKind.COMMAND in SHELL_KINDS.values()
