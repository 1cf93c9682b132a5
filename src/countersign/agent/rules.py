"""Argument rules: the policy a tool call gets from its arguments.

An agent's tool entry may carry rules before its policy; the first rule whose conditions all
hold for a call decides (``auto``, ``ask`` or ``deny``), else the tool's policy. A condition
compares one text argument with a value:

- ``equals``: the whole value; ``prefix``: it starts with the value;
- ``glob``: ``*`` is any run of characters but ``/``, ``**`` any run at all, ``?`` one character
  but ``/``; the whole value must match;
- ``regex``: an RE2 expression (linear time: a rule cannot stall the server) that must match
  the whole value.

Arguments are compared as they will be used, not as they read:

- a command (``shell``'s ``command``) as its argument list, split as the tool splits it, so
  ``prefix: "git status"`` matches ``git status -s`` and never ``git status; rm -rf /`` (whose
  second argument is ``status;``); ``glob`` and ``regex`` see the list joined back with
  shell quoting. When commands run through ``/bin/sh`` (``COUNTERSIGN_SHELL_INTERPRETER``),
  a command with any shell metacharacter never matches an ``auto`` rule: the shell would not
  run the list that was matched;
- a path as the path inside the workspace it leads to (``..`` and symlinks resolved).

A condition that cannot be evaluated (the argument is missing or not text, a command that does
not split, a path outside the workspace) does not skip its rule: the call asks a person (or is
refused, when the tool's own policy is ``deny``).
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

import re2

from countersign.domain.errors import InvalidInput
from countersign.domain.models import RuleCondition, RuleMatcher, ToolPolicy, ToolRule, ToolSetting

MAX_RULES = 50
"""Rules per tool entry."""
MAX_CONDITIONS = 10
"""Conditions per rule."""
MAX_VALUE_LENGTH = 1_000
"""Characters of a condition's value."""
MAX_ARGUMENT_LENGTH = 10_000
"""Characters of an argument rules read; a longer one cannot be evaluated (the call asks)."""
REASON_MAX_LENGTH = 200
"""What an approval stores as the reason it asks (``asked_because``)."""

SHELL_METACHARACTERS = frozenset(";&|<>()$`\\\"'*?[]{}~!#^\n\r")
"""Characters ``/bin/sh`` gives a meaning: a command with one of them never matches ``auto``."""


class ArgumentKind(StrEnum):
    """How an argument is read before it is compared."""

    TEXT = "text"
    COMMAND = "command"
    PATH = "path"


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """The policy for one call, and why (what an approval says it asks because of)."""

    policy: ToolPolicy
    because: str


class _Unknowable(Exception):
    """A condition that cannot be evaluated for this call."""


# --- checking rules when an agent is saved ---------------------------------------------------


def check_rules(
    setting: ToolSetting,
    parameters: Mapping[str, Any],
    kinds: Mapping[str, ArgumentKind],
) -> None:
    """Refuse rules that could never work for this tool (InvalidInput naming the rule).

    ``parameters``: the tool's JSON-schema properties; ``kinds``: how its arguments are read.
    """
    if len(setting.rules) > MAX_RULES:
        raise InvalidInput(f"tool {setting.name}: at most {MAX_RULES} rules")
    for number, rule in enumerate(setting.rules, 1):
        where = f"tool {setting.name}, rule {number}"
        detail = {"tool": setting.name, "rule": number}
        if not rule.when:
            raise InvalidInput(f"{where}: `when` needs at least one condition", detail=detail)
        if len(rule.when) > MAX_CONDITIONS:
            raise InvalidInput(f"{where}: at most {MAX_CONDITIONS} conditions", detail=detail)
        for condition in rule.when:
            problem = _condition_problem(condition, parameters, kinds)
            if problem is not None:
                raise InvalidInput(
                    f"{where}: {problem}", detail={**detail, "argument": condition.argument}
                )


def _condition_problem(
    condition: RuleCondition, parameters: Mapping[str, Any], kinds: Mapping[str, ArgumentKind]
) -> str | None:
    argument, value = condition.argument, condition.value
    if argument not in parameters:
        known = ", ".join(sorted(parameters)) or "none"
        return f"the tool has no argument {argument!r} (its arguments: {known})"
    if parameters[argument].get("type") != "string":
        return f"the argument {argument!r} is not text; rules compare text arguments only"
    if not value:
        return f"the value for {argument!r} is empty"
    if len(value) > MAX_VALUE_LENGTH:
        return f"the value for {argument!r} is longer than {MAX_VALUE_LENGTH} characters"
    kind = kinds.get(argument)
    if kind is ArgumentKind.PATH and (value.startswith("/") or _escapes(value)):
        return f"the path for {argument!r} must be inside the workspace (relative, no '..' out)"
    if kind is ArgumentKind.COMMAND and condition.matcher in (
        RuleMatcher.EQUALS,
        RuleMatcher.PREFIX,
        RuleMatcher.GLOB,
    ):
        try:
            if not shlex.split(value):
                return f"the command for {argument!r} has no arguments"
        except ValueError as exc:
            return f"the command for {argument!r} cannot be split into arguments: {exc}"
    if condition.matcher is RuleMatcher.REGEX:
        try:
            _regex(value)
        except re2.error as exc:
            return f"the regex for {argument!r} is not valid RE2: {_text(exc)}"
    return None


# --- deciding a call ---------------------------------------------------------------------------


def decide(
    setting: ToolSetting,
    arguments: Mapping[str, Any],
    *,
    kinds: Mapping[str, ArgumentKind],
    workspace: Path,
    interpreter: bool = False,
) -> PolicyDecision:
    """The policy of one call with these (validated) arguments: the first matching rule's,
    else the tool's."""
    seen = _Arguments(arguments, kinds, workspace)
    for number, rule in enumerate(setting.rules, 1):
        try:
            matched = all(_holds(condition, seen) for condition in rule.when)
        except _Unknowable as unknown:
            policy = ToolPolicy.DENY if setting.policy is ToolPolicy.DENY else ToolPolicy.ASK
            return PolicyDecision(policy, _cut(f"rule {number} cannot be evaluated: {unknown}"))
        if not matched:
            continue
        if rule.policy is ToolPolicy.AUTO and interpreter and seen.has_metacharacters():
            continue  # /bin/sh would not run the argument list that matched
        return PolicyDecision(rule.policy, _cut(f"rule {number}: {describe(rule)}"))
    if setting.policy is ToolPolicy.AUTO and interpreter and seen.has_metacharacters():
        # No rule can see through what /bin/sh makes of it (a `deny` rule on `rm` would not
        # see `true; rm x`): the tool's `auto` does not hold for it.
        return PolicyDecision(ToolPolicy.ASK, "the command holds shell metacharacters")
    return PolicyDecision(setting.policy, f"policy {setting.policy.value}")


def describe(rule: ToolRule) -> str:
    """A rule in words, e.g. ``command prefix 'git status' → auto``."""
    conditions = " and ".join(f"{c.argument} {c.matcher.value} {c.value!r}" for c in rule.when)
    return f"{conditions} → {rule.policy.value}"


class _Arguments:
    """A call's arguments as rules read them, each worked out once per call."""

    def __init__(
        self, arguments: Mapping[str, Any], kinds: Mapping[str, ArgumentKind], workspace: Path
    ) -> None:
        self._arguments = arguments
        self._kinds = kinds
        self._workspace = workspace
        self._read: dict[str, tuple[ArgumentKind, str, list[str] | None]] = {}

    def read(self, name: str) -> tuple[ArgumentKind, str, list[str] | None]:
        """The argument's kind, its text as compared, and (a command) its argument list."""
        found = self._read.get(name)
        if found is None:
            found = self._work_out(name)
            self._read[name] = found
        return found

    def _work_out(self, name: str) -> tuple[ArgumentKind, str, list[str] | None]:
        raw = self._arguments.get(name)
        if not isinstance(raw, str):
            state = "missing" if raw is None else "not text"
            raise _Unknowable(f"the argument {name!r} is {state}")
        if len(raw) > MAX_ARGUMENT_LENGTH:
            raise _Unknowable(f"the argument {name!r} is longer than rules read")
        if not raw.isascii():
            try:
                raw.encode()
            except UnicodeEncodeError:
                raise _Unknowable(f"the argument {name!r} is not valid text") from None
        kind = self._kinds.get(name, ArgumentKind.TEXT)
        if kind is ArgumentKind.COMMAND:
            words = _words(raw)
            return kind, shlex.join(words), words
        if kind is ArgumentKind.PATH:
            return kind, _workspace_path(raw, self._workspace), None
        return kind, raw, None

    def has_metacharacters(self) -> bool:
        """Whether a command argument holds a character /bin/sh gives a meaning."""
        return any(
            kind is ArgumentKind.COMMAND
            and not SHELL_METACHARACTERS.isdisjoint(str(self._arguments.get(name, "")))
            for name, kind in self._kinds.items()
        )


def _holds(condition: RuleCondition, seen: _Arguments) -> bool:
    kind, text, words = seen.read(condition.argument)
    matcher, value = condition.matcher, condition.value
    if words is not None:
        if matcher is RuleMatcher.EQUALS:
            return words == shlex.split(value)
        if matcher is RuleMatcher.PREFIX:
            expected = shlex.split(value)
            return words[: len(expected)] == expected
        if matcher is RuleMatcher.GLOB:
            return _words_match(shlex.split(value), words)
    elif kind is ArgumentKind.PATH and matcher in (RuleMatcher.EQUALS, RuleMatcher.PREFIX):
        wanted = canonical_path(value)
        if matcher is RuleMatcher.EQUALS:
            return text == wanted
        # Whole components: `notes` covers `notes/a.md`, not `notes.sh`.
        return wanted == "." or text == wanted or text.startswith(wanted + "/")
    if matcher is RuleMatcher.EQUALS:
        return text == value
    if matcher is RuleMatcher.PREFIX:
        return text.startswith(value)
    if matcher is RuleMatcher.GLOB:
        return _glob(value).fullmatch(text) is not None
    return _regex(value).fullmatch(text) is not None


def _words_match(patterns: list[str], words: list[str]) -> bool:
    """A command glob, word by word: each pattern word matches one argument (``*`` stays
    inside it), and a pattern word ``**`` alone matches any number of arguments."""
    # reachable[j]: the pattern words so far can match the first j arguments.
    reachable = [True] + [False] * len(words)
    for pattern in patterns:
        following = [False] * (len(words) + 1)
        if pattern == "**":
            for position in range(len(words) + 1):
                following[position] = reachable[position] or (
                    position > 0 and following[position - 1]
                )
        else:
            compiled = _glob(pattern)
            for position in range(1, len(words) + 1):
                following[position] = (
                    reachable[position - 1] and compiled.fullmatch(words[position - 1]) is not None
                )
        reachable = following
    return reachable[len(words)]


def _escapes(value: str) -> bool:
    return canonical_path(value).split("/", 1)[0] == ".."


def canonical_path(value: str) -> str:
    """A path value of a rule as a workspace path reads: no ``./``, no trailing ``/``; the
    workspace itself is ``.``."""
    return posixpath.normpath(value.strip() or ".")


def _words(command: str) -> list[str]:
    """A command's argument list, split exactly as the ``shell`` tool splits it to run it."""
    try:
        return shlex.split(command)
    except ValueError as exc:
        raise _Unknowable(f"the command cannot be split into arguments ({exc})") from None


def _workspace_path(path: str, workspace: Path) -> str:
    """The path inside the workspace that ``path`` leads to (``..`` and symlinks resolved)."""
    if "\x00" in path:
        raise _Unknowable("the path contains a NUL byte")
    root = workspace.resolve()
    candidate = Path(path)
    try:
        resolved = (root / candidate).resolve(strict=False)
    except (RuntimeError, OSError) as exc:
        raise _Unknowable(f"the path cannot be resolved ({type(exc).__name__})") from None
    if candidate.is_absolute() or not resolved.is_relative_to(root):
        raise _Unknowable("the path is outside the workspace")
    return resolved.relative_to(root).as_posix()  # the workspace itself is "."


@lru_cache(maxsize=256)
def _glob(pattern: str) -> Any:
    """A glob as a regex: ``**`` any run, ``*`` any run without ``/``, ``?`` one non-``/``."""
    parts: list[str] = []
    position = 0
    while position < len(pattern):
        if pattern.startswith("**/", position):
            parts.append("(?:.*/)?")  # `**/x` is x at any depth, the top included
            position += 3
        elif pattern.startswith("**", position):
            parts.append(".*")
            position += 2
        elif pattern[position] == "*":
            parts.append("[^/]*")
            position += 1
        elif pattern[position] == "?":
            parts.append("[^/]")
            position += 1
        else:
            parts.append(re2.escape(pattern[position]))
            position += 1
    # RE2 too: a glob of many stars backtracks for ever under Python's re, never under RE2.
    return _regex("(?s)" + "".join(parts))


@lru_cache(maxsize=256)
def _regex(pattern: str) -> Any:
    options = re2.Options()
    options.log_errors = False
    options.never_capture = True
    options.dot_nl = True  # `.` matches a newline too: `rm .*` covers an argument holding one
    options.max_mem = 1 << 20
    return re2.compile(pattern, options)


def _text(error: BaseException) -> str:
    message = error.args[0] if error.args else error
    return message.decode(errors="replace") if isinstance(message, bytes) else str(message)


def _cut(reason: str) -> str:
    return reason if len(reason) <= REASON_MAX_LENGTH else reason[: REASON_MAX_LENGTH - 1] + "…"
