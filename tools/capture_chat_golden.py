"""Record vLLM's token ids for the chat-render golden cases (tests/router/test_chat_render.py).

    PYTHONPATH=. python tools/capture_chat_golden.py http://127.0.0.1:PORT

PORT serves the tools-capable tiny model (engines/vllm/make_tiny_model.py) with
``--served-model-name tiny --trust-request-chat-template
--default-chat-template-kwargs '{"house_rule": "Answer in haiku."}'``. Writes ``expect`` (HTTP status,
and token ids or the error message) into tests/router/golden/chat-render/cases.json and the agent
corpus's ids into golden.json.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "router" / "golden" / "chat-render"
CORPUS = ROOT / "tests" / "integration" / "data" / "agent_conversations.json"


def tokenize(base: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"{base}/tokenize",
        json.dumps({"model": "tiny", **body}).encode(),
        {"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp)["tokens"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)["error"]["message"]


def main() -> None:
    base = sys.argv[1].rstrip("/")
    cases_file = GOLDEN / "cases.json"
    doc = json.loads(cases_file.read_text(encoding="utf-8"))
    for case in doc["cases"]:
        status, out = tokenize(base, case["body"])
        case["expect"] = {"status": status, "token_ids" if status == 200 else "error": out}
    cases_file.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    turns = []
    for conv in json.loads(CORPUS.read_text(encoding="utf-8"))["conversations"]:
        for i, messages in enumerate(conv["turns"]):
            body: dict[str, Any] = {"messages": messages}
            if conv["tools"] is not None:
                body["tools"] = conv["tools"]
            status, out = tokenize(base, body)
            if status != 200:
                raise SystemExit(f"{conv['name']} turn {i}: vLLM answered {status}: {out}")
            turns.append({"conversation": conv["name"], "turn": i, "token_ids": out})
    (GOLDEN / "golden.json").write_text(json.dumps({"turns": turns}) + "\n", encoding="utf-8")
    print(f"{len(doc['cases'])} cases, {len(turns)} corpus turns captured from {base}")


if __name__ == "__main__":
    main()
