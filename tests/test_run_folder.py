"""The run folder: finetune removes or replaces only what it wrote, and never publishes figures of weights that
have since changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune import cli
from finetune.errors import UserError
from finetune.run_folder import OWNED_FILE, RunFolder

from helpers import write_recipe

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

USER_FILES = {"prepared/notes.txt": "mine", "prepared.old-7/keep.txt": "mine too", "final/weights.bin": "precious",
              "checkpoints/c.txt": "a checkpoint of my own", "report.md": "# my report"}


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_users_entries_in_output_dir_are_refused_by_name_and_left_as_they_were(tmp_path, tiny_model_dir, capsys):
    """output_dir pointing at a folder of the user's: every stage refuses, before any work, to replace an entry it
    did not write (prepare's store, train's checkpoints/ and final/, eval's report.md), and once the user moves
    those away the stages run without touching anything else of theirs."""
    mine = tmp_path / "mine"
    for name, text in USER_FILES.items():
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text(text)
    path = write_recipe(tmp_path, {"model": {"base": str(tiny_model_dir)}}, output_dir=str(mine),
                        train={"max_steps": 4, "save_steps": 2})

    theirs = {name: text.encode() for name, text in USER_FILES.items()}

    def refused(command: str, entry: str) -> None:
        capsys.readouterr()
        assert cli.main([command, str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{mine / entry} exists and was not written by finetune" in err, err
        entries = {name.split("/")[0] for name in theirs}
        assert {k: v for k, v in files_under(mine).items() if k.split("/")[0] in entries} == theirs

    def move_aside(entry: str) -> None:
        (mine / entry).rename(tmp_path / f"moved-{entry}")
        for name in [name for name in theirs if name.split("/")[0] == entry]:
            del theirs[name]

    refused("prepare", "prepared")
    move_aside("prepared")
    refused("train", "checkpoints")
    move_aside("checkpoints")
    refused("train", "final")
    move_aside("final")
    assert cli.main(["train", str(path)]) == 0
    refused("eval", "report.md")
    move_aside("report.md")
    assert cli.main(["eval", str(path)]) == 0
    assert cli.main(["train", str(path), "train.max_steps=6"]) == 0  # replaces its own final/ and store freely
    assert cli.main(["prepare", str(path), "data.block_size=16"]) == 0
    assert (mine / "prepared.old-7" / "keep.txt").read_text() == "mine too"
    assert {p.name for p in mine.iterdir()} == {
        "prepared.old-7", "prepared", "checkpoints", "final", "metrics.jsonl", "loss.png", "eval.json", "report.md",
        "tensorboard", ".prepare.lock", ".train.lock", OWNED_FILE}


def test_a_run_folder_of_an_earlier_version_is_adopted_but_nothing_else_in_it(tmp_path):
    run = RunFolder(tmp_path / "run")
    for name in ("prepared/manifest.json", "final/recipe.yaml", "notes/todo.txt"):
        (run.root / name).parent.mkdir(parents=True)
        (run.root / name).write_text("{}")
    run.claim(run.final, run.prepared, run.merged)  # its own entries, and one it has yet to write
    with pytest.raises(UserError, match="notes exists and was not written by finetune"):
        run.claim(run.root / "notes")
    assert sorted(json.loads((run.root / OWNED_FILE).read_text())) == ["final", "merged", "prepared"]


@pytest.mark.slow
def test_push_refuses_the_figures_of_weights_trained_again_after_the_eval(tmp_path, tiny_model_dir, capsys):
    """train; eval; train on; push: the card would show the earlier model's loss under the later model's name."""
    path = write_recipe(tmp_path, {"model": {"base": str(tiny_model_dir)}}, train={"max_steps": 4, "save_steps": 2})
    run = tmp_path / "run"
    assert cli.main(["train", str(path)]) == 0
    assert cli.main(["eval", str(path)]) == 0
    push = ["push", str(path), "--repo", "me/tiny", "--dry-run"]
    assert cli.main(["train", str(path), "train.max_steps=6"]) == 0
    capsys.readouterr()
    assert cli.main(push + ["train.max_steps=6"]) == 2
    assert "holds the figures of other weights" in capsys.readouterr().err
    assert not (run / "hub").exists()
    assert cli.main(["eval", str(path), "train.max_steps=6"]) == 0
    assert cli.main(push + ["train.max_steps=6"]) == 0
    published = json.loads((run / "hub" / "eval.json").read_text())
    assert published["loss"] == json.loads((run / "eval.json").read_text())["loss"]

    (run / "eval.json").write_text('{"loss": 1.2, "perpl')  # cut short by a kill or a full disk
    capsys.readouterr()
    assert cli.main(push + ["train.max_steps=6"]) == 2
    assert "eval.json is not valid JSON" in capsys.readouterr().err
