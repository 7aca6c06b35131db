"""Reading users' files: a UTF-8 byte order mark is no part of the text, and CSV/TSV cells are the text as written
(no type or missing-value inference), with errors naming the line of the row at fault."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.commands.generate import read_prompts
from finetune.data import RowRef, parse_row, read_batches
from finetune.evaluation import file_tokens
from finetune.prepare import prepare
from finetune.prepared import load_records
from finetune.recipe import DataConfig, load_recipe
from finetune.tokenizer import load_tokenizer

from helpers import write_recipe_file

BOM = "\ufeff".encode()


@pytest.mark.parametrize("name, content, sample_by", [
    ("data.txt", b"hello\nworld\n", "line"),
    ("data.txt", b"hello\n\nworld\n", "paragraph"),
    ("data.txt", b"hello", "document"),
    ("data.jsonl", b'{"text": "hello"}\n{"text": "world"}\n', "line"),
    ("data.json", b'[{"text": "hello"},\n {"text": "world"}]\n', "line"),
    ("data.csv", b"text,label\nhello,1\n", "line"),
    ("data.tsv", b"text\tlabel\nhello\t1\n", "line"),
])
def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path: Path, name: str, content: bytes,
                                                           sample_by: str) -> None:
    path = tmp_path / name
    path.write_bytes(BOM + content)
    batch = next(read_batches(str(path), DataConfig(sample_by=sample_by)))
    assert parse_row(batch.rows[0], RowRef(str(path), 0))["text"] == "hello"


def test_a_byte_order_mark_is_not_part_of_a_prompt_file_or_an_eval_file(tmp_path: Path, tokenizer_dir: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(BOM + b"first prompt\nsecond\n")
    assert read_prompts(argparse.Namespace(prompt=None, prompt_file=str(path))) == ["first prompt", "second"]
    tokenizer = load_tokenizer(str(tokenizer_dir))
    assert file_tokens(str(path), tokenizer) == tokenizer("first prompt\nsecond\n")["input_ids"]


def classification_recipe(tmp_path: Path, tokenizer_dir: Path, data: Path) -> Path:
    spec = {"name": "t", "output_dir": str(tmp_path / "run"), "model": {"base": "gpt2"},
            "tokenizer": {"path": str(tokenizer_dir)},
            "data": {"train": str(data), "validation": str(data), "format": "classification", "block_size": 64,
                     "classification": {"labels": {0: "bad", 1: "good"}}}}
    return write_recipe_file(tmp_path / "recipe.yaml", spec)


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_cells_are_the_text_as_written(tmp_path: Path, tokenizer_dir: Path, suffix: str) -> None:
    texts = ["NA", "None", "null", "nan", "007", "1e3", "-0", " 5 ", "TRUE", "#N/A"]
    sep = "," if suffix == ".csv" else "\t"
    data = tmp_path / f"data{suffix}"
    data.write_text(f"text{sep}label\n" + "".join(f"{text}{sep}{i % 2}\n" for i, text in enumerate(texts)))
    recipe = load_recipe(classification_recipe(tmp_path, tokenizer_dir, data))
    prepare(recipe)
    assert [(r["text"], r["label"]) for r in load_records(recipe, "train")] == [(t, i % 2) for i, t in enumerate(texts)]


@pytest.mark.parametrize("suffix, row, message", [
    (".csv", "a third review,", r"data.csv line 5: label '' is not in the label set \[0, 1\]"),
    (".csv", "a third review", r"data.csv line 5: missing field 'label' \(fields present: text\)"),
    (".csv", "a third review,1,extra", r"data.csv line 5: 3 cells, but the header \(line 1\) names 2 columns"),
    (".csv", '"a third review,1', r"data.csv line 5: could not be read as csv: unexpected end of data"),
    (".tsv", "a third review\t", r"data.tsv line 4: label '' is not in the label set \[0, 1\]"),
    (".tsv", "a third review", r"data.tsv line 4: missing field 'label' \(fields present: text\)"),
])
def test_a_bad_csv_row_is_an_error_naming_its_line(tmp_path: Path, tokenizer_dir: Path, capsys,
                                                         suffix: str, row: str, message: str) -> None:
    sep = "," if suffix == ".csv" else "\t"
    first = '"a review\nover two lines"' if suffix == ".csv" else "a review"  # TSV quotes nothing
    data = tmp_path / f"data{suffix}"
    data.write_text(f"text{sep}label\n{first}{sep}1\nanother{sep}0\n{row}\nthe last one{sep}1\n")
    assert main(["prepare", str(classification_recipe(tmp_path, tokenizer_dir, data))]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err
