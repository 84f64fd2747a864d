"""The CLI's messages stay true: every `sur-cache <command>` and `--option` named in a string of the package's source
exists in the real command line (an option inside a backticked `sur-cache <command> ...` on that command), and
every option explains itself in --help. Every default and choice list is its config's (or owner's), one --device
option serves every command, and only the command group turns errors into messages."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import NamedTuple

import click
import pytest
from click.testing import CliRunner

from sur_cache import demo
from sur_cache.cli import main
from sur_cache.config import ExtractConfig, GenerateConfig, ImportReferenceConfig, TrainConfig
from sur_cache.stages.evaluate import EvaluateConfig

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


# ------------------------------------------------------------------------------------ every option defined once

# The config dataclass each command turns its options into, and the options it turns into something else first.
CONFIGS = {
    "extract": (ExtractConfig, ("storage_option",)),
    "train": (TrainConfig, ("storage_option",)),
    "generate": (GenerateConfig, ("prompts", "prompts_file", "seed", "num_seeds")),
    "import-reference": (ImportReferenceConfig, ()),
    "evaluate": (EvaluateConfig, ()),
}


def _click_options(command: click.Command) -> list[click.Option]:
    return [param for param in command.params if isinstance(param, click.Option) and param.name != "help"]


def _default(command: click.Command, option: click.Option):
    """The value click passes when the option is not given (a flag's is False)."""
    return option.get_default(click.Context(command))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_option_default_is_its_config_default(name):
    config, converted = CONFIGS[name]
    fields = {field.name: field for field in dataclasses.fields(config)}
    unmapped = [o.name for o in _click_options(main.commands[name]) if o.name not in fields and o.name not in converted]
    assert not unmapped, f"`sur-cache {name}` options that feed no {config.__name__} field: {unmapped}"
    command = main.commands[name]
    drifted = [
        f"--{o.name.replace('_', '-')}: click {_default(command, o)!r}, {config.__name__} {fields[o.name].default!r}"
        for o in _click_options(command)
        if o.name in fields
        and fields[o.name].default is not dataclasses.MISSING
        and _default(command, o) != fields[o.name].default
    ]
    assert not drifted, f"`sur-cache {name}` defaults that differ from the dataclass: {drifted}"


def test_demo_assets_defaults_are_build_demo_assets_defaults():
    parameters = inspect.signature(demo.build_demo_assets).parameters
    command = main.commands["demo-assets"]
    for option in _click_options(command):
        if option.name != "out":
            assert _default(command, option) == parameters[option.name].default, option.name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_choice_is_its_config_choice(name):
    config, _ = CONFIGS[name]
    offered = {
        o.name: tuple(o.type.choices) for o in _click_options(main.commands[name]) if isinstance(o.type, click.Choice)
    }
    assert offered == getattr(config, "CHOICES", {})


def test_each_choice_list_is_its_owners():
    """The configs' choice tuples are the owning modules' own: the store's compressions, the LLM encoder's poolings,
    the preprocessing's crops, the model dtypes, the adapter's backends, the one `auto` dtype resolver's."""
    from sur_cache import adapter, dataset, models, store
    from sur_cache.devices import DTYPE_CHOICES

    extract = ExtractConfig.CHOICES
    assert extract["compression"] is store.COMPRESSIONS
    assert extract["llm_pooling"] == typing.get_args(models.Pooling) == ("mean", "last")
    assert extract["crop"] == typing.get_args(dataset.CropMode) == ("center", "random")
    assert extract["llm_dtype"] == tuple(models.DTYPES)
    assert extract["sd_dtype"] is GenerateConfig.CHOICES["dtype"] is DTYPE_CHOICES
    assert DTYPE_CHOICES == ("auto", *models.DTYPES)
    assert TrainConfig.CHOICES["attention"] is GenerateConfig.CHOICES["attention"] is adapter.ATTENTION_CHOICES
    assert adapter.ATTENTION_CHOICES == ("auto", *adapter.ATTENTION_BACKENDS)
    choices = next(o.type.choices for o in main.commands["demo-assets"].params if o.name == "llm")
    assert tuple(choices) == demo.LLM_CHOICES


def test_layout_and_adapter_defaults_are_their_owners():
    from sur_cache import store
    from sur_cache.adapter import AdapterConfig

    assert (ExtractConfig.shard_rows, ExtractConfig.chunk_rows, ExtractConfig.compression) == (
        store.DEFAULT_SHARD_ROWS,
        store.DEFAULT_CHUNK_ROWS,
        store.DEFAULT_COMPRESSION,
    )
    for name in ("adapter_weight", "num_layers", "num_heads", "feedforward", "dropout"):
        assert getattr(TrainConfig, name) == getattr(AdapterConfig, name), name
    assert ImportReferenceConfig.num_heads == AdapterConfig.num_heads


def test_importing_the_command_line_imports_neither_torch_nor_zarr():
    """`sur-cache --help` builds every option from these imports: without torch and zarr it takes a fraction of a
    second instead of seconds (the stages import them when a command runs)."""
    import subprocess
    import sys

    code = "import sys, sur_cache.cli; print(sorted({'torch', 'zarr', 'numpy'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------ one device option


def test_every_computing_command_takes_the_same_device_option():
    from sur_cache.devices import DEVICE_HELP

    with_device = {name for name, command in main.commands.items() if "device" in {p.name for p in command.params}}
    assert {"extract", "train", "generate", "evaluate"} <= with_device
    for name in with_device:
        (option,) = [o for o in _click_options(main.commands[name]) if o.name == "device"]
        assert option.opts == ["--device"] and option.help == DEVICE_HELP, name
        assert _default(main.commands[name], option) == "auto", name
    every = {opt for command in main.commands.values() for param in command.params for opt in param.opts}
    assert "--cpu" not in every


# ------------------------------------------------------------------------------------ one place for errors


def test_only_the_command_group_turns_errors_into_messages():
    """No command catches an error itself or raises a click error: ValueError / OSError become `Error: ...` in
    `_Commands.invoke` alone."""
    tree = ast.parse((ROOT / "sur_cache" / "cli.py").read_text(encoding="utf-8"))
    invoke = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "invoke")
    inside = {id(node) for node in ast.walk(invoke)}
    outside = [node for node in ast.walk(tree) if id(node) not in inside]
    catches = [node.lineno for node in outside if isinstance(node, ast.Try)]
    click_errors = [
        node.lineno
        for node in outside
        if isinstance(node, ast.Attribute) and node.attr in ("ClickException", "UsageError", "BadParameter")
    ]
    assert not catches and not click_errors, f"sur_cache/cli.py lines {catches + click_errors}"


def test_a_user_error_is_one_line_with_exit_code_1(tmp_path):
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "Traceback" not in result.output


def test_llm_batch_size_takes_auto_or_a_count(tmp_path):
    """`auto` is the config's None (picked by the stage); anything but a whole number is refused before any work."""
    option = next(o for o in main.commands["extract"].params if o.name == "llm_batch_size")
    assert option.type.convert("auto", option, None) is None and option.type.convert("32", option, None) == 32
    (tmp_path / "data").mkdir()
    args = ["extract", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "s.zarr"), "--sd", "x"]
    result = CliRunner().invoke(main, [*args, "--llm", "y", "--llm-batch-size", "many"])
    assert result.exit_code == 2 and "expected auto or a whole number, got 'many'" in result.output
    result = CliRunner().invoke(main, [*args, "--llm", "y", "--llm-batch-size", "0"])
    assert result.exit_code == 1 and "--llm-batch-size must be >= 1, got 0" in result.output
