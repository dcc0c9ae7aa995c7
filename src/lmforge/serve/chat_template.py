"""Chat messages -> one prompt string: the model's Jinja chat template (as in Hugging Face) or the plain one.

A model directory's template is ``chat_template.jinja`` or the ``chat_template`` of ``tokenizer_config.json``
(for a checkpoint of a fine-tuned run, also of its run directory: a ``--task chat`` fine-tune writes its
trained format there, see :mod:`lmforge.data.chat_template`); without one the plain template (see :data:`PLAIN_CHAT_HELP`) is used, and its turn markers become stop
strings so that a reply ends where the model starts the next turn. jinja2 is imported only when a template
is given: the plain template needs nothing.

A template is code from the model's folder: it runs in Jinja's immutable sandbox, in a daemon thread under a
time limit, so that a template that loops for ever can neither freeze the event loop nor keep the process
from exiting. Past the limit the request gets an error and the render is told to stop: every loop over
``range``, call, attribute and item lookup of the template checks that flag, so a runaway render ends soon
after (a thread cannot be killed from outside)."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmforge.config import LmforgeError
from lmforge.runs.task_file import task_file_path
from lmforge.serve.schemas import ApiError

PLAIN_CHAT_HELP = """\
The plain chat template: each message as "<|ROLE|>\\nCONTENT\\n" (ROLE: system, user or assistant;
"developer" is shown as system), then "<|assistant|>\\n" for the reply. The reply also stops at
"\\n<|user|>" and "\\n<|system|>" (the start of a next turn)."""
PLAIN_CHAT_STOP = ["\n<|user|>", "\n<|system|>"]

_render = threading.local()
"""The render thread's stop flag (``_render.abort``, a threading.Event)."""


class RenderAborted(Exception):
    """Raised inside a template render once its time limit has passed."""


def _check_abort() -> None:
    abort = getattr(_render, "abort", None)
    if abort is not None and abort.is_set():
        raise RenderAborted


class _AbortableRange:
    """The sandbox's ``range`` (at most MAX_RANGE items) whose iteration stops once the render is aborted."""

    def __init__(self, rng: range) -> None:
        self.rng = rng

    def __iter__(self) -> Iterator[int]:
        for i in self.rng:
            _check_abort()
            yield i

    def __len__(self) -> int:
        return len(self.rng)

    def __getitem__(self, index: Any) -> Any:
        return self.rng[index]

    def __contains__(self, value: object) -> bool:
        return value in self.rng

    def __reversed__(self) -> Iterator[int]:
        return iter(_AbortableRange(self.rng[::-1]))


def _checked(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_abort()
        return method(*args, **kwargs)

    return wrapper


class ChatTemplate:
    """Renders chat messages into one prompt string (a Jinja template, or the plain one); a Jinja render
    may take at most ``time_limit`` seconds."""

    def __init__(
        self, source: str | None = None, *, bos_token: str = "", eos_token: str = "", time_limit: float = 5.0
    ) -> None:
        self.source = source
        self.time_limit = time_limit
        self.stop: list[str] = [] if source else list(PLAIN_CHAT_STOP)
        self._template: Any = None
        self._extra = {"bos_token": bos_token, "eos_token": eos_token}
        if source:
            try:
                from jinja2 import TemplateError
                from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
            except ImportError as err:
                raise LmforgeError(f"the model's chat template needs jinja2 (pip install jinja2): {err}") from None

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.globals["range"] = lambda *args: _AbortableRange(safe_range(*args))
            for name in ("call", "getattr", "getitem"):  # the sandbox's hooks: each checks the stop flag first
                setattr(env, name, _checked(getattr(env, name)))
            try:
                self._template = env.from_string(source)
            except TemplateError as err:
                raise LmforgeError(f"the chat template does not compile: {err}") from None

    async def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt of ``messages``; a Jinja template renders in its own daemon thread (see the module)."""
        if self._template is None:
            parts = []
            for m in messages:
                role = "system" if m["role"] == "developer" else m["role"]
                parts.append(f"<|{role}|>\n{m['content']}\n")
            return "".join(parts) + "<|assistant|>\n"
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()
        abort = threading.Event()

        def settle(result: str | None, err: BaseException | None) -> None:
            if done.done():
                return
            if err is not None:
                done.set_exception(err)
            else:
                done.set_result(result or "")

        def work() -> None:
            _render.abort = abort
            try:
                text = self._template.render(messages=messages, add_generation_prompt=True, **self._extra)
            except BaseException as err:  # handed to the request, whatever it is
                result: tuple[str | None, BaseException | None] = (None, err)
            else:
                result = (str(text), None)
            try:
                loop.call_soon_threadsafe(settle, *result)
            except RuntimeError:  # the event loop has closed (the server stopped)
                pass

        threading.Thread(target=work, name="lmforge-chat-template", daemon=True).start()
        try:
            await asyncio.wait({done}, timeout=self.time_limit)
        finally:
            if not done.done():
                abort.set()
                done.cancel()
        if done.cancelled():
            raise ApiError(
                500,
                f"The model's chat template did not finish rendering within {self.time_limit:g} s "
                "(--template-timeout); the template is at fault",
                type="server_error",
                code="chat_template_timeout",
            )
        from jinja2 import TemplateError

        err = done.exception()
        if isinstance(err, TemplateError):
            raise ApiError(400, f"The model's chat template refused the messages: {err}", param="messages")
        if err is not None:  # e.g. the sandbox's OverflowError for a range over 100,000 items
            raise ApiError(
                400, f"The model's chat template failed: {type(err).__name__}: {err}", param="messages"
            ) from None
        return done.result()


def find_chat_template(*folders: str | Path | None) -> str | None:
    """The chat template in the first folder that has one: ``chat_template.jinja`` or the ``chat_template``
    of ``tokenizer_config.json`` (a string, or a list of named templates of which ``default`` is used).
    A checkpoint of a fine-tuned run (``OUT/best``, ``OUT/checkpoints/step-N``) is followed by its run
    directory ``OUT`` (the one holding ``task.json``), where ``--task chat`` writes the template it trained
    (:func:`lmforge.data.chat_template.write_chat_template`)."""
    for folder in folders:
        if folder is None:
            continue
        d = Path(folder)
        d = d if d.is_dir() else d.parent
        task_file = task_file_path(d)
        places = [d] + ([task_file.parent] if task_file is not None and task_file.parent != d else [])
        for place in places:
            tpl = _template_in(place)
            if tpl is not None:
                return tpl
    return None


def _template_in(d: Path) -> str | None:
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    tpl = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) and tpl.strip() else None
