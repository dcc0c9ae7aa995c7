"""Bad requests -> OpenAI-style error messages that name the field: pydantic's validation errors turned
into one :class:`~lmforge.serve.schemas.ApiError`, and the UTF-8 check that pydantic cannot make.

The messages follow OpenAI's wording (``Missing required parameter: 'x'``, ``Unrecognized request
parameter``) so that clients written against OpenAI show users something familiar."""

from __future__ import annotations

from typing import Any

from lmforge.serve.schemas import ApiError

_UNION_HINTS = {
    "prompt": "a non-empty string, a list of strings, a list of token ids (integers >= 0) or a list of such lists",
    "stop": "a non-empty string or a list of at most 4 non-empty strings (each at most 256 characters)",
    "content": 'a string or a list of {"type": "text", "text": ...} parts',
}
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part)


def _param(loc: list[Any]) -> str | None:
    """``["messages", 0, "content", "str"]`` -> ``"messages.0.content"`` (up to the first union tag: past it
    the locations differ per union member)."""
    names = []
    for p in loc:
        if _is_type_tag(p):
            break
        names.append(str(p))
    return ".".join(names) or None


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """pydantic / FastAPI errors -> one 400 :class:`ApiError` naming the first bad field."""
    if not errors:
        return ApiError(400, "The request is invalid")
    e = errors[0]
    loc = list(e.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    if e.get("type") == "json_invalid":
        reason = (e.get("ctx") or {}).get("error", "JSON decode error")
        where = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        return ApiError(400, f"The request body is not valid JSON: {reason}{where}", code="invalid_json")
    param = _param(loc)
    unicode = next((x for x in errors if x.get("type") == "string_unicode"), None)
    if unicode is not None:  # a JSON escape of a lone surrogate
        bad_param = _param([p for p in unicode.get("loc", ()) if p != "body"])
        what = f"'{bad_param}'" if bad_param else "a parameter name"
        return ApiError(400, f"Invalid value for {what}: not valid Unicode (a lone surrogate)", param=bad_param)
    if param is None and e.get("type") == "value_error":  # a check across fields (a model validator)
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        return ApiError(400, f"Invalid request: {msg}")
    if param is None:
        return ApiError(400, "The request body must be a JSON object of parameters (Content-Type: application/json)")
    kind = e.get("type", "")
    if kind == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'", param=param)
    if kind == "extra_forbidden":
        return ApiError(400, f"Unrecognized request parameter: '{param}'", param=param)
    union = any(_is_type_tag(p) for p in loc)
    last = next((p for p in reversed(param.split(".")) if not p.isdigit()), param)
    if union and last in _UNION_HINTS:
        return ApiError(400, f"Invalid value for '{param}': expected {_UNION_HINTS[last]}", param=param)
    shown = repr(e.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ApiError(400, f"Invalid value for '{param}' ({shown}): {e.get('msg', 'invalid')}", param=param)


def check_text(text: str, param: str) -> str:
    """A request string must be encodable as UTF-8 (a JSON escape can smuggle in a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(
            400, f"Invalid value for '{param}': not valid Unicode ({err.reason} at character {err.start})", param=param
        ) from None
    return text
