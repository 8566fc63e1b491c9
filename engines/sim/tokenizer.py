"""Tokenizers for the simulated engine: a deterministic built-in one, or a real HF ``tokenizer.json``.

The built-in tokenizer needs no files and gives the same ids in every process and on every
machine (pieces are hashed with xxh3, never Python's salted ``hash``), so a prompt sent twice, or
to two replicas, or by the router's own local copy, always yields the same blocks. It mirrors
the tiny test model used with real vLLM (reference/vllm-cpu.md §2):

* special tokens ``<|begin_of_text|>``=0, ``<|end_of_text|>``=1, ``<|pad|>``=2, ``<|user|>``=3,
  ``<|assistant|>``=4, ``<|system|>``=5, recognised verbatim inside text;
* completions get no BOS (``add_bos_token=false``); chat prompts are rendered with the template
  ``{bos}<|role|>\\ncontent\\n ... <|assistant|>\\n`` and so start with token 0.

A piece is a run of word characters, one punctuation character, or a run of whitespace; its id is
``6 + xxh3_64(piece) % (vocab_size - 6)``. Different pieces can collide (it is a hash), which is
harmless for a simulator: only determinism and prefix stability matter. ``decode`` renders ids as
pronounceable pseudo-words, so generated text is readable and stable too.

With ``tokenizers`` installed, ``HFTokenizer`` loads a real ``tokenizer.json`` (and the chat
template from ``tokenizer_config.json`` when jinja2 is installed), so the sim tokenizes exactly like
an engine serving that model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import xxhash

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|pad|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
)
BOS_ID = 0
EOS_ID = 1
DEFAULT_VOCAB_SIZE = 4096  # the tiny model's vocabulary

_PIECE = re.compile(r"\w+|\s+|[^\w\s]", re.UNICODE)
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea")


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str: ...


def content_text(content: Any) -> str:
    """OpenAI message content (string or list of parts) as plain text; non-text parts are dropped."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, Mapping) and p.get("type") == "text"
        )
    return str(content)


def render_simple_chat(
    messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, bos: str = SPECIAL_TOKENS[0]
) -> str:
    """The tiny model's chat template: ``{bos}<|role|>\\ncontent\\n`` per message, then the prompt."""
    parts = [bos]
    for msg in messages:
        parts.append(f"<|{msg.get('role', 'user')}|>\n{content_text(msg.get('content'))}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


class SimTokenizer:
    """Deterministic built-in tokenizer (see module docstring). Stateless and cheap to share."""

    def __init__(self, vocab_size: int = DEFAULT_VOCAB_SIZE, add_bos: bool = False) -> None:
        if vocab_size <= len(SPECIAL_TOKENS) + 1:
            raise ValueError(
                f"vocab_size must exceed {len(SPECIAL_TOKENS) + 1} (current value: {vocab_size})"
            )
        self.name = "sim"
        self.vocab_size = vocab_size
        self.eos_token_id: int | None = EOS_ID
        self.add_bos = add_bos
        self._special = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        self._span = vocab_size - len(SPECIAL_TOKENS)

    def piece_id(self, piece: str) -> int:
        return len(SPECIAL_TOKENS) + xxhash.xxh3_64_intdigest(piece.encode("utf-8")) % self._span

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = [BOS_ID] if (add_special_tokens and self.add_bos) else []
        for chunk in _SPECIAL_SPLIT.split(text):
            if not chunk:
                continue
            special = self._special.get(chunk)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self.piece_id(m.group()) for m in _PIECE.finditer(chunk))
        return ids

    def token_text(self, tid: int) -> str:
        if 0 <= tid < len(SPECIAL_TOKENS):
            return SPECIAL_TOKENS[tid]
        # Two syllables from the id's bits, with a leading space: reads as words, stable forever.
        x = tid * 2654435761 & 0xFFFFFFFF
        syl = []
        for _ in range(1 + (x & 1)):
            x >>= 1
            syl.append(_ONSETS[x % len(_ONSETS)] + _VOWELS[(x >> 4) % len(_VOWELS)])
            x >>= 7
        return " " + "".join(syl)

    def decode(self, ids: Sequence[int]) -> str:
        # Special tokens are skipped, as vLLM detokenizes with skip_special_tokens=True.
        n_special = len(SPECIAL_TOKENS)
        return "".join(self.token_text(t) for t in ids if t >= n_special)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        return render_simple_chat(messages, add_generation_prompt)


class HFTokenizer:
    """A real tokenizer from ``tokenizer.json`` (file or model folder), via the ``tokenizers`` package."""

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as exc:  # pragma: no cover - optional extra
            raise RuntimeError(
                "HFTokenizer needs the 'tokenizers' package (pip install kvrouter[tokenizer])"
            ) from exc
        p = Path(path)
        folder = p if p.is_dir() else p.parent
        file = p / "tokenizer.json" if p.is_dir() else p
        self._tok = _HF.from_file(str(file))
        self.name = str(p)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        cfg: dict[str, Any] = {}
        cfg_file = folder / "tokenizer_config.json"
        if cfg_file.exists():
            cfg = json.loads(cfg_file.read_text())
        self.bos_token = _token_str(cfg.get("bos_token")) or SPECIAL_TOKENS[0]
        self.eos_token = _token_str(cfg.get("eos_token")) or SPECIAL_TOKENS[1]
        self.eos_token_id = self._tok.token_to_id(self.eos_token)
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.chat_template: str | None = (
            cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None
        )
        self._template: Any = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # Special tokens written in the text are recognised by the tokenizer itself; only the BOS
        # prefix depends on the model's add_bos_token, as in transformers' fast tokenizers.
        ids: list[int] = list(self._tok.encode(text, add_special_tokens=False).ids)
        bos_id = self._tok.token_to_id(self.bos_token)
        if add_special_tokens and self.add_bos and bos_id is not None:
            ids.insert(0, bos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        template = self._compiled_template()
        if template is not None:
            return str(
                template.render(
                    messages=list(messages),
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                )
            )
        return render_simple_chat(messages, add_generation_prompt, bos=self.bos_token)

    def _compiled_template(self) -> Any:
        """The chat template, compiled once (it was recompiled per request on the server's path)."""
        if self.chat_template is None:
            return None
        if self._template is None:
            try:
                import jinja2
            except ImportError:  # pragma: no cover - optional extra
                return None
            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
            self._template = env.from_string(self.chat_template)
        return self._template


def _token_str(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, Mapping) and isinstance(v.get("content"), str):
        return str(v["content"])
    return None


def load_tokenizer(spec: str | None, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """``None``/``"sim"``: the built-in tokenizer; otherwise a path to tokenizer.json or its folder."""
    if spec is None or spec == "sim":
        return SimTokenizer(vocab_size)
    return HFTokenizer(spec)
