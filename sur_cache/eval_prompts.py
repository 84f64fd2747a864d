"""The prompts `sur-cache evaluate` draws: a SURD-style `.jsonl` file or a plain text file, or the bundled set.

A `.jsonl` file holds one JSON object a line with SURD's `metadata.jsonl` columns: `text` (the simple prompt,
required), `prompt` (its complex keyword prompt, optional) and `category` (optional); `file_name` is allowed and
ignored, so a SURD `metadata.jsonl` is a prompts file as it is. Any other file is plain text, one simple prompt a
line. Blank lines are skipped. Every problem is a ValueError naming the file, the line and the fix: an unknown
column is refused rather than ignored, since it is most likely a misspelt one whose data would silently go unused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

JSONL_SUFFIX = ".jsonl"
REQUIRED_COLUMN = "text"
OPTIONAL_COLUMNS = ("prompt", "category")
IGNORED_COLUMNS = ("file_name",)  # SURD's image column: a metadata.jsonl is a valid prompts file


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt to evaluate: the simple prompt, its complex prompt (None if the file has none), its category."""

    text: str
    complex: str | None = None
    category: str | None = None


def bundled_prompts_path() -> Path:
    """`sur_cache/data/eval_prompts.jsonl`: 60 short narrative prompts in the paper's three categories."""
    return Path(str(resources.files("sur_cache") / "data" / "eval_prompts.jsonl"))


def read_eval_prompts(path: Path) -> list[EvalPrompt]:
    """The prompts of `path` (see the module docstring); raises ValueError naming the file and line of a problem."""
    path = Path(path)
    lines = _decode(path).splitlines()
    parse = _parse_json_line if path.suffix.lower() == JSONL_SUFFIX else _parse_text_line
    prompts = [parse(path, number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not prompts:
        raise ValueError(
            f"--prompts {path}: the file holds no prompt (it is empty or blank); write one prompt a line, or one "
            f'JSON object a line such as {{"text": "two cats on a sofa", "category": "counting"}} in a .jsonl file'
        )
    return prompts


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"--prompts {path}: line {line} is not UTF-8 ({error.reason} at byte {error.start}); save the file as "
            "UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from error


def _parse_text_line(path: Path, number: int, line: str) -> EvalPrompt:
    return EvalPrompt(text=line.strip())


def _parse_json_line(path: Path, number: int, line: str) -> EvalPrompt:
    where = f"--prompts {path}: line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{where} is not valid JSON ({error.msg} at column {error.colno}); a .jsonl prompts file holds one JSON "
            "object a line (rename the file to .txt if it is plain text, one prompt a line)"
        ) from error
    if not isinstance(record, dict):
        raise ValueError(f'{where} is a JSON {type(record).__name__}, not an object like {{"text": "..."}}')
    known = (REQUIRED_COLUMN, *OPTIONAL_COLUMNS, *IGNORED_COLUMNS)
    unknown = sorted(set(record) - set(known))
    if unknown:
        raise ValueError(
            f"{where} has unknown column(s) {', '.join(unknown)}; the columns are {', '.join(known)} "
            f"({IGNORED_COLUMNS[0]} is ignored): rename or remove the others"
        )
    if REQUIRED_COLUMN not in record:
        raise ValueError(f"{where} has no {REQUIRED_COLUMN!r} column (the simple prompt); add it to every line")
    text = _text(record, REQUIRED_COLUMN, where)
    complex_prompt = _text(record, "prompt", where) if "prompt" in record else None
    category = _text(record, "category", where) if "category" in record else None
    return EvalPrompt(text=text, complex=complex_prompt, category=category)


def _text(record: dict, column: str, where: str) -> str:
    value = record[column]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {column!r} must be non-empty text, found {value!r}; fix or remove that line")
    return value.strip()
