"""The chat template exported with final/ (and merged/, hub/): `apply_chat_template` gives exactly the prompt
tokens that `generate` / `chat` / `serve` build, and with the reply the tokens training saw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from helpers import save_tiny_gpt2, write_recipe_file
from finetune.chat_template import chat_template
from finetune.cli import main
from finetune.generation.loading import load_generator
from finetune.prepared import load_prepared
from finetune.recipe import DataConfig, load_recipe
from finetune.train import train

CONVERSATIONS = [
    [{"role": "user", "content": "red green"}, {"role": "assistant", "content": "blue cyan"}],
    [{"role": "system", "content": "answer in colours"}, {"role": "user", "content": "alpha beta?"},
     {"role": "assistant", "content": "red"}, {"role": "user", "content": "'eta' \"mu\" {x}?"},
     {"role": "assistant", "content": "green\nblue "}],
    [{"role": "user", "content": "red"}, {"role": "assistant", "content": "blue"}, {"role": "user", "content": "mu"},
     {"role": "assistant", "content": "nu"}, {"role": "user", "content": " pi\n"},
     {"role": "assistant", "content": "xi"}],
]
INSTRUCTIONS = [{"instruction": "name a colour", "output": "red"},
                {"instruction": "say \"hi\" {twice}\n", "output": "hi hi"},
                {"instruction": "count to three", "output": "one two three\n"}]
# Quotes, braces (str.format's '{{' '}}' are literal braces), '{%', '{#', newlines, a CR, a backslash and non-ASCII.
TRICKY_CHAT = {"system": "'{content}'{{%\n", "user": "\"{{{{x}}}}\r\n{content}{{#\n", "assistant": "{%-'A':",
               "assistant_content": " {content}", "after_assistant": "\n}}#", "system_prompt": "{b} \"q\" {% raw \\n é"}
TRICKY_INSTRUCTION = {"template_no_input": "Q {{{{instruction}}}} \"{instruction}\" {{% endfor %}} '\\n'\n>>>:\n",
                      "template": "{instruction} {input}\n>>>:\n"}


@pytest.fixture(scope="module")
def long_context_model(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with 512 positions: room for the Alpaca preamble in the tests' 300-token vocabulary."""
    return save_tiny_gpt2(AutoTokenizer.from_pretrained(tokenizer_dir), tmp_path_factory.mktemp("tiny-gpt2-512"),
                          n_layer=1, n_head=2, n_embd=32, n_positions=512)


def run_recipe(tmp_path: Path, base: Path, fmt: str, rows: list[dict], section: dict) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    raw = {"name": f"tmpl-{fmt}", "output_dir": str(tmp_path / "run"), "model": {"base": str(base)}, "lora": None,
           "data": {"train": str(data), "validation": str(data), "format": fmt, "block_size": 512, fmt: section},
           "train": {"max_steps": 1, "batch_size": 2, "eval_steps": 0, "save_steps": 1, "report_to": "none"}}
    return write_recipe_file(tmp_path / "recipe.yaml", raw)


def template_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                         return_dict=False)


@pytest.mark.parametrize("section", [{}, {"system_prompt": "be brief"}, TRICKY_CHAT],
                         ids=["default", "system-prompt", "tricky"])
def test_chat_template_gives_the_prompt_and_training_tokens(tmp_path, long_context_model, section):
    recipe = load_recipe(run_recipe(tmp_path, long_context_model, "chat", [{"messages": c} for c in CONVERSATIONS],
                                    section))
    train(recipe)
    tokenizer = AutoTokenizer.from_pretrained(recipe.run.final)
    generator = load_generator(recipe)
    assert json.loads((recipe.run.prepared / "manifest.json").read_text())["validation"]["records_truncated"] == 0
    store = load_prepared(recipe, "validation")
    trained = list(zip(store.records(), store.documents(), strict=True))
    assert len(trained) == len(CONVERSATIONS)
    for record, tokens in trained:
        messages = record["messages"]
        assert template_ids(tokenizer, messages, False) == tokens.tolist()
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = template_ids(tokenizer, messages[:turn], True)
            assert prompt == generator.chat_ids(messages[:turn])  # serve's /v1/chat/completions and `chat`
            assert prompt == tokens.tolist()[:len(prompt)]
    single = CONVERSATIONS[0][:1]
    assert template_ids(tokenizer, single, True) == generator.prompt_ids(single[0]["content"])  # `generate`


@pytest.mark.parametrize("section", [{}, TRICKY_INSTRUCTION], ids=["alpaca", "tricky"])
def test_instruction_template_gives_the_prompt_and_training_tokens(tmp_path, long_context_model, section):
    recipe = load_recipe(run_recipe(tmp_path, long_context_model, "instruction", INSTRUCTIONS, section))
    train(recipe)
    tokenizer = AutoTokenizer.from_pretrained(recipe.run.final)
    generator = load_generator(recipe)
    assert json.loads((recipe.run.prepared / "manifest.json").read_text())["validation"]["records_truncated"] == 0
    documents = list(load_prepared(recipe, "validation").documents())
    assert len(documents) == len(INSTRUCTIONS)
    for row, tokens in zip(INSTRUCTIONS, documents):
        user = {"role": "user", "content": row["instruction"]}
        reply = {"role": "assistant", "content": row["output"]}
        prompt = template_ids(tokenizer, [user], True)
        assert prompt == generator.prompt_ids(row["instruction"]) == generator.chat_ids([user])
        assert template_ids(tokenizer, [{"role": "system", "content": "ignored"}, reply, user], True) == prompt
        assert template_ids(tokenizer, [user, reply], False) == tokens.tolist()


def test_text_runs_have_no_template_and_an_unknown_role_is_refused(tiny_model_dir):
    assert chat_template(DataConfig(format="text")) is None
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = chat_template(DataConfig(format="chat"))
    with pytest.raises(Exception, match="unknown role tool: use system, user or assistant"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_merge_and_push_carry_the_template_and_the_model_card_uses_it(tmp_path, long_context_model):
    path = run_recipe(tmp_path, long_context_model, "chat", [{"messages": c} for c in CONVERSATIONS], {})
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
                                    "generate": {"max_new_tokens": 4, "temperature": 0}}))
    recipe = load_recipe(path)
    train(recipe)
    expected = chat_template(recipe.data)
    assert AutoTokenizer.from_pretrained(recipe.run.final).chat_template == expected
    assert main(["merge", str(path)]) == 0
    assert main(["push", str(path), "--repo", "me/tiny-chat", "--merged", "--dry-run"]) == 0
    for folder in ("merged", "hub"):
        assert AutoTokenizer.from_pretrained(recipe.run.root / folder).chat_template == expected, folder
    card = (recipe.run.hub / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    assert "tokenizer.apply_chat_template(messages, add_generation_prompt=True" in code
    exec(compile(code.replace("'me/tiny-chat'", repr(str(recipe.run.hub))), "README.md", "exec"), {})  # runs
