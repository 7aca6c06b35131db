"""`finetune export --to gguf`: the files load in llama.cpp (xllamacpp) and compute what transformers computes
(tokens, log-probs, greedy tokens, the chat prompt), a LoRA run exports its merged model, what llama.cpp's GPT-2
would get wrong is refused, and a failed check leaves no gguf/."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest
import torch
from finished_runs import write_recipe
from helpers import save_tiny_gpt2, shared_path, write_recipe_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from finetune.chat_template import chat_template
from finetune.cli import main
from finetune.export import gguf as gguf_export
from finetune.export import gguf_check, trained_model
from finetune.export.llama_cpp import LlamaCpp
from finetune.export.modelfile import go_fill, ollama_template
from finetune.formats import data_format, encode_segments, encode_texts
from finetune.recipe import DataConfig, load_recipe, save_recipe
from finetune.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["Hello, world!", "  two  spaces\tand a tab\n\nnew lines", "numbers 12345 678, 3.14 and $9.99",
         "Unicode: café naïve — “quotes” 日本語 🙂", "it's we'll they're I'M", "alpha beta"]
CONVERSATIONS = [
    [{"role": "user", "content": "red green"}],
    [{"role": "system", "content": "answer in colours"}, {"role": "user", "content": "alpha beta?"},
     {"role": "assistant", "content": "red"}, {"role": "user", "content": "'eta' \"mu\" {x} {{y}} {% z %}?"}],
]
# Quotes, braces, '{%', newlines and non-ASCII in the role templates (test_chat_template.py's tricky case).
TRICKY_CHAT = {"system": "'{content}'{{%\n", "user": "\"{{{{x}}}}\r\n{content}{{#\n", "assistant": "{%-'A':",
               "assistant_content": " {content}", "after_assistant": "\n}}#", "system_prompt": "{b} \"q\" é"}


def save_final(recipe_path: Path, base: Path) -> Path:
    """The run of `recipe_path` finished with `base` (a saved model and tokenizer) as its final/."""
    recipe = load_recipe(recipe_path)
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(recipe.run.final)
    load_tokenizer(str(base)).save_pretrained(recipe.run.final)
    save_recipe(recipe, recipe.run.final / "recipe.yaml")
    return recipe_path


def export(recipe: Path, types: str, capsys) -> tuple[int, str]:
    code = main(["export", str(recipe), "--to", "gguf", "--types", types])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def gpt2_tokenizer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 over the real GPT-2 tokenizer (50257 tokens)."""
    tokenizer = load_tokenizer(str(shared_path("gpt2-tokenizer")))
    return save_tiny_gpt2(tokenizer, tmp_path_factory.mktemp("gpt2-vocab"), n_layer=2, n_head=2, n_embd=32,
                          n_positions=128)


def chat_recipe(folder: Path, name: str, base: Path, chat: dict) -> Path:
    (folder / "chat.jsonl").write_text("")
    return write_recipe_file(folder / f"{name}.yaml", {
        "name": name, "model": {"base": str(base)}, "lora": None,
        "data": {"train": str(folder / "chat.jsonl"), "format": "chat", "block_size": 64, "chat": chat}})


def test_real_gpt2_tokenizer_and_tricky_chat_template(gpt2_tokenizer_model: Path, tmp_path: Path, capsys):
    recipe_path = save_final(chat_recipe(tmp_path, "real-vocab", gpt2_tokenizer_model, TRICKY_CHAT),
                             gpt2_tokenizer_model)
    code, out = export(recipe_path, "f16,q8_0", capsys)
    assert code == 0, out
    recipe = load_recipe(recipe_path)
    folder = recipe.run.gguf
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "model-f16.gguf", "model-q8_0.gguf"]
    assert "model-f16.gguf: next-token log-probs within" in out and "model-q8_0.gguf: next-token" in out
    _, tokenizer, trained = trained_model(recipe)
    fmt = data_format(trained.data)
    with LlamaCpp(folder / "model-f16.gguf", 128) as llama:
        with urllib.request.urlopen(llama.address + "/props") as response:
            assert json.loads(response.read())["chat_template"] == chat_template(trained.data)
        for text in TEXTS:  # the 'gpt-2' pre-tokenizer splits as GPT-2's regex
            assert llama.tokenize(text) == encode_texts(tokenizer, [text])[0], text
        for messages in CONVERSATIONS:  # llama.cpp's Jinja renders the recipe's prompt, tricky literals included
            expected = encode_segments(tokenizer, [fmt.chat_prompt(messages)])[0][0]
            assert llama.tokenize(llama.chat_prompt(messages)) == expected
            # and its chat completions prompt with just these tokens (no BOS added)
            reply = llama.server.handle_chat_completions({"messages": messages, "max_tokens": 1})
            assert reply["usage"]["prompt_tokens"] == len(expected)


@pytest.mark.parametrize("run", ["full", "lora"])
def test_trained_tokenizer_runs_give_transformers_greedy_tokens(finished_runs: dict[str, Path], run: str, capsys):
    """The recital model (a trained 300-token BPE) and an adapter trained over it: every type continues the word
    list with transformers' greedy tokens (up to a tie at the type's precision), and the LoRA file carries the merged
    weights, not the base's."""
    recipe = load_recipe(finished_runs[run])
    code, out = export(finished_runs[run], "f32,f16,q8_0", capsys)
    assert code == 0, out
    assert "chat template" not in out  # a text run has no template in its files
    model, tokenizer, _ = trained_model(recipe)
    prompt = encode_texts(tokenizer, ["gamma delta epsilon"])[0]
    expected = greedy(model, prompt, 12)
    for name in ("f32", "f16", "q8_0"):
        with LlamaCpp(recipe.run.gguf / f"model-{name}.gguf", 128) as llama:
            tokens = [step[0]["id"] for step in llama.greedy(prompt, 12)]
            assert [llama.tokenize(text) for text in TEXTS] == encode_texts(tokenizer, TEXTS)  # a trained BPE
        # A type may part from transformers only where two tokens tie at its precision (measured: f32 and f16 never
        # did here, q8_0 at token 9 of the LoRA run, gap 0.015; another CPU's kernels round differently): the same
        # tokens up to there, and there transformers' log-probs of the two differ by less than the check's bound
        same = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), len(expected))
        if same < len(expected):
            logprobs = gguf_check.transformers_logprobs(model, prompt + tokens)[len(prompt) + same - 1]
            gap = (logprobs[expected[same]] - logprobs[tokens[same]]).item()
            print(f"{run} {name}: greedy parts from transformers at token {same}, log-prob gap {gap:.3f}")
            assert gap < gguf_check.TOLERANCE[name] * (logprobs.max() - logprobs.min()).item(), name
    if run == "lora":
        base = AutoModelForCausalLM.from_pretrained(recipe.model.base)
        ids = torch.tensor([prompt + expected])
        with torch.no_grad():
            moved = (model(ids).logits - base(ids).logits).abs().max().item()
        assert moved > 100 * gguf_check.TOLERANCE["f32"]  # the adapter moved the logits far beyond the check's bound


def test_chat_run_modelfile(finished_runs: dict[str, Path], capsys):
    code, out = export(finished_runs["chat"], "q8_0", capsys)
    assert code == 0, out
    assert "chat template renders the recipe's prompt" in out
    modelfile = (load_recipe(finished_runs["chat"]).run.gguf / "Modelfile").read_text()
    assert modelfile.split("\n", 1)[1] == (
        'FROM ./model-q8_0.gguf\n'
        'TEMPLATE """{{ range .Messages }}{{ if eq .Role "system" }}System: {{ .Content }}\n\n'
        '{{ else if eq .Role "user" }}User: {{ .Content }}\n\n'
        '{{ else if eq .Role "assistant" }}Assistant: {{ .Content }}<|endoftext|>\n\n{{ end }}{{ end }}Assistant:"""\n'
        'PARAMETER stop "<|endoftext|>"\n'
        'PARAMETER stop "User:"\n')


def test_instruction_run_template_renders_in_llama_cpp(recital_base: Path, tmp_path: Path, capsys):
    """The single-turn template (the last user message through `data.instruction`, with Jinja namespaces) renders
    in llama.cpp's own Jinja engine as the recipe renders it; braces and quotes in the template stay text."""
    (tmp_path / "rows.jsonl").write_text("")
    recipe_path = save_final(write_recipe_file(tmp_path / "instr.yaml", {
        "name": "instr", "model": {"base": str(recital_base)}, "lora": None,
        "data": {"train": str(tmp_path / "rows.jsonl"), "format": "instruction", "block_size": 64,
                 "instruction": {"template_no_input": "Q {{{{x}}}} \"{instruction}\" {{% endfor %}}\n>>>:"}}}),
        recital_base)
    code, out = export(recipe_path, "f16", capsys)
    assert code == 0 and "chat template renders the recipe's prompt" in out, out
    modelfile = (load_recipe(recipe_path).run.gguf / "Modelfile").read_text()
    assert 'TEMPLATE """Q {{ "{" }}{{ "{" }}x}} "{{ .Prompt }}" {{ "{" }}% endfor %}\n>>>:"""' in modelfile


def test_text_run_modelfile_passes_the_prompt_through(finished_runs: dict[str, Path], capsys):
    assert ollama_template(load_recipe(finished_runs["full"]).data) == "{{ .Prompt }}"


def test_prompted_runs_modelfile_templates():
    instruction = DataConfig(format="instruction")
    assert ollama_template(instruction) == instruction.instruction.template_no_input.format(
        instruction="{{ .Prompt }}", input="")
    assert ollama_template(DataConfig(format="preference")).startswith("{{ range .Messages }}")


def test_go_template_escapes_braces():
    assert go_fill("{{{{x}}}} {{{content}!", "{{ .Content }}") == '{{ "{" }}{{ "{" }}x}} {{ "{" }}{{ .Content }}!'


@pytest.mark.parametrize(("config", "key"), [
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"activation_function": "silu"}, "activation_function 'silu'"),
    ({"scale_attn_weights": False}, "scale_attn_weights false"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx true"),
])
def test_configs_llama_cpp_computes_differently_are_refused(tokenizer_dir: Path, tmp_path: Path, capsys, config,
                                                            key):
    base = save_tiny_gpt2(load_tokenizer(str(tokenizer_dir)), tmp_path / "base", n_layer=1, n_head=2, n_embd=32,
                          n_positions=64, **config)
    code, out = export(save_final(write_recipe(tmp_path, "refused", base, lora=False), base), "f16", capsys)
    assert code == 2 and f"config.json sets {key}" in out, out
    assert not (tmp_path / "refused" / "gguf").exists()


@pytest.mark.parametrize("config", [{"n_inner": 48}, {"activation_function": "gelu"},
                                    {"reorder_and_upcast_attn": True, "attn_implementation": "eager"},
                                    {"tie_word_embeddings": False}, {"vocab_size": 307}])
def test_configs_llama_cpp_computes_alike_are_exported(tokenizer_dir: Path, tmp_path: Path, capsys, config):
    """A feed-forward width other than 4 * n_embd (written as the file's feed_forward_length), exact GELU, the
    float32 attention that reorder_and_upcast_attn asks for, an output head of its own (written as output.weight)
    and embedding rows past the tokenizer's 300 tokens (unused tokens in the file) all load and pass the check
    (weights at 10x the init scale, so that the logits spread as a trained model's do)."""
    tokenizer = load_tokenizer(str(tokenizer_dir))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**{"vocab_size": len(tokenizer), "n_layer": 2, "n_head": 2, "n_embd": 32,
                                          "n_positions": 64, "initializer_range": 0.2, **config}))
    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    code, out = export(save_final(write_recipe(tmp_path, "alike", base, lora=False), base), "f32,q8_0", capsys)
    assert code == 0 and "model-q8_0.gguf: next-token log-probs within" in out, out


def test_tokenizer_without_gpt2_split_is_refused(tokenizer_dir: Path, tmp_path: Path, capsys):
    from tokenizers import pre_tokenizers

    tokenizer = load_tokenizer(str(tokenizer_dir))
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    base = save_tiny_gpt2(tokenizer, tmp_path / "base", n_layer=1, n_head=2, n_embd=32, n_positions=64)
    code, out = export(save_final(write_recipe(tmp_path, "refused", base, lora=False), base), "f16", capsys)
    assert code == 2 and "not a byte-level BPE with GPT-2's split regex" in out and "Whitespace" in out, out


def test_unknown_type_is_refused(finished_runs: dict[str, Path], capsys):
    code, out = export(finished_runs["full"], "f16,q4_k", capsys)
    assert code == 2 and "unknown GGUF type 'q4_k'; choose from f32, f16, q8_0" in out, out


def test_a_failed_check_leaves_no_gguf_folder(finished_runs: dict[str, Path], monkeypatch, tmp_path, capsys):
    """A mapping mistake (the two layer norms of each block swapped: same shapes, so the file loads) is caught by
    the check, and nothing is left that looks like an export."""
    recipe = load_recipe(finished_runs["full"])
    shutil.rmtree(recipe.run.gguf, ignore_errors=True)
    swapped = {"ln_1": "ln_2", "ln_2": "ln_1"}
    monkeypatch.setattr(gguf_export, "BLOCK_TENSORS", tuple(
        (swapped.get(source.split(".")[0], source.split(".")[0]) + "." + source.split(".", 1)[1], target)
        for source, target in gguf_export.BLOCK_TENSORS))
    with pytest.raises(RuntimeError, match="model-f16.gguf does not compute what transformers computes"):
        main(["export", str(finished_runs["full"]), "--to", "gguf", "--types", "f16"])
    assert not recipe.run.gguf.exists() and not recipe.run.gguf.with_name("gguf.tmp").exists()
