"""Chat rendering exactly as vLLM 0.32 does it for an HF (Jinja) model folder.

A chat request becomes tokens in vLLM in three steps, each reproduced here:

1. the messages are normalised (router/chat_messages.py) for the template's content format;
2. the template inputs are merged as ``OnlineRenderer.preprocess_chat`` and
   ``ChatCompletionRequest.build_chat_params`` merge them: the server's
   ``--default-chat-template-kwargs``, then ``tools`` (as vLLM dumps them), then the request's
   ``chat_template_kwargs``, then ``add_generation_prompt``, ``continue_final_message``,
   ``documents``, ``reasoning_effort`` (and ``enable_thinking = reasoning_effort != "none"`` unless
   the request set it). ``None`` and ``"auto"`` never override; the template is the request's
   ``chat_template`` (only with ``--trust-request-chat-template``, as in vLLM; else a 400), else the
   server's ``--chat-template``, else the folder's (named templates:
   ``tool_use`` when tools are given, else ``default``);
3. transformers renders it (``render_jinja_template``: ``tools``/``documents`` always defined,
   ``None`` when absent, the tokenizer's special tokens as variables, ``continue_final_message``
   cutting the text after the last message's content, ``{% generation %}`` blocks rendered as
   their body) and the text is encoded with the request's ``add_special_tokens`` (False).

Anything the template raises is the client's 400, as in vLLM. Models that vLLM renders without
Jinja (Mistral ``tekken.json``/``tokenizer.model.v*``, DeepSeek V3.2/V4, Kimi K3, Inkling, gpt-oss
Harmony) are detected at start-up: the router logs that its keys are approximate and counts every
such render in ``kvrouter_chat_renders_total{result="approximate"}``.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from .chat_messages import (
    ContentFormat,
    MediaNotModeled,
    apply_developer_role,
    detect_content_format,
    normalise_messages,
)
from .config import ConfigError
from .errors import BadRequest

log = logging.getLogger("kvrouter.chat")

# config.json architectures / model types that vLLM 0.32 renders with its own Python encoders
_NON_JINJA_ARCHS = {
    "DeepseekV32ForCausalLM": "DeepSeek V3.2 encoder",
    "DeepseekV4ForCausalLM": "DeepSeek V4 encoder",
    "DeepseekV4ForConditionalGeneration": "DeepSeek V4 encoder",
    "DeepseekV41ForCausalLM": "DeepSeek V4.1 encoder",
    "KimiK3ForConditionalGeneration": "Kimi K3 encoder",
    "InklingForCausalLM": "Inkling encoder",
    "InklingForConditionalGeneration": "Inkling encoder",
    "GptOssForCausalLM": "gpt-oss Harmony renderer",
}
_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_TEMPLATE_CACHE = 32  # compiled request-level templates kept


class _Tool(msgspec.Struct):
    function: dict[str, Any]
    type: str = "function"
    defer_loading: bool | None = None


class ChatOptions(msgspec.Struct):
    """The fields of a chat request (``/v1/chat/completions`` or ``/tokenize``) that shape the prompt."""

    tools: list[_Tool] | None = None
    tool_choice: Any = None
    documents: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False


_options = msgspec.json.Decoder(ChatOptions)


def parse_chat_options(body: bytes) -> ChatOptions:
    try:
        opts = _options.decode(body)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"Invalid request body: {exc}") from None
    if opts.add_generation_prompt and opts.continue_final_message:
        raise BadRequest("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    return opts


def _tool_dict(tool: _Tool) -> dict[str, Any]:
    """A tool as vLLM dumps its pydantic model: unknown keys dropped, ``description`` and
    ``parameters`` always present, ``strict``/``defer_loading`` only when set."""
    f = tool.function
    if not isinstance(f.get("name"), str):
        raise BadRequest("tools[].function.name must be a string", param="tools")
    fn: dict[str, Any] = {
        "name": f["name"],
        "description": f.get("description"),
        "parameters": f.get("parameters"),
    }
    defer = f.get("defer_loading")
    if defer is None:
        defer = tool.defer_loading
    if f.get("strict") is not None:
        fn["strict"] = f["strict"]
    if defer is not None:
        fn["defer_loading"] = defer
    out: dict[str, Any] = {"type": tool.type, "function": fn}
    if tool.defer_loading is not None:
        out["defer_loading"] = tool.defer_loading
    return out


def _merge(defaults: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """vLLM's ``merge_kwargs``: an override of None or "auto" leaves the default."""
    out = dict(defaults or {})
    out.update({k: v for k, v in (overrides or {}).items() if v is not None and v != "auto"})
    return out


def load_template_setting(value: str | None, field: str) -> str | None:
    """``--chat-template`` as vLLM reads it: a file's text, else the value itself as Jinja."""
    if not value:
        return None
    try:
        return Path(value).read_text(encoding="utf-8")
    except OSError:
        if not any(c in value for c in "{}\n"):
            raise ConfigError(field, value, "looks like a file path but cannot be read") from None
    return value


class ChatRenderer:
    """Renders chat requests to text as vLLM 0.32 would for one model folder."""

    def __init__(
        self,
        folder: Path,
        config: Mapping[str, Any],
        *,
        chat_template: str | None = None,
        default_kwargs: Mapping[str, Any] | None = None,
        trust_request_chat_template: bool = False,
        field: str = "routing.tokenizer",
    ) -> None:
        try:
            from jinja2.ext import Extension, loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ConfigError(
                field, str(folder), "chat templates need 'jinja2' (kvrouter[tokenizer])"
            ) from None
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_generation_extension(Extension), loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._env = env
        self.special_tokens = {k: t for k in _SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k)))}
        self.server_template = chat_template
        self.default_kwargs = dict(default_kwargs or {})
        self.trust_request_chat_template = trust_request_chat_template
        self.named = _folder_templates(folder, config)
        self._compiled: OrderedDict[str, tuple[Any, ContentFormat]] = OrderedDict()
        self.approximate = non_jinja_renderer(folder)
        self.renders = {"exact": 0, "approximate": 0, "media_unmodeled": 0, "rejected": 0}
        for text in (chat_template, *self.named.values()):
            if text is not None:
                self._compile(text, field)  # a template that does not parse fails at start-up
        if self.approximate:
            log.warning(
                "%s: vLLM renders this model's chats with the %s, not with a Jinja template; "
                "chat keys come from the folder's template and are approximate "
                '(kvrouter_chat_renders_total{result="approximate"}).',
                folder,
                self.approximate,
            )
        elif not self.has_template:
            log.warning(
                "%s has no chat template and no --chat-template is set: chat requests are keyed by "
                "their bytes, approximate keys no KV event can confirm (kvrouter_chat_render_exact 0).",
                folder,
            )

    @property
    def has_template(self) -> bool:
        return self.server_template is not None or bool(self.named)

    def _resolve(self, request_template: str | None, tools: list[Any] | None) -> str:
        name = request_template or self.server_template
        if name is not None:
            return self.named.get(name, name)
        if tools is not None and "tool_use" in self.named:
            return self.named["tool_use"]
        if "default" in self.named:
            return self.named["default"]
        raise BadRequest("The model has no chat template and the request gives none.", param="chat_template")

    def _compile(self, text: str, field: str = "chat_template") -> tuple[Any, ContentFormat]:
        hit = self._compiled.get(text)
        if hit is not None:
            self._compiled.move_to_end(text)
            return hit
        from jinja2 import TemplateError

        try:
            compiled = (self._env.from_string(text), detect_content_format(text, self._env))
        except TemplateError as exc:
            if field != "chat_template":
                raise ConfigError(field, text[:80], f"chat template does not compile: {exc}") from None
            raise BadRequest(f"The chat template does not compile: {exc}", param="chat_template") from None
        self._compiled[text] = compiled
        if len(self._compiled) > _TEMPLATE_CACHE + len(self.named) + 1:
            self._compiled.popitem(last=False)
        return compiled

    def template_inputs(self, opts: ChatOptions) -> dict[str, Any]:
        """The template variables besides ``messages``, merged in vLLM's order."""
        tools = None if opts.tools is None else [_tool_dict(t) for t in opts.tools]
        request: dict[str, Any] = {
            "add_generation_prompt": opts.add_generation_prompt,
            "continue_final_message": opts.continue_final_message,
            "documents": opts.documents,
            "reasoning_effort": opts.reasoning_effort,
        }
        user = opts.chat_template_kwargs or {}
        if {"chat_template", "tokenize"} & user.keys():
            raise BadRequest(
                "Found unexpected chat template kwargs from request.", param="chat_template_kwargs"
            )
        if opts.reasoning_effort is not None and "enable_thinking" not in user:
            request["enable_thinking"] = opts.reasoning_effort != "none"
        return _merge(_merge(self.default_kwargs, {"tools": tools}), _merge(user, request))

    def render(self, messages: Sequence[Mapping[str, Any]], opts: ChatOptions) -> str:
        """The prompt text; BadRequest when the template refuses; MediaNotModeled for media parts
        under a "string" template."""
        if not self.trust_request_chat_template and (
            opts.chat_template is not None
            or (opts.chat_template_kwargs or {}).get("chat_template") is not None
        ):
            # vLLM's answer without --trust-request-chat-template; the router never runs a client's
            # template on its event loop unless the engines would
            raise BadRequest(
                "Chat template is passed with request, but --trust-request-chat-template is not set. "
                "Refused request with untrusted chat template."
            )
        kwargs = self.template_inputs(opts)
        tools = kwargs.pop("tools", None)
        text = self._resolve(opts.chat_template, tools)
        template, content_format = self._compile(text)
        try:
            conversation = normalise_messages(messages, content_format)
        except MediaNotModeled:
            self.renders["media_unmodeled"] += 1
            raise
        conversation = apply_developer_role(conversation, text)
        documents = kwargs.pop("documents", None)
        agp = bool(kwargs.pop("add_generation_prompt", False))
        cfm = kwargs.pop("continue_final_message", False)
        for consumed in ("tokenize", "return_dict", "padding", "truncation", "max_length", "return_tensors"):
            kwargs.pop(consumed, None)
        try:
            if documents is not None and not all(isinstance(d, dict) for d in documents):
                raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
            rendered = _render(
                template, text, conversation, tools, documents, agp, cfm, {**self.special_tokens, **kwargs}
            )
        except BadRequest:
            raise
        except Exception as exc:  # vLLM answers any template failure with a 400 carrying its reason
            self.renders["rejected"] += 1
            raise BadRequest(
                f"The model's chat template rejected the messages: {exc}", param="messages"
            ) from None
        self.renders["approximate" if self.approximate else "exact"] += 1
        return rendered

    def collect(self) -> Iterator[Any]:
        """Prometheus collector: render outcomes, and whether this model's keys can be exact."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = CounterMetricFamily(
            "kvrouter_chat_renders", "Chat prompts rendered by the router, by result", labels=["result"]
        )
        for result, n in self.renders.items():
            c.add_metric([result], n)
        yield c
        g = GaugeMetricFamily(
            "kvrouter_chat_render_exact",
            "1 when the router renders chats with the engine's own (Jinja) renderer, 0 when approximate",
            labels=["renderer"],
        )
        exact = self.has_template and not self.approximate
        g.add_metric([self.approximate or ("jinja" if self.has_template else "none")], 1 if exact else 0)
        yield g


def _render(
    template: Any,
    text: str,
    conversation: list[dict[str, Any]],
    tools: Any,
    documents: Any,
    add_generation_prompt: bool,
    continue_final: Any,
    variables: dict[str, Any],
) -> str:
    """transformers' ``render_jinja_template`` for one conversation."""
    tag = "CONTINUE_FINAL_MESSAGE_TAG "
    final = ""
    if continue_final:
        if add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible.")
        key = continue_final if isinstance(continue_final, str) else "content"
        conversation = json.loads(json.dumps(conversation))
        last = conversation[-1].get(key)
        if last is None:
            raise ValueError(
                f'continue_final_message is set but the final message has no "{key}" to continue!'
            )
        if key not in text:
            raise ValueError(
                f'continue_final_message is set to "{key}" but this is not a field in the template'
            )
        if isinstance(last, list):
            for block in reversed(last):
                if "text" in block:
                    final = block["text"]
                    block["text"] = final + tag
                    break
            else:
                raise ValueError("continue_final_message is set but there is no text in the final message")
        else:
            final = last
            conversation[-1][key] = last + tag
    out = str(
        template.render(
            messages=conversation,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    )
    if continue_final:
        if final.strip() not in out or tag.strip() not in out:
            raise ValueError("continue_final_message is set but the template drops part of the final message")
        at = out.rindex(tag.strip())
        out = out[:at] if out[at : at + len(tag)] == tag else out[:at].rstrip()
    return out


def _folder_templates(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """The folder's templates by name, as transformers 5 loads them: ``chat_template.jinja`` (the
    default) over ``tokenizer_config.json``'s ``chat_template`` (a string or named list), plus
    ``additional_chat_templates/*.jinja``."""
    named: dict[str, str] = {}
    raw = config.get("chat_template")
    if isinstance(raw, str):
        named["default"] = raw
    elif isinstance(raw, list):
        named.update({t["name"]: t["template"] for t in raw if isinstance(t, dict) and "name" in t})
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        named["default"] = jinja.read_text(encoding="utf-8")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            named[f.stem] = f.read_text(encoding="utf-8")
    return named


def non_jinja_renderer(folder: Path) -> str | None:
    """The renderer vLLM uses instead of the Jinja template for this folder, if any."""
    if (folder / "tekken.json").is_file() or any(folder.glob("tokenizer.model.v*")):
        return "mistral_common tokenizer"
    cfg_file = folder / "config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except ValueError:
            return None
        for arch in cfg.get("architectures") or ():
            if arch in _NON_JINJA_ARCHS:
                return _NON_JINJA_ARCHS[arch]
        if cfg.get("model_type") == "gpt_oss":
            return _NON_JINJA_ARCHS["GptOssForCausalLM"]
    return None


def _generation_extension(base: type) -> type:
    """transformers' ``{% generation %}...{% endgeneration %}`` marks assistant text for training
    masks; rendering only needs its body."""

    class Generation(base):  # type: ignore[misc]
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            from jinja2 import nodes

            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    return Generation


def _raise_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
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
