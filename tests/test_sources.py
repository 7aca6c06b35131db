"""Many sources per split (files, globs, folders, Hub specs, weighted), compressed files read as streams, and a
cache and resume that cover every file."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from finetune.cli import main
from finetune.data import read_batches
from finetune.errors import UserError
from finetune.prepare import prepare
from finetune.prepared import cache_state, load_prepared
from finetune.recipe import DataConfig, load_recipe
from finetune.sources import HubSource, LocalSource

from helpers import ROOT, corpus_lines, shared_path, write_recipe_file

COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": lambda data: zstandard.ZstdCompressor().compress(data)}


def recipe_file(tmp_path: Path, tokenizer_dir: Path, data: dict, name: str = "t") -> Path:
    return write_recipe_file(tmp_path / f"{name}.yaml", {
        "name": name, "model": {"base": "gpt2"}, "tokenizer": {"path": str(tokenizer_dir)},
        "data": {"block_size": 64, **data}})


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def store_rows(recipe, split: str) -> list[list[int]]:
    return [row["input_ids"].tolist() for row in load_prepared(recipe, split)]


def test_sources_are_written_as_a_path_a_list_or_mappings_resolved_against_the_recipe(tmp_path, tokenizer_dir):
    (tmp_path / "sub" / "held-out").mkdir(parents=True)
    path = recipe_file(tmp_path / "sub", tokenizer_dir, {
        "format": "instruction",
        "train": ["a.jsonl", {"path": "shards/*.jsonl.zst", "weight": 2.5, "max_records": 10,
                              "output_field": "answer"}, {"hub": "user/set", "config": "en", "split": "test"}],
        "validation": "held-out/"})
    data = load_recipe(path).data
    assert data.train == [str(tmp_path / "sub" / "a.jsonl"),
                          LocalSource(path=str(tmp_path / "sub" / "shards" / "*.jsonl.zst"), weight=2.5,
                                      max_records=10, output_field="answer"),
                          HubSource(hub="user/set", config="en", split="test")]
    assert data.validation == str(tmp_path / "sub" / "held-out")
    bad = {"'data.train\\[1\\].wieght'; did you mean 'data.train\\[1\\].weight'": ["x.jsonl", {"path": "y.jsonl",
                                                                                              "wieght": 2}],
           "'data.train\\[0\\].weight' must be above 0": [{"path": "y.jsonl", "weight": 0}],
           "'data.train.label_field': the instruction format reads no such field .*instruction_field":
               {"path": "y.jsonl", "label_field": "y"},
           "compressed \\(.gz\\) file must hold": "y.parquet.gz"}
    for message, train in bad.items():
        with pytest.raises(UserError, match=message):
            load_recipe(recipe_file(tmp_path, tokenizer_dir, {"format": "instruction", "train": train}))
    with pytest.raises(UserError, match="'data.validation.weight': weights mix the train split"):
        load_recipe(recipe_file(tmp_path, tokenizer_dir, {"train": "a.txt", "validation": {"path": "b.txt",
                                                                                            "weight": 2}}))


@pytest.mark.parametrize("compression", COMPRESS)
def test_compressed_files_read_as_their_plain_text_with_progress_on_the_stored_bytes(tmp_path, compression):
    lines = corpus_lines(3000)
    plain = {".txt": "\n".join(lines).encode() + b"\n", ".jsonl": jsonl([{"text": line} for line in lines]),
             ".tsv": ("text\tid\n" + "".join(f"{line}\t{i}\n" for i, line in enumerate(lines))).encode()}
    for kind, content in plain.items():
        (tmp_path / f"c{kind}").write_bytes(content)
        packed = tmp_path / f"c{kind}{compression}"
        packed.write_bytes(COMPRESS[compression](content))
        cfg = DataConfig(shard_tokens=5000)  # blocks of 20 kB: several batches
        expected = [row for batch in read_batches(str(tmp_path / f"c{kind}"), cfg) for row in batch.rows]
        batches = list(read_batches(str(packed), cfg))
        assert [row for batch in batches for row in batch.rows] == expected and len(expected) == 3000
        assert sum(batch.nbytes for batch in batches) == packed.stat().st_size
        assert kind == ".tsv" or len(batches) > 3  # blocks of bytes (TSV: batches of rows)


def test_progress_counts_every_stored_byte_of_row_based_files(tmp_path):
    """CSV, JSON arrays and Parquet report the stored bytes they consumed too, so prepare's byte progress on them
    ends at the files' size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": line, "id": str(i)} for i, line in enumerate(corpus_lines(9000))]
    (tmp_path / "c.csv").write_text("text,id\n" + "".join(f"{r['text']},{r['id']}\n" for r in rows))
    (tmp_path / "c.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet", row_group_size=1000)
    for name in ("c.csv", "c.json", "c.parquet"):
        batches = list(read_batches(str(tmp_path / name), DataConfig()))
        assert [row for batch in batches for row in batch.rows] == rows and len(batches) == 3, name
        assert sum(batch.nbytes for batch in batches) == (tmp_path / name).stat().st_size, name


def test_errors_in_compressed_files_name_the_file_and_line(tmp_path, tokenizer_dir, capsys):
    rows = jsonl([{"text": "fine"}, {"text": "fine too"}]) + b'{"text": broken\n'
    (tmp_path / "bad.jsonl.zst").write_bytes(COMPRESS[".zst"](rows))
    assert main(["prepare", str(recipe_file(tmp_path, tokenizer_dir, {"train": "bad.jsonl.zst"}))]) == 2
    assert f"{tmp_path / 'bad.jsonl.zst'} line 3: not valid JSON" in capsys.readouterr().err
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(jsonl([{"text": "x" * 5000}] * 50))[:-300])
    assert main(["prepare", str(recipe_file(tmp_path, tokenizer_dir, {"train": "cut.jsonl.gz"}))]) == 2
    assert f"{tmp_path / 'cut.jsonl.gz'}: could not be decompressed as .gz" in capsys.readouterr().err


def test_the_shared_hh_rlhf_gz_file_prepares_as_preference_pairs(tmp_path, tokenizer_dir):
    source = shared_path("preference/hh-rlhf-harmless-base-test.jsonl.gz")
    recipe = load_recipe(recipe_file(tmp_path, tokenizer_dir, {
        "train": str(source), "format": "preference", "block_size": 512, "max_records": 300}),
        ["train.objective=dpo"])
    manifest = prepare(recipe)
    assert manifest["train"]["records_in"] + manifest["validation"]["records_in"] == 300
    assert manifest["train"]["records_kept"] > 250
    assert manifest["sources"][0]["source"] == str(source) and manifest["sources"][0]["token_share"] == 1.0


def test_a_folder_a_glob_and_a_list_of_its_files_prepare_the_same_store(tmp_path, tokenizer_dir):
    """A folder's files are read in sorted order, compressed or not, and its glob reads the same; the manifest
    counts each source of a list (each carves its own validation rows)."""
    lines = [f"{line} ({i})" for i, line in enumerate(corpus_lines(400))]
    folder = tmp_path / "shards"
    (folder / "deeper").mkdir(parents=True)
    parts = {"a.jsonl.gz": lines[:100], "b.txt": lines[100:250], "deeper/c.jsonl.zst": lines[250:]}
    for name, part in parts.items():
        content = "".join(f"{line}\n" for line in part).encode() if name.endswith(".txt") else \
            jsonl([{"text": line} for line in part])
        (folder / name).write_bytes(COMPRESS[Path(name).suffix](content) if name.endswith(("gz", "zst")) else content)
    (folder / "notes.md").write_text("not data")
    (folder / ".hidden.txt").write_text("left out\n")
    listed = [str(folder / name) for name in parts]
    results = {}
    for name, train in (("folder", str(folder)), ("glob", str(folder / "**" / "*.*")), ("listed", listed)):
        recipe = load_recipe(recipe_file(tmp_path, tokenizer_dir, {"train": train, "validation_fraction": 0.1},
                                         name))
        results[name] = (prepare(recipe), store_rows(recipe, "train"), store_rows(recipe, "validation"))
    folder_manifest, *stores = results["folder"]
    assert results["glob"][1:] == tuple(stores) and len(stores[0]) > 10
    assert folder_manifest["train"]["records_in"] + folder_manifest["validation"]["records_in"] == 400
    assert [s["source"] for s in folder_manifest["sources"]] == [str(folder)] * 2
    listed_sources = results["listed"][0]["sources"]
    assert [(s["split"], s["source"]) for s in listed_sources] == \
        [("train", path) for path in listed] + [("validation", path) for path in listed]
    assert sum(s["records_in"] for s in listed_sources) == 400
    assert sum(s["token_share"] for s in listed_sources if s["split"] == "train") == pytest.approx(1, abs=1e-3)
    assert sum(s["tokens"] for s in listed_sources) == \
        folder_manifest["train"]["tokens"] + folder_manifest["validation"]["tokens"]  # the same records


def test_adding_or_removing_a_shard_of_a_folder_invalidates_the_cache_without_rereading_unchanged_files(
        tmp_path, tokenizer_dir):
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jsonl.gz").write_bytes(gzip.compress(jsonl([{"text": f"doc {i} {j}"} for j in range(20)])))
    recipe = load_recipe(recipe_file(tmp_path, tokenizer_dir, {"train": str(folder)}))
    manifest = prepare(recipe)
    assert sorted(manifest["source_files"]) == [str(folder / f"{i}.jsonl.gz") for i in range(3)]
    assert cache_state(recipe, checksums=False).manifest is not None
    # size and time unchanged: the recorded digest is kept, the file is not reread (a changed digest shows it)
    known = dict(manifest["source_files"][str(folder / "0.jsonl.gz")], digest="recorded")
    manifest["source_files"][str(folder / "0.jsonl.gz")] = known
    assert cache_state(recipe, checksums=False).source_files[str(folder / "0.jsonl.gz")]["digest"] != "recorded"
    (recipe.run.prepared / "manifest.json").write_text(json.dumps(manifest))
    assert cache_state(recipe, checksums=False).source_files[str(folder / "0.jsonl.gz")]["digest"] == "recorded"
    prepare(recipe, force=True)
    (folder / "3.jsonl.gz").write_bytes(gzip.compress(jsonl([{"text": "doc 3"}] * 5)))
    assert cache_state(recipe, checksums=False).manifest is None
    grown = prepare(recipe)
    assert grown["train"]["records_in"] + grown["validation"]["records_in"] == 65
    (folder / "1.jsonl.gz").unlink()
    assert cache_state(recipe, checksums=False).manifest is None


def test_weights_are_passes_over_each_source_and_set_the_token_shares(tmp_path, tokenizer_dir):
    """Two sources of equal size with weights 1 and 3: the second gives three times the tokens (rows carved for
    validation are not repeated); a weight of 0.5 keeps a seeded half of a source's train rows."""
    for name in ("small", "large"):
        write = [{"text": f"{name} {line}"} for line in corpus_lines(400, seed=len(name))]
        (tmp_path / f"{name}.jsonl").write_bytes(jsonl(write))
    mix = {"train": [str(tmp_path / "small.jsonl"), {"path": str(tmp_path / "large.jsonl"), "weight": 3}],
           "validation_fraction": 0.1}
    recipe = load_recipe(recipe_file(tmp_path, tokenizer_dir, mix, "mix"))
    manifest = prepare(recipe)
    train = [s for s in manifest["sources"] if s["split"] == "train"]
    validation = [s for s in manifest["sources"] if s["split"] == "validation"]
    single = prepare(load_recipe(recipe_file(tmp_path, tokenizer_dir, {**mix, "train": mix["train"][1]["path"]},
                                             "single")))
    assert [s["weight"] for s in train] == [1.0, 3.0]
    assert train[1]["tokens"] == 3 * single["train"]["tokens"] and train[1]["records_in"] == 3 * 360
    assert validation[1]["records_in"] == 40 and validation[1]["tokens"] == single["validation"]["tokens"]
    assert train[1]["token_share"] == pytest.approx(train[1]["tokens"] / manifest["train"]["tokens"], abs=1e-4)
    assert train[1]["token_share"] == pytest.approx(3 / 4, abs=0.02)  # the sources' texts are of about one length
    half = prepare(load_recipe(recipe_file(tmp_path, tokenizer_dir, {
        "train": {"path": str(tmp_path / "large.jsonl"), "weight": 1.5}, "validation_fraction": 0.1}, "half")))
    assert 360 + 140 < half["train"]["records_in"] < 360 + 220
    again = prepare(load_recipe(recipe_file(tmp_path, tokenizer_dir, {
        "train": {"path": str(tmp_path / "large.jsonl"), "weight": 1.5}, "validation_fraction": 0.1}, "again")))
    assert again["train"]["tokens"] == half["train"]["tokens"]  # the draw is seeded


@pytest.mark.slow
def test_a_killed_prepare_of_a_folder_continues_mid_file_and_ends_like_an_uninterrupted_one(tmp_path, tokenizer_dir):
    folder = tmp_path / "shards"
    folder.mkdir()
    lines = [f"{line} (document {i})" for i, line in enumerate(corpus_lines(3000, seed=3))]
    for i in range(3):
        (folder / f"{i}.jsonl.gz").write_bytes(gzip.compress(jsonl([{"text": t} for t in lines[i::3]])))
    data = {"train": str(folder), "shard_tokens": 2000, "num_proc": 2}
    straight = load_recipe(recipe_file(tmp_path, tokenizer_dir, data, "straight"))
    expected = prepare(straight)
    killed_path = recipe_file(tmp_path, tokenizer_dir, data, "killed")
    killed = load_recipe(killed_path)
    progress = killed.run.root / "prepared.partial" / "progress"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "finetune", "prepare", str(killed_path)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and len(list(progress.glob("a-*.json"))) < 2:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(progress.glob("a-*.json")))
    assert done >= 2 and not (progress / "a.finished").exists(), "killed too late"
    result = subprocess.run([sys.executable, "-m", "finetune", "prepare", str(killed_path)], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "shards already complete, continuing from row" in result.stdout
    manifest = json.loads((killed.run.prepared / "manifest.json").read_text())
    for split in ("train", "validation"):
        assert manifest[split]["tokens"] == expected[split]["tokens"]
        assert store_rows(killed, split) == store_rows(straight, split)
    assert np.array_equal(np.array(manifest["sources"][0]["tokens"]), np.array(expected["sources"][0]["tokens"]))


def test_a_source_s_own_field_names_read_its_rows(tmp_path, tokenizer_dir):
    """Two instruction sets with different column names in one recipe: each is read with its own names."""
    (tmp_path / "a.jsonl").write_bytes(jsonl([{"instruction": f"say {w}", "output": w} for w in corpus_lines(20)]))
    (tmp_path / "b.jsonl").write_bytes(jsonl([{"question": f"tell {w}", "answer": w} for w in corpus_lines(20)]))
    recipe = load_recipe(recipe_file(tmp_path, tokenizer_dir, {
        "format": "instruction", "validation_fraction": 0.1, "block_size": 512,
        "train": ["a.jsonl", {"path": "b.jsonl", "instruction_field": "question", "output_field": "answer"}]}))
    manifest = prepare(recipe)
    assert [(s["source"], s["records_kept"]) for s in manifest["sources"]] == \
        [(str(tmp_path / "a.jsonl"), 18), (str(tmp_path / "b.jsonl"), 18),
         (str(tmp_path / "a.jsonl"), 2), (str(tmp_path / "b.jsonl"), 2)]
    with pytest.raises(UserError, match=r"b.jsonl line 1: missing field 'instruction'"):
        prepare(load_recipe(recipe_file(tmp_path, tokenizer_dir, {"format": "instruction",
                                                                  "train": ["a.jsonl", "b.jsonl"]}, "plain")))


def test_a_chat_recipe_reads_an_instruction_shaped_source_as_a_user_turn_and_the_reply(tmp_path, tokenizer_dir):
    """Alpaca-shaped rows (here with their own field names) in a chat recipe prepare exactly as the conversations of
    one user turn (the instruction, then the input after a blank line when there is one) and the assistant's reply;
    a row without an output is dropped and counted."""
    rows = [{"question": f"say {w}", "context": "in French" if i % 3 else "", "answer": w}
            for i, w in enumerate(corpus_lines(40))]
    conversations = [{"conversations": [
        {"from": "human", "value": row["question"] + (f"\n\n{row['context']}" if row["context"] else "")},
        {"from": "gpt", "value": row["answer"]}]} for row in rows]
    (tmp_path / "ins.jsonl").write_bytes(jsonl([*rows, {"question": "no reply", "answer": " "}]))
    (tmp_path / "conv.jsonl").write_bytes(jsonl(conversations))
    shaped = {"path": "ins.jsonl", "instruction_field": "question", "input_field": "context", "output_field": "answer"}
    manifests, stores = {}, {}
    for name, source in (("shaped", shaped), ("conversations", "conv.jsonl")):
        recipe = load_recipe(recipe_file(tmp_path, tokenizer_dir, {
            "format": "chat", "block_size": 512, "train": source, "validation": source}, name))
        manifests[name] = prepare(recipe)
        stores[name] = [{key: row[key].tolist() for key in ("input_ids", "labels")}
                        for row in load_prepared(recipe, "train")]
    assert stores["shaped"] == stores["conversations"] and len(stores["shaped"]) > 1
    assert manifests["shaped"]["train"]["records_kept"] == 40
    assert manifests["shaped"]["train"]["records_dropped"] == {"empty": 1}
    assert manifests["shaped"]["train"]["target_tokens"] == manifests["conversations"]["train"]["target_tokens"] > 40


@pytest.mark.parametrize("source, message", [
    ({"path": "a.jsonl", "output_field": "answer"},
     r"'data.train\[1\].output_field' names a field of instruction-shaped rows; set "
     r"'data.train\[1\].instruction_field'"),
    ({"path": "a.jsonl", "instruction_field": "q", "messages_field": "turns"},
     r"'data.train\[1\].messages_field' and 'instruction_field' are both set"),
])
def test_a_chat_source_names_fields_of_one_row_shape(tmp_path, tokenizer_dir, source, message):
    with pytest.raises(UserError, match=message):
        load_recipe(recipe_file(tmp_path, tokenizer_dir, {"format": "chat", "train": ["b.jsonl", source]}))
    with pytest.raises(UserError, match=r"'data.chat.input_field' names a field of instruction-shaped rows"):
        load_recipe(recipe_file(tmp_path, tokenizer_dir, {"format": "chat", "train": "b.jsonl",
                                                          "chat": {"input_field": "context"}}))
