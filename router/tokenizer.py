"""Router-side tokenizer for precise token-mode prefix keys: ``--tokenizer DIR``.

Loads the model folder's ``tokenizer.json`` (HF ``tokenizers``, Rust, fast) and the chat template
from ``tokenizer_config.json``, and renders chat requests exactly as vLLM does before tokenizing
(template with ``add_generation_prompt=True``, then encode without adding special tokens; the
template carries BOS). Completions prompts are encoded with the tokenizer's own special-token
rule, like vLLM's ``add_special_tokens=True`` default. If the router's tokens differ from the
engine's, predicted hits never materialise: the parity check (parity.py) reports it.

Optional dependency: ``pip install 'kvrouter[tokenizer]'`` (tokenizers, jinja2).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError
from .errors import BadRequest


class HFTokenizer:
    def __init__(self, folder: str) -> None:
        try:
            from tokenizers import Tokenizer as _RustTokenizer
        except ImportError:
            raise ConfigError("routing.tokenizer", folder, "needs the 'tokenizers' package (kvrouter[tokenizer])") from None
        path = Path(folder)
        tok_file = path / "tokenizer.json" if path.is_dir() else path
        if not tok_file.is_file():
            raise ConfigError("routing.tokenizer", folder, "no tokenizer.json there")
        self._tok = _RustTokenizer.from_file(str(tok_file))
        cfg: dict[str, Any] = {}
        cfg_file = tok_file.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja_file = tok_file.parent / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        self._template = None
        if isinstance(template, str):
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                raise ConfigError("routing.tokenizer", folder, "chat templates need 'jinja2' (kvrouter[tokenizer])") from None
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception  # what HF chat templates call
            self._template = env.from_string(template)

    def encode_prompt(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        if self._template is None:
            raise ValueError("the tokenizer has no chat template")
        from jinja2 import TemplateError

        try:
            return str(
                self._template.render(
                    messages=list(messages),
                    add_generation_prompt=True,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                )
            )
        except TemplateError as exc:
            # e.g. Llama's "roles must alternate": the engine would refuse the same messages
            raise BadRequest(f"The model's chat template rejected the messages: {exc}", param="messages") from None

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return list(self._tok.encode(self.render_chat(messages), add_special_tokens=False).ids)


def _raise_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _token_text(tok: object) -> str:
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict) and isinstance(tok.get("content"), str):
        return str(tok["content"])
    return ""


def load_tokenizer(folder: str) -> HFTokenizer:
    return HFTokenizer(folder)
