"""Chat messages -> one prompt string: the model's Jinja chat template (as in Hugging Face) or the plain one.

A model directory's template is ``chat_template.jinja`` or the ``chat_template`` of ``tokenizer_config.json``;
without one the plain template (see :data:`PLAIN_CHAT_HELP`) is used, and its turn markers become stop
strings so that a reply ends where the model starts the next turn. jinja2 is imported only when a template
is given: the plain template needs nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.config import LmforgeError
from lmforge.serve.schemas import ApiError

PLAIN_CHAT_HELP = """\
The plain chat template: each message as "<|ROLE|>\\nCONTENT\\n" (ROLE: system, user or assistant;
"developer" is shown as system), then "<|assistant|>\\n" for the reply. The reply also stops at
"\\n<|user|>" and "\\n<|system|>" (the start of a next turn)."""
PLAIN_CHAT_STOP = ["\n<|user|>", "\n<|system|>"]


class ChatTemplate:
    """Renders chat messages into one prompt string (a Jinja template, or the plain one)."""

    def __init__(self, source: str | None = None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.stop: list[str] = [] if source else list(PLAIN_CHAT_STOP)
        self._template: Any = None
        self._extra = {"bos_token": bos_token, "eos_token": eos_token}
        if source:
            try:
                from jinja2 import TemplateError
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError as err:
                raise LmforgeError(f"the model's chat template needs jinja2 (pip install jinja2): {err}") from None

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            try:
                self._template = env.from_string(source)
            except TemplateError as err:
                raise LmforgeError(f"the chat template does not compile: {err}") from None

    def render(self, messages: list[dict[str, str]]) -> str:
        if self._template is None:
            parts = []
            for m in messages:
                role = "system" if m["role"] == "developer" else m["role"]
                parts.append(f"<|{role}|>\n{m['content']}\n")
            return "".join(parts) + "<|assistant|>\n"
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self._extra)
        except TemplateError as err:
            raise ApiError(400, f"The model's chat template refused the messages: {err}", param="messages") from None


def find_chat_template(*folders: str | Path | None) -> str | None:
    """The chat template in the first folder that has one: ``chat_template.jinja`` or the ``chat_template``
    of ``tokenizer_config.json`` (a string, or a list of named templates of which ``default`` is used)."""
    for folder in folders:
        if folder is None:
            continue
        d = Path(folder)
        d = d if d.is_dir() else d.parent
        if (d / "chat_template.jinja").is_file():
            return (d / "chat_template.jinja").read_text(encoding="utf-8")
        try:
            cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        tpl = cfg.get("chat_template") if isinstance(cfg, dict) else None
        if isinstance(tpl, list):
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default")
        if isinstance(tpl, str) and tpl.strip():
            return tpl
    return None
