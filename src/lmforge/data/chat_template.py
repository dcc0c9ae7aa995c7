"""lmforge's chat training format as a Hugging Face chat template (Jinja), written next to a chat model.

A chat fine-tune (``--task chat``) learns the format of :func:`lmforge.data.tasks.chat_segments`:
``System: ..\\n``, ``User: ..\\n``, ``Assistant: ..<eot>\\n``, and ``Assistant:`` for the reply to come.
:data:`CHAT_TEMPLATE` renders exactly that text (``<eot>`` as the ``eos_token`` the renderer passes,
which the tokenizer encodes back to its end-of-text id), so ``lmforge serve`` and ``transformers``'
``apply_chat_template`` build the prompt the model was trained on. The template is generated from
:data:`lmforge.data.tasks.CHAT_ROLES`, so the two cannot drift apart; OpenAI's ``developer`` role is shown
as ``System`` and any other role is refused.

:func:`write_chat_template` stores it as ``chat_template`` in ``tokenizer_config.json`` (Hugging Face's
place for it), keeping the file's other fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_json, read_json_object
from lmforge.data.tasks import CHAT_ROLES, TaskDataError

TOKENIZER_CONFIG = "tokenizer_config.json"
ROLE_ALIASES = {"developer": "system"}
"""Roles of the OpenAI API shown as one of :data:`CHAT_ROLES`."""


def _literal(text: str) -> str:
    """``text`` as a Jinja string literal (JSON's escapes are also Jinja's)."""
    return json.dumps(text)


def _build_template() -> str:
    branches = []
    for role, head in CHAT_ROLES.items():
        names = [role, *(alias for alias, target in ROLE_ALIASES.items() if target == role)]
        test = " or ".join(f"message['role'] == {_literal(n)}" for n in names)
        if role == "assistant":
            body = f"{_literal(head + ': ')} + message['content'] + eos_token + {_literal(chr(10))}"
        else:
            body = f"{_literal(head + ': ')} + message['content'] + {_literal(chr(10))}"
        branches.append((test, body))
    parts = ["{%- for message in messages -%}"]
    for i, (test, body) in enumerate(branches):
        parts.append(("{%- if " if i == 0 else "{%- elif ") + test + " -%}")
        parts.append("{{- " + body + " -}}")
    parts.append("{%- else -%}")
    parts.append("{{- raise_exception('lmforge chat: unknown role ' + message['role']) -}}")
    parts.append("{%- endif -%}")
    parts.append("{%- endfor -%}")
    parts.append("{%- if add_generation_prompt -%}{{- " + _literal(CHAT_ROLES["assistant"] + ":") + " -}}{%- endif -%}")
    return "".join(parts)


CHAT_TEMPLATE = _build_template()
"""The Jinja chat template of lmforge's chat format (one line; whitespace control makes it independent of
``trim_blocks``/``lstrip_blocks``)."""


def write_chat_template(model_dir: Path) -> None:
    """Set ``chat_template`` in ``model_dir/tokenizer_config.json`` to :data:`CHAT_TEMPLATE` (creating the
    file, or keeping its other fields)."""
    path = Path(model_dir) / TOKENIZER_CONFIG
    config: dict[str, Any] = {}
    if path.is_file():
        config = read_json_object(path, TaskDataError)
    config["chat_template"] = CHAT_TEMPLATE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, config)
