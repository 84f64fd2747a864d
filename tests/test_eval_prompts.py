"""Prompts files for `sur-cache evaluate`: SURD-style .jsonl and plain text read right, bad files refused by file and
line, and the bundled set: 60 original prompts, 20 in each of the paper's categories, each with a complex prompt."""

import json
import re

import pytest

from sur_cache.eval_prompts import EvalPrompt, bundled_prompts_path, read_eval_prompts


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_with_surd_columns_and_optional_ones(tmp_path):
    rows = [
        {"file_name": "0.png", "text": "two cats nap", "prompt": "two cats, sleeping, 8k", "category": "counting"},
        {"text": " a red kite "},
    ]
    path = _write(tmp_path / "metadata.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n\n")
    assert read_eval_prompts(path) == [
        EvalPrompt("two cats nap", "two cats, sleeping, 8k", "counting"),
        EvalPrompt("a red kite", None, None),
    ]


def test_plain_text_one_prompt_a_line_blank_lines_skipped(tmp_path):
    path = _write(tmp_path / "prompts.txt", "a dog runs\n\n  three birds sing  \n")
    assert read_eval_prompts(path) == [EvalPrompt("a dog runs"), EvalPrompt("three birds sing")]


@pytest.mark.parametrize("name, text", [("empty.txt", ""), ("blank.jsonl", "\n  \n")])
def test_an_empty_file_is_refused_naming_it(tmp_path, name, text):
    path = _write(tmp_path / name, text)
    with pytest.raises(ValueError, match=rf"--prompts {re.escape(str(path))}: the file holds no prompt"):
        read_eval_prompts(path)


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"text": "a cat"', r"line 2 is not valid JSON"),
        ('["a cat"]', r"line 2 is a JSON list, not an object"),
        ('{"text": "a cat", "catgory": "colour"}', r"line 2 has unknown column\(s\) catgory; the columns are text"),
        ('{"prompt": "a cat, 8k"}', r"line 2 has no 'text' column"),
        ('{"text": ""}', r"line 2: 'text' must be non-empty text"),
        ('{"text": "a cat", "category": 3}', r"line 2: 'category' must be non-empty text, found 3"),
    ],
)
def test_a_bad_jsonl_line_is_refused_naming_file_and_line(tmp_path, line, expected):
    path = _write(tmp_path / "prompts.jsonl", '{"text": "a dog"}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"--prompts {re.escape(str(path))}: {expected}"):
        read_eval_prompts(path)


def test_a_file_that_is_not_utf8_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a dog\ncaf\u00e9 at night\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"--prompts {re.escape(str(path))}: line 2 is not UTF-8"):
        read_eval_prompts(path)


def test_the_bundled_set_has_20_prompts_in_each_category_each_with_a_complex_prompt():
    prompts = read_eval_prompts(bundled_prompts_path())
    assert len(prompts) == 60
    counts = {category: sum(p.category == category for p in prompts) for category in ("counting", "colour", "action")}
    assert counts == {"counting": 20, "colour": 20, "action": 20}
    assert all(p.complex and "," in p.complex for p in prompts)  # keyword style: comma-separated tags
    assert len({p.text for p in prompts}) == 60
    assert all(len(p.text.split()) <= 12 for p in prompts)  # short narrative prompts
