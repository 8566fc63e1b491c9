"""Tokenizer for precise token-mode prefix keys (``--tokenizer DIR``), shared with the simulator.

Loads the model folder's ``tokenizer.json`` (HF ``tokenizers``, Rust, fast) and its chat template,
and tokenizes as vLLM does through transformers (checked against transformers 5.19 / vLLM 0.32):

* completions prompts: ``encode(text, add_special_tokens=True)``. BOS (or none) comes from
  ``tokenizer.json``'s post-processor; ``add_bos_token`` in ``tokenizer_config.json`` is ignored
  when a ``tokenizer.json`` exists, as transformers ignores it;
* chat: rendered exactly as vLLM renders it (router/chat_render.py: message normalisation, tools,
  documents, template kwargs, named and server-level templates), then encoded with the request's
  ``add_special_tokens`` (vLLM's chat default False: the template carries BOS, so it is never
  added twice).

If the router's tokens differ from the engine's, predicted hits never materialise: the parity check
(parity.py) reports it. engines/sim/replica/tokenizer.py wraps this class, so the simulator tokenizes a
real model's files exactly as the router does.

Optional dependency: ``pip install 'kvrouter[tokenizer]'`` (tokenizers, jinja2).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ConfigError
from .prefix_tokens import PrefixTokenCache

if TYPE_CHECKING:
    from .chat_render import ChatOptions


class HFTokenizer:
    def __init__(
        self,
        folder: str,
        field: str = "routing.tokenizer",
        *,
        chat_template: str | None = None,
        default_chat_template_kwargs: Mapping[str, Any] | None = None,
        trust_request_chat_template: bool = False,
    ) -> None:
        """``folder``: a model folder or its ``tokenizer.json``; ``field`` names the setting in errors;
        ``chat_template`` / ``default_chat_template_kwargs``: the engine's ``--chat-template`` (a file
        or Jinja text), ``--default-chat-template-kwargs`` and ``--trust-request-chat-template``."""
        try:
            from tokenizers import Tokenizer as _RustTokenizer
        except ImportError:
            raise ConfigError(field, folder, "needs the 'tokenizers' package (kvrouter[tokenizer])") from None
        path = Path(folder)
        tok_file = path / "tokenizer.json" if path.is_dir() else path
        if not tok_file.is_file():
            raise ConfigError(field, folder, "no tokenizer.json there")
        self.name = folder
        self._tok = _RustTokenizer.from_file(str(tok_file))
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        cfg: dict[str, Any] = {}
        cfg_file = tok_file.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.eos_token_id: int | None = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        # chat prompts that extend a recent one (the next turn) are encoded from where they differ
        self.prefix_cache = PrefixTokenCache(self._tok)
        from .chat_render import ChatRenderer, load_template_setting

        self.renderer = ChatRenderer(
            tok_file.parent,
            cfg,
            chat_template=load_template_setting(chat_template, "routing.chat_template"),
            default_kwargs=default_chat_template_kwargs,
            trust_request_chat_template=trust_request_chat_template,
            field=field,
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``add_special_tokens``: apply the tokenizer's post-processor (BOS, if it adds one)."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text, add_special_tokens=True)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    @property
    def has_chat_template(self) -> bool:
        return self.renderer.has_template

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        options: ChatOptions | None = None,
    ) -> str:
        """The prompt text vLLM renders for these messages and request options (chat_render.py)."""
        if not self.has_chat_template:
            raise ValueError("the tokenizer has no chat template")
        from .chat_render import ChatOptions

        opts = options or ChatOptions(add_generation_prompt=add_generation_prompt)
        return self.renderer.render(messages, opts)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        options: ChatOptions | None = None,
    ) -> list[int]:
        """Token ids as vLLM's chat path produces them: the rendered text encoded with the
        request's ``add_special_tokens`` (default False: the template carries BOS)."""
        text = self.render_chat(messages, add_generation_prompt, options)
        if options is not None and options.add_special_tokens:
            return self.encode(text, add_special_tokens=True)
        # a copy: the cache keeps its own list
        return list(self.prefix_cache.encode(text))


def _token_text(tok: object) -> str:
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict) and isinstance(tok.get("content"), str):
        return str(tok["content"])
    return ""


def load_tokenizer(
    folder: str,
    chat_template: str | None = None,
    default_chat_template_kwargs: Mapping[str, Any] | None = None,
    trust_request_chat_template: bool = False,
) -> HFTokenizer:
    return HFTokenizer(
        folder,
        chat_template=chat_template,
        default_chat_template_kwargs=default_chat_template_kwargs,
        trust_request_chat_template=trust_request_chat_template,
    )
