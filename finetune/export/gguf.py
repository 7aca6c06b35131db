"""`finetune export --to gguf`: the trained GPT-2 as GGUF files for llama.cpp and what is built on it (Ollama,
LM Studio, llamafile), written with the `gguf` package's writer in llama.cpp's GPT-2 layout, one file per tensor
type, each checked in llama.cpp against transformers (gguf_check.py) before gguf/ appears; plus an Ollama
Modelfile (modelfile.py). Configs and tokenizers llama.cpp's GPT-2 would compute differently are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from finetune.chat_template import chat_template
from finetune.errors import UserError
from finetune.export import trained_model
from finetune.export.gguf_check import check_gguf
from finetune.export.modelfile import write_modelfile
from finetune.recipe import Recipe

# type name -> (GGMLQuantizationType name, llama.cpp file type); 1-D tensors (norms, biases) stay f32 in every
# type, as llama.cpp's own converter writes them.
TYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "q8_0": ("Q8_0", 7)}
# llama.cpp's GPT-2 graph applies ggml_gelu, GELU in its tanh approximation: transformers' gelu_new (the same
# function as gelu_pytorch_tanh and gelu_fast). Exact GELU ("gelu") differs from it by under 5e-4 per activation:
# a trained tiny GPT-2 switched to it still matched within llama.cpp's own f32 noise (6.9e-4 vs 7.7e-4 of the
# log-prob range), and every export is checked.
GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")
# GPT-2 block tensors (transformers name, GGUF name); Conv1D weights are stored (in, out) and are transposed.
BLOCK_TENSORS = (("ln_1.weight", "attn_norm.weight"), ("ln_1.bias", "attn_norm.bias"),
                 ("attn.c_attn.weight", "attn_qkv.weight"), ("attn.c_attn.bias", "attn_qkv.bias"),
                 ("attn.c_proj.weight", "attn_output.weight"), ("attn.c_proj.bias", "attn_output.bias"),
                 ("ln_2.weight", "ffn_norm.weight"), ("ln_2.bias", "ffn_norm.bias"),
                 ("mlp.c_fc.weight", "ffn_up.weight"), ("mlp.c_fc.bias", "ffn_up.bias"),
                 ("mlp.c_proj.weight", "ffn_down.weight"), ("mlp.c_proj.bias", "ffn_down.bias"))


def export_gguf(recipe: Recipe, types: list[str]) -> Path:
    """Write `<run>/gguf/`: `model-<type>.gguf` per type and a `Modelfile` for the first; every file is loaded in
    llama.cpp and compared with transformers first (a mismatch raises RuntimeError and leaves no gguf/)."""
    types = list(dict.fromkeys(types))
    unknown = [name for name in types if name not in TYPES]
    if unknown or not types:
        problem = f"unknown GGUF type {', '.join(map(repr, unknown))}" if unknown else "no GGUF type given"
        raise UserError(f"--types: {problem}; choose from {', '.join(TYPES)}")
    model, tokenizer, trained = trained_model(recipe)
    final = recipe.run.final
    refuse_unsupported(model.config, tokenizer, final)
    template = chat_template(trained.data)
    out = recipe.run.gguf
    with recipe.run.staged(out) as staging:
        write_modelfile(staging / "Modelfile", f"model-{types[0]}.gguf", trained.data)
        for name in types:
            path = staging / f"model-{name}.gguf"
            write_gguf(path, model, tokenizer, template, name, recipe.name)
            check_gguf(path, name, model, tokenizer, trained.data)
    print(f"GGUF written to {out}: {', '.join(f'model-{name}.gguf' for name in types)} and Modelfile")
    return out


def refuse_unsupported(config, tokenizer: PreTrainedTokenizerFast, final: Path) -> None:
    """UserError naming the config key (or the tokenizer) that llama.cpp's GPT-2 would compute differently."""
    where = f"GGUF export of {final}: config.json"
    if config.model_type != "gpt2":
        raise UserError(f"{where} has model_type {config.model_type!r}; the GGUF export writes GPT-2 models only")
    if config.activation_function not in GELU:
        raise UserError(f"{where} sets activation_function {config.activation_function!r}; llama.cpp's GPT-2 "
                        f"computes GELU ({', '.join(GELU)})")
    if not config.scale_attn_weights:
        raise UserError(f"{where} sets scale_attn_weights false; llama.cpp's GPT-2 always scales attention by "
                        "1/sqrt(head size)")
    if config.scale_attn_by_inverse_layer_idx:
        raise UserError(f"{where} sets scale_attn_by_inverse_layer_idx true; llama.cpp's GPT-2 scales every layer's "
                        "attention alike")
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"GGUF export of {final}: the tokenizer has {len(tokenizer)} tokens but the model's "
                        f"vocab_size is {config.vocab_size}")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    gpt2_regex = (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
                  and spec.get("normalizer") is None and spec["model"].get("type") == "BPE")
    if not gpt2_regex:
        raise UserError(f"GGUF export of {final}: the tokenizer (tokenizer.path, or model.base's) is not a byte-level "
                        f"BPE with GPT-2's split regex (pre_tokenizer {json.dumps(pre)}, normalizer "
                        f"{json.dumps(spec.get('normalizer'))}); llama.cpp's 'gpt-2' pre-tokenizer would split text "
                        "differently")


def write_gguf(path: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, template: str | None,
               type_name: str, name: str) -> None:
    """One GGUF file of `model` (GPT2LMHeadModel) with its tensors in `type_name`, its tokenizer and the chat
    template (None: none in the file)."""
    import gguf

    config = model.config
    qtype, file_type = gguf.GGMLQuantizationType[TYPES[type_name][0]], TYPES[type_name][1]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    writer.add_name(name)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    if template is not None:
        writer.add_chat_template(template)

    def add(gguf_name: str, tensor: torch.Tensor, transpose: bool = False) -> None:
        array = tensor.detach().to(torch.float32).cpu().numpy()
        array = np.ascontiguousarray(array.T if transpose else array)
        if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, array)
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            writer.add_tensor(gguf_name, array.astype(np.float16))  # rows not a whole number of Q8_0 blocks
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)

    weights = model.transformer.state_dict()
    add("token_embd.weight", weights["wte.weight"])
    add("position_embd.weight", weights["wpe.weight"])
    for layer in range(config.n_layer):
        for source, target in BLOCK_TENSORS:
            tensor = weights[f"h.{layer}.{source}"]
            add(f"blk.{layer}.{target}", tensor, transpose=tensor.ndim == 2)
    add("output_norm.weight", weights["ln_f.weight"])
    add("output_norm.bias", weights["ln_f.bias"])
    if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
        add("output.weight", model.lm_head.weight)  # untied head; a tied one is read from token_embd
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_tokenizer(writer, tokenizer: PreTrainedTokenizerFast, vocab_size: int) -> None:
    """The byte-level BPE as llama.cpp's `gpt2` tokenizer model with the `gpt-2` pre-tokenizer: tokens by id
    (rows of the embedding past the tokenizer as unused tokens), merges, token types; <|endoftext|> (the
    tokenizer's EOS) as BOS and EOS, added to no prompt, as transformers tokenizes GPT-2 prompts."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    added = {token["id"]: token["special"] for token in spec["added_tokens"]}
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = [gguf.TokenType.NORMAL if i not in added else
             gguf.TokenType.CONTROL if added[i] else gguf.TokenType.USER_DEFINED for i in range(len(tokens))]
    padding = range(len(tokens), vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in padding])
    writer.add_token_types(types + [gguf.TokenType.UNUSED] * len(padding))
    merges = spec["model"]["merges"]
    writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge for merge in merges])
    writer.add_bos_token_id(tokenizer.eos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
