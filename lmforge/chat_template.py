"""Chat templates: Jinja strings rendered the way Hugging Face transformers renders `chat_template`.

The environment is jinja2's ImmutableSandboxedEnvironment (a template from a downloaded model
cannot reach Python internals), with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension, a `tojson` filter and the globals `raise_exception` and `strftime_now` — the same
settings transformers uses, so the same template gives the same text here and there.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from lmforge.errors import LMForgeError


class TemplateError(LMForgeError):
    """A chat template refused a conversation (its raise_exception) or failed to render."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(template: str) -> Any:
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise LMForgeError(f"chat template has a syntax error on line {e.lineno}: {e.message}") from None


def render(template: str, **variables: Any) -> str:
    import jinja2

    compiled = compile_template(template)
    try:
        return compiled.render(**variables)
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise LMForgeError(f"chat template tried an unsafe operation: {e}") from None
    except jinja2.TemplateError as e:
        raise LMForgeError(f"chat template failed to render: {e}") from None
