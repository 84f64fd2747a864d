"""The CLI's messages stay true: every `sur-cache <command>` and `--option` named in a string of the package's source
exists in the real command line (an option inside a backticked `sur-cache <command> ...` on that command), and
every option explains itself in --help."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import NamedTuple

import click
import pytest

from sur_cache.cli import main

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("sur_cache", "stages", "kernels")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
# A command is named as a command line in backticks (`sur-cache extract ... --overwrite`); in prose ("a sur-cache
# adapter folder") the word after sur-cache is no command.
COMMAND_LINE = re.compile(r"`sur-cache ([a-z][a-z0-9-]*)([^`]*)")


class Text(NamedTuple):
    """One string literal of the source (an f-string with `{}` where its fields go) and where it is."""

    where: str
    text: str


def _strings(node: ast.AST, where: str):
    if isinstance(node, ast.JoinedStr):
        parts = (value.value if isinstance(value, ast.Constant) else "{}" for value in node.values)
        yield Text(f"{where}:{node.lineno}", "".join(parts))
        return
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield Text(f"{where}:{node.lineno}", node.value)
        return
    for child in ast.iter_child_nodes(node):
        yield from _strings(child, where)


def _source_strings() -> list[Text]:
    texts = []
    for folder in SOURCE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            texts += _strings(ast.parse(path.read_text(encoding="utf-8")), str(path.relative_to(ROOT)))
    return texts


def _options(command: click.Command) -> set[str]:
    names = {name for param in command.params for name in (*param.opts, *param.secondary_opts)}
    return names | {"--help"}


@pytest.fixture(scope="module")
def texts() -> list[Text]:
    return _source_strings()


def test_the_scan_sees_the_messages(texts):
    """Guards against a scan that silently finds nothing: known mentions are seen."""
    mentions = {(match, t.where.split(":")[0]) for t in texts for match in OPTION.findall(t.text)}
    assert ("--overwrite", "sur_cache/store.py") in mentions and ("--llm-features", "stages/extract.py") in mentions
    commands = {m.group(1) for t in texts for m in COMMAND_LINE.finditer(t.text)}
    assert {"extract", "train", "verify", "import-reference"} <= commands


def test_every_command_a_message_names_exists(texts):
    wrong = [
        f"{t.where}: `sur-cache {m.group(1)}` in {t.text!r}"
        for t in texts
        for m in COMMAND_LINE.finditer(t.text)
        if m.group(1) not in main.commands
    ]
    assert not wrong, "commands named in messages that `sur-cache` does not have:\n" + "\n".join(wrong)


def test_every_option_a_message_names_exists(texts):
    every_option = set().union(*(_options(command) for command in main.commands.values()), _options(main))
    wrong = []
    for t in texts:
        for line in COMMAND_LINE.finditer(t.text):
            command = main.commands.get(line.group(1))
            if command is None:
                continue  # reported by the test above
            wrong += [
                f"{t.where}: `sur-cache {line.group(1)}` has no {option}, in {t.text!r}"
                for option in OPTION.findall(line.group(2))
                if option not in _options(command)
            ]
        wrong += [
            f"{t.where}: no command has {option}, in {t.text!r}"
            for option in OPTION.findall(COMMAND_LINE.sub("", t.text))
            if option not in every_option
        ]
    assert not wrong, "options named in messages that the CLI does not have:\n" + "\n".join(wrong)


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_option_of_every_command_has_help(name):
    command = main.commands[name]
    assert command.help, f"`sur-cache {name}` has no docstring"
    missing = [param.opts[0] for param in command.params if isinstance(param, click.Option) and not param.help]
    assert not missing, f"`sur-cache {name}`: options without a --help text: {missing}"
