"""Build a tiny random Llama, tokenizer included, entirely locally (no hub download).

    .venv-vllm/bin/python engines/vllm/make_tiny_model.py .cache/tiny-llama \
        [--vocab 4096 --hidden 128 --layers 2 --heads 4 --kv-heads 4 --seed 0]

The model exists so a real vLLM server can run on a CPU-only machine for the router's integration
tests: what matters is that vLLM loads it with its normal Llama code path, tokenizes with a real
byte-level BPE tokenizer and chat template, and that prefix caching / KV events behave as with any
model. The weights are random, so the text it generates is noise.

Deterministic for a given seed and arguments: the training text comes from ``random.Random(seed)``,
BPE training is deterministic for a fixed corpus, and the weights come from ``torch.manual_seed``.

Constraints that come from vLLM's CPU backend (docs/real-engines.md):
* ``hidden / heads`` (head_dim) must be one of the CPU attention head sizes listed in HEAD_SIZES;
* ``max_position_embeddings`` bounds ``--max-model-len`` (2048 here).

Runs in the vLLM venv (needs torch, transformers, tokenizers, safetensors).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
ROLE_TOKENS = ["<|user|>", "<|assistant|>", "<|system|>"]
# Order fixes the ids: BOS=0, EOS=1, PAD=2, then the role markers.
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS]
# vLLM CPU attention (CPU_ATTN) supports exactly these head sizes.
HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
MAX_POSITIONS = 2048
CORPUS_LINES = 20_000

# `{{bos}}<|role|>\ncontent\n...<|assistant|>\n`. The role markers are special tokens, so a chat prompt's
# token ids start with 0 and the role ids, which the router's own tokenizer must reproduce exactly.
# Tool-capable in the style of the Hermes / Qwen tool templates: `tools` (and RAG `documents`) go into
# a system header, assistant `tool_calls` render as <tool_call> JSON with the decoded `arguments`,
# `tool` messages as <tool_response>, `reasoning_content` as <think>; assistant turns sit in
# transformers' `{% generation %}` block. A plain chat without tools renders exactly as the first,
# tool-less version of this template did.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set msgs = messages -%}"
    "{%- if tools or documents -%}"
    "{{- '<|system|>\n' -}}"
    "{%- if msgs and msgs[0]['role'] == 'system' -%}"
    "{{- msgs[0]['content'] + '\n\n' -}}"
    "{%- set msgs = msgs[1:] -%}"
    "{%- endif -%}"
    "{%- if tools -%}"
    "{{- '# Tools\nYou may call one or more functions. Their signatures are in <tools></tools>:\n<tools>\n' -}}"
    "{%- for tool in tools -%}{{- tool | tojson -}}{{- '\n' -}}{%- endfor -%}"
    '{{- \'</tools>\nFor each call, reply with <tool_call>{"name": ..., "arguments": ...}</tool_call>.\n\' -}}'
    "{%- endif -%}"
    "{%- if documents -%}"
    "{{- '# Documents\n' -}}"
    "{%- for doc in documents -%}{{- doc | tojson -}}{{- '\n' -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- for message in msgs -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\n' -}}"
    "{%- generation -%}"
    "{%- if message.get('reasoning_content') -%}"
    "{{- '<think>\n' + message['reasoning_content'] + '\n</think>\n' -}}"
    "{%- endif -%}"
    "{{- message['content'] -}}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{{- '\n<tool_call>\n' + {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson"
    " + '\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '\n' -}}"
    "{%- endgeneration -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|tool|>\n<tool_response>\n' + message['content'] + '\n</tool_response>\n' -}}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)

_ONSETS = ["", *"bcdfghklmnprstvw", "st", "tr", "ch", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "ng", "ck"]
_PUNCT = [".", ",", "?", "!", ":", ";"]


def synthetic_corpus(rng: random.Random, lines: int) -> list[str]:
    """Pseudo-English lines (syllable words, numbers, punctuation, some code-like text).

    A Zipf-ish word distribution gives the BPE trainer frequent words to merge whole, like real text,
    so prompts tokenize to a realistic ~4 characters per token.
    """
    words = [
        "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(1, 3))
        )
        for _ in range(3000)
    ]
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    out: list[str] = []
    for _ in range(lines):
        n = rng.randint(4, 24)
        toks = rng.choices(words, weights=weights, k=n)
        if rng.random() < 0.3:
            toks.insert(rng.randrange(len(toks) + 1), str(rng.randint(0, 10_000)))
        if rng.random() < 0.1:
            toks = [f"{toks[0]}({toks[1]}, {toks[2]})", "=", *toks[3:]]
        line = " ".join(toks)
        out.append(line[0].upper() + line[1:] + rng.choice(_PUNCT))
    return out


def build_tokenizer(out: Path, vocab: int, seed: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols up front, so any input text (not just the corpus) tokenizes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(random.Random(seed), CORPUS_LINES), trainer=trainer)
    for i, special in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(special)
        if got != i:
            raise RuntimeError(f"special token {special!r} got id {got}, expected {i}")
    tok.save(str(out / "tokenizer.json"))

    # Written by hand rather than through transformers so the file does not change with the
    # transformers version: the router reads the same chat template and flags from it.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": ROLE_TOKENS,
        # No BOS on plain completions: /v1/completions token ids are exactly the text's BPE ids.
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": ROLE_TOKENS,
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return int(tok.get_vocab_size())


def build_model(out: Path, args: argparse.Namespace, vocab: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    head_dim = args.hidden // args.heads
    if args.hidden % args.heads or head_dim not in HEAD_SIZES:
        raise SystemExit(
            f"--hidden/--heads gives head_dim {args.hidden / args.heads}; vLLM CPU needs one of {HEAD_SIZES}"
        )
    if args.heads % args.kv_heads:
        raise SystemExit(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=head_dim,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output folder (created)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(args.out, args.vocab, args.seed)
    params = build_model(args.out, args, vocab)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(
        f"tiny model in {args.out}: vocab {vocab}, {params / 1e6:.2f} M params, "
        f"{size / 1e6:.1f} MB on disk, built in {time.monotonic() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
