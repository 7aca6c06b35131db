"""generate and chat: max tokens, stop strings, seeds, batching, prompt templates, context trimming, the CLI."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import WORDS

from finetune import formats
from finetune.formats.chat import chat_segments
from finetune.chat import ChatSession
from finetune.cli import main
from finetune.generation.engine import Batch, Request
from finetune.generation.generator import Generator
from finetune.generation.loading import load_generator
from finetune.generation.params import SamplingParams
from finetune.generation.sampling import _probabilities, _processors, next_tokens
from finetune.recipe import ChatFormat, DataConfig, load_recipe

GREEDY = SamplingParams(max_new_tokens=60, temperature=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_paths(finished_runs: dict[str, Path]) -> dict[str, Path]:
    return finished_runs


@pytest.fixture(scope="module")
def generator(run_paths: dict[str, Path]) -> Generator:
    return load_generator(load_recipe(run_paths["lora"]))


def test_sampling_draws_what_torch_multinomial_draws_from_each_rows_generator() -> None:
    settings = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 50, 0.9), (0.0, 0, 1.0), (1.3, 0, 1.0)]
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in settings]
    ours, multinomial = ([torch.Generator().manual_seed(seed) for seed in range(len(params))] for _ in range(2))
    noise = torch.Generator().manual_seed(99)
    for vocab in (7, 50257):
        for _ in range(10):
            logits = torch.randn(len(params), vocab, generator=noise) * 4
            seen = torch.zeros(len(params), 1, dtype=torch.long)
            expected = []
            for i, p in enumerate(params):
                scores = _processors(p.temperature, p.top_k, p.top_p, p.repetition_penalty)(seen[i:i + 1],
                                                                                            logits[i:i + 1])
                expected.append(int(scores.argmax()) if p.temperature == 0 else int(torch.multinomial(
                    _probabilities(scores, logits[i:i + 1])[0], 1, generator=multinomial[i])))
            assert next_tokens(logits, seen, params, ours).tolist() == expected
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours, multinomial))


def test_the_tuned_adapter_recites_and_stops_at_eos(generator: Generator) -> None:
    result = generator.generate(generator.prompt_ids("good"), GREEDY)
    assert result.text == " bad great awful"
    assert result.finish_reason == "stop"


def test_max_new_tokens_is_honoured(generator: Generator) -> None:
    for limit in (1, 5, 12):
        result = generator.generate(generator.prompt_ids("alpha"), replace(GREEDY, max_new_tokens=limit))
        assert len(result.token_ids) == limit
        assert result.finish_reason == "length"


def test_generation_stops_at_the_context_window(generator: Generator) -> None:
    prompt = generator.prompt_ids(" ".join(WORDS[:20]) * 3)[: generator.context - 3]
    result = generator.generate(prompt, replace(GREEDY, max_new_tokens=50))
    assert len(result.token_ids) == 3 and result.finish_reason == "length"


def test_stop_strings_cut_the_text_and_are_never_streamed(generator: Generator) -> None:
    full = generator.generate(generator.prompt_ids("pi rho"), GREEDY).text
    assert "phi chi" in full
    pieces: list[str] = []
    result = generator.generate(generator.prompt_ids("pi rho"), replace(GREEDY, stop=("chi", "zzz")), pieces.append)
    assert result.text == full[: full.index("chi")]
    assert result.finish_reason == "stop"
    assert "".join(pieces) == result.text and len(pieces) > 1
    assert not any("c" in piece for piece in pieces)  # the partial "c" of "chi" was held back, then dropped


def test_same_seed_same_output_and_other_seeds_differ(generator: Generator) -> None:
    params = SamplingParams(max_new_tokens=30, temperature=1.5, top_k=50, seed=123)
    ids = generator.prompt_ids("alpha")
    first, again = generator.generate(ids, params).text, generator.generate(ids, params).text
    others = {generator.generate(ids, replace(params, seed=seed)).text for seed in range(5)}
    assert first == again
    assert len(others | {first}) > 2


def test_a_batch_gives_each_request_its_single_request_output(generator: Generator) -> None:
    settings = [
        ("alpha", SamplingParams(max_new_tokens=20, temperature=0.0)),
        ("red green", SamplingParams(max_new_tokens=25, temperature=1.2, seed=7)),
        ("good", SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.8, seed=8)),
        ("pi", SamplingParams(max_new_tokens=15, temperature=1.0, top_k=5, repetition_penalty=1.3, seed=9)),
        ("omega " * 10, SamplingParams(max_new_tokens=10, temperature=0.7, stop=("blue",), seed=10)),
    ]
    singles = [generator.generate(generator.prompt_ids(p), s) for p, s in settings]
    batch = [Request(generator.prompt_ids(p), s) for p, s in settings]
    generator.run(batch)
    assert [r.text for r in batch] == [r.text for r in singles]
    assert [r.finish_reason for r in batch] == [r.finish_reason for r in singles]


def test_requests_joining_a_running_batch_get_their_single_request_output(generator: Generator) -> None:
    settings = [("alpha", 30, 1), ("pi rho sigma tau", 12, 2), ("red", 20, 3), ("alpha beta " * 8, 16, 4)]
    requests = [Request(generator.prompt_ids(p), SamplingParams(max_new_tokens=n, temperature=1.0, seed=s))
                for p, n, s in settings]
    singles = [generator.generate(r.prompt_ids, r.params).text for r in requests]
    batch = Batch(generator.engine)
    batch.add(requests[:1])
    for joining in ([requests[1]], [], requests[2:]):  # a short prompt, nothing, then a short and a long one
        for _ in range(4):
            batch.step()
        batch.add(joining)
    while batch.rows:
        batch.step()
    assert [r.text for r in requests] == singles


def test_padding_no_row_needs_is_cut_from_the_cache(generator: Generator) -> None:
    long = Request(generator.prompt_ids("alpha beta gamma delta " * 5), replace(GREEDY, max_new_tokens=1))
    short = Request(generator.prompt_ids("alpha"), replace(GREEDY, max_new_tokens=10))
    batch = Batch(generator.engine)
    batch.add([long, short])
    batch.step()  # the long row finishes; only the short row's columns stay
    assert batch.rows == [short]
    assert batch.mask.shape[1] == len(short.prompt_ids) + 1 == batch.cache.get_seq_length()
    assert bool(batch.mask.all())


def test_prompts_are_built_with_the_training_template(generator: Generator) -> None:
    data = DataConfig(format="instruction")
    instruction = Generator(generator.model, generator.tokenizer, data)
    expected = formats.encode_segments(generator.tokenizer,
                                       [[(data.instruction.template_no_input.format(instruction="alpha"), False)]])
    assert instruction.prompt_ids("alpha") == expected[0][0]
    assert instruction.prompt_ids("alpha", raw=True) == generator.tokenizer("alpha")["input_ids"]
    chat = Generator(generator.model, generator.tokenizer, DataConfig(format="chat"))
    messages = [{"role": "user", "content": "alpha"}]
    segments = chat_segments(messages, chat.data.chat, add_generation_prompt=True)
    assert chat.prompt_ids("alpha") == formats.encode_segments(generator.tokenizer, [segments])[0][0]
    assert generator.prompt_ids("") == [generator.tokenizer.eos_token_id]


def test_long_prompts_keep_their_end(generator: Generator) -> None:
    ids = list(range(500))
    assert generator.fit(ids, 40) == ids[-(generator.context - 40):]
    assert generator.fit(ids, 1000) == ids[-(generator.context // 2):]
    assert generator.fit(ids[:10], 40) == ids[:10]


def chat_generator(generator: Generator, system_prompt: str | None = None) -> Generator:
    return Generator(generator.model, generator.tokenizer, DataConfig(format="chat", chat=ChatFormat(
        system_prompt=system_prompt)))


def test_chat_history_is_trimmed_from_the_oldest_turns_keeping_the_system_prompt(generator: Generator) -> None:
    chat = chat_generator(generator)
    system = {"role": "system", "content": "you recite greek letters"}
    history = []
    for i in range(12):
        history += [{"role": "user", "content": " ".join(WORDS[i:i + 4])},
                    {"role": "assistant", "content": " ".join(WORDS[i + 4:i + 8])}]
    messages = [system, *history, {"role": "user", "content": "alpha beta"}]
    assert len(chat.chat_ids(messages)) > chat.context
    ids, kept = chat.fit_chat(messages, max_new_tokens=60)
    assert len(ids) <= chat.context - 60
    assert kept[0] == system and kept[1]["role"] == "user"
    assert kept[-1] == messages[-1] and kept[1:] == messages[-len(kept) + 1:]
    assert ids == chat.chat_ids(kept)
    _, longer = chat.fit_chat(messages, max_new_tokens=1)
    assert len(longer) > len(kept)  # a smaller reply budget keeps more history
    with pytest.raises(Exception, match="too long"):
        chat.fit_chat([system, {"role": "user", "content": "alpha " * 200}], max_new_tokens=30)


def test_chat_session_keeps_the_recipe_system_prompt_across_trimming(generator: Generator) -> None:
    chat = chat_generator(generator, system_prompt="recite")
    session = ChatSession(chat, SamplingParams(max_new_tokens=20, temperature=0.0, stop=chat.chat_stops()))
    for i in range(8):
        session.reply(" ".join(WORDS[i:i + 6]))
        prompt = chat.decode(chat.chat_ids(session.messages()))
        assert prompt.startswith("System: recite\n\n")
    assert len(session.turns) < 16 and session.turns[0]["role"] == "user"  # the oldest turns were dropped
    session.reset()
    assert session.turns == []


def test_generate_command_streams_and_repeats_with_a_seed(run_paths, capsys: pytest.CaptureFixture) -> None:
    recipe = str(run_paths["lora"])
    assert main(["generate", recipe, "--prompt", "good", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == " bad great awful\n"
    outputs = []
    for _ in range(2):
        assert main(["generate", recipe, "--prompt", "alpha", "--seed", "5", "--temperature", "1.3",
                     "--max-new-tokens", "12"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_generate_command_prompt_file_samples_and_errors(run_paths, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    recipe = str(run_paths["full"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("good\n\npi rho\n")
    assert main(["generate", recipe, "--prompt-file", str(prompts), "--num-samples", "2", "--seed", "1",
                 "--max-new-tokens", "4", "--stop", "great"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== ") == 4 and "sample 2/2 (seed 2)" in out
    assert main(["generate", recipe, "--prompt", "x", "--temperature", "-1"]) == 2
    assert "--temperature must be in [0, 2]" in capsys.readouterr().err
    assert main(["generate", recipe, "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    (tmp_path / "binary.txt").write_bytes(b"good\n\xff\xfe\x00")
    assert main(["generate", recipe, "--prompt-file", str(tmp_path / "binary.txt")]) == 2
    assert "binary.txt: not valid UTF-8 at byte offset 5" in capsys.readouterr().err
    assert main(["generate", recipe, "generate.top_p=0", "--prompt", "x"]) == 2
    assert "'generate.top_p' must be in (0, 1]" in capsys.readouterr().err
    assert main(["generate", recipe, "--prompt", "good", "--base", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == " bad great awful\n"  # the base is the trained recital model here


def test_chat_command_reads_piped_stdin(run_paths, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    recipe = str(run_paths["chat"])
    monkeypatch.setattr("sys.stdin", io.StringIO("alpha beta\n/reset\n\ngood bad\n/exit\nnever read\n"))
    assert main(["chat", recipe, "--system", "recite"]) == 0
    first = capsys.readouterr()
    assert len(first.out.splitlines()) == 2 and "(conversation reset)" in first.err
    monkeypatch.setattr("sys.stdin", io.StringIO("good bad\n"))
    assert main(["chat", recipe, "--system", "recite"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == first.out.splitlines()[1]  # /reset forgot the first turn
    undecodable = io.TextIOWrapper(io.BytesIO(b"\xff\xfe bad\ngood bad\n"), encoding="utf-8", errors="surrogateescape")
    monkeypatch.setattr("sys.stdin", undecodable)
    assert main(["chat", recipe, "--system", "recite"]) == 0
    second = capsys.readouterr()
    assert "not valid UTF-8; skipped" in second.err and second.out.splitlines()[0] == first.out.splitlines()[1]
