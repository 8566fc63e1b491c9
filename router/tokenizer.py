"""Tokenizer for precise token-mode prefix keys (``--tokenizer DIR``), shared with the simulator.

Loads the model folder's ``tokenizer.json`` (HF ``tokenizers``, Rust, fast) and its chat template,
and tokenizes as vLLM does through transformers (checked against transformers 5.19 / vLLM 0.32):

* completions prompts: ``encode(text, add_special_tokens=True)``. BOS (or none) comes from
  ``tokenizer.json``'s post-processor; ``add_bos_token`` in ``tokenizer_config.json`` is ignored
  when a ``tokenizer.json`` exists, as transformers ignores it;
* chat: the template rendered with ``add_generation_prompt=True``, then encoded *without* special
  tokens (vLLM's chat ``add_special_tokens=False`` default): the template carries BOS, so it is
  never added twice;
* the template: ``chat_template.jinja`` next to the config wins over ``chat_template`` in
  ``tokenizer_config.json``; a list of named templates means the one named ``default``. Rendered in
  a sandbox with transformers' extras (``raise_exception``, ``strftime_now``, a ``tojson`` that does
  not HTML-escape, ``{% break %}``/``{% continue %}``).

If the router's tokens differ from the engine's, predicted hits never materialise: the parity check
(parity.py) reports it. engines/sim/replica/tokenizer.py wraps this class, so the simulator tokenizes a
real model's files exactly as the router does.

Optional dependency: ``pip install 'kvrouter[tokenizer]'`` (tokenizers, jinja2).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import ConfigError
from .errors import BadRequest


class HFTokenizer:
    def __init__(self, folder: str, field: str = "routing.tokenizer") -> None:
        """``folder``: a model folder or its ``tokenizer.json``; ``field`` names the setting in errors."""
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
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja_file = tok_file.parent / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        self._template = None
        if isinstance(template, str):
            try:
                from jinja2.ext import loopcontrols
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                raise ConfigError(field, folder, "chat templates need 'jinja2' (kvrouter[tokenizer])") from None
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            self._template = env.from_string(template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``add_special_tokens``: apply the tokenizer's post-processor (BOS, if it adds one)."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text, add_special_tokens=True)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("the tokenizer has no chat template")
        from jinja2 import TemplateError

        try:
            return str(
                self._template.render(
                    messages=list(messages),
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                )
            )
        except TemplateError as exc:
            # e.g. Llama's "roles must alternate": the engine would refuse the same messages
            raise BadRequest(f"The model's chat template rejected the messages: {exc}", param="messages") from None

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def _raise_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # transformers' filter: plain json.dumps (jinja's own tojson HTML-escapes <, >, &, ')
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(tok: object) -> str:
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict) and isinstance(tok.get("content"), str):
        return str(tok["content"])
    return ""


def load_tokenizer(folder: str) -> HFTokenizer:
    return HFTokenizer(folder)
