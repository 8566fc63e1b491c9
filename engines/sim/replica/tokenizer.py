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

With ``tokenizers`` installed, ``HFTokenizer`` loads a real ``tokenizer.json`` and its chat template
through the router's own tokenizer (router/tokenizer.py: BOS from the tokenizer's post-processor,
the template's BOS never doubled, ``chat_template.jinja`` and named templates, as vLLM does), so the
sim and a router given the same folder produce the same token ids. A model without a chat template
falls back to the tiny model's template above.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import xxhash

if TYPE_CHECKING:
    from router.tokenizer import HFTokenizer as RouterHFTokenizer

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


class ChatTemplateError(ValueError):
    """The model's chat template refused the messages (e.g. Llama's "roles must alternate").
    vLLM 0.32 answers 400 ``BadRequestError`` with the template's own reason as the message
    (``safe_apply_chat_template`` raises ``VLLMValidationError(_template_error_reason(e))``)."""


def template_error_reason(exc: BaseException) -> str:
    """vLLM's ``_template_error_reason``: the message of the first ``jinja2.TemplateError`` in the
    exception's cause/context chain, else the exception's own message."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if any(c.__name__ == "TemplateError" for c in type(cur).__mro__):
            return str(cur)
        cur = cur.__cause__ or cur.__context__
    return str(exc)


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
        self._texts: dict[int, str] = {}  # decode()'s memo of token_text

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
        # Special tokens are skipped, as vLLM detokenizes with skip_special_tokens=True. Each
        # streamed token is decoded on its own (2% of a loaded sim's CPU), so texts are memoised:
        # at most vocab_size short strings, which the cyclic GC does not track.
        n_special = len(SPECIAL_TOKENS)
        texts = self._texts
        out: list[str] = []
        for t in ids:
            if t >= n_special:
                s = texts.get(t)
                if s is None:
                    s = texts[t] = self.token_text(t)
                out.append(s)
        return "".join(out)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        return render_simple_chat(messages, add_generation_prompt)


class HFTokenizer:
    """A real tokenizer from ``tokenizer.json`` (file or model folder): the router's, so both tokenize
    alike, plus the built-in chat rendering for models without a template."""

    def __init__(self, path: str | Path) -> None:
        from router.tokenizer import HFTokenizer as _RouterHF  # late: needs the optional 'tokenizers'

        self.hf: RouterHFTokenizer = _RouterHF(str(path), field="sim.tokenizer")
        self.name = str(path)
        self.vocab_size = self.hf.vocab_size
        self.eos_token_id = self.hf.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(ids)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """Raises ChatTemplateError when the template refuses the messages: like vLLM, any
        exception the template raises is the client's problem (400), not the server's."""
        if self.hf.has_chat_template:
            try:
                return self.hf.render_chat(messages, add_generation_prompt)
            except Exception as exc:
                raise ChatTemplateError(template_error_reason(exc)) from exc
        return render_simple_chat(messages, add_generation_prompt, bos=self.hf.bos_token or SPECIAL_TOKENS[0])


def load_tokenizer(spec: str | None, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """``None``/``"sim"``: the built-in tokenizer; otherwise a path to tokenizer.json or its folder."""
    if spec is None or spec == "sim":
        return SimTokenizer(vocab_size)
    return HFTokenizer(spec)
