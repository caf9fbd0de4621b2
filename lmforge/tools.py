"""Tools a chat model may call: their JSON schemas (OpenAI's function format), read from a Python
function's type hints and docstring as transformers' `get_json_schema` reads them, the schema of
the calls a request allows (for constrained decoding), and a check of a call's arguments.

A tool is {"type": "function", "function": {"name", "description", "parameters": JSON Schema}};
`tool_schemas` accepts those or plain functions with type hints and a Google-style docstring:

    def count(word: str, words: list[str]) -> int:
        '''How many times a word occurs in a list.

        Args:
            word: The word to count.
            words: The list to count it in.
        '''
"""

from __future__ import annotations

import inspect
import json
import re
import types
from enum import Enum
from typing import Any, Callable, Literal, Union, get_args, get_origin, get_type_hints

from lmforge.errors import LMForgeError

# The same docstring grammar as transformers.utils.chat_template_utils (Google style).
_DESCRIPTION = re.compile(r"^(.*?)[\n\s]*(Args:|Returns:|Raises:|\Z)", re.DOTALL)
_ARGS = re.compile(r"\n\s*Args:\n(.*?)[\n\s]*(Returns:|Raises:|\Z)", re.DOTALL)
_ARG_SPLIT = re.compile(r"""
(?:^|\n)
([ \t]*)(\w+)(?:[ \t]*\([^()\n]*\))?:\s*
(.*?)\s*
(?=\n(?!\1[ \t])[ \t]*\w+(?:[ \t]*\([^()\n]*\))?:|\Z)
""", re.DOTALL | re.VERBOSE)
_RETURNS = re.compile(r"\n\s*Returns:\n\s*(.*?)[\n\s]*(Raises:|\Z)", re.DOTALL)
_CHOICES = re.compile(r"\(choices:\s*(.*?)\)\s*$", re.IGNORECASE)

_JSON_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
_BASIC = {int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"}, bool: {"type": "boolean"},
          type(None): {"type": "null"}, list: {"type": "array"}, tuple: {"type": "array"}, dict: {"type": "object"},
          Any: {}}


def _enum(values: list) -> dict:
    kinds = list(dict.fromkeys(_JSON_SCALARS[type(v)] for v in values))
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


def _hint_schema(hint: Any, where: str) -> dict:
    """The JSON schema of one type hint."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is None and isinstance(hint, type) and issubclass(hint, Enum):
        values = [m.value for m in hint]
        if not values or any(type(v) not in _JSON_SCALARS for v in values):
            raise LMForgeError(f"{where}: the Enum {hint.__name__} needs members with int, float, str, bool or None "
                               "values to become a JSON schema")
        return _enum(values)
    if origin is None:
        if hint not in _BASIC:
            raise LMForgeError(f"{where}: the type hint {hint!r} has no JSON schema (use int, float, str, bool, "
                               "Enum, Literal, list, tuple, dict or a Union of them, or give the tool as a schema)")
        return dict(_BASIC[hint])
    if origin is Union or origin is types.UnionType:
        subs = [_hint_schema(t, where) for t in args if t is not type(None)]
        if len(subs) == 1:
            out = subs[0]
        elif all(s.keys() == {"type"} and isinstance(s["type"], str) for s in subs):
            names = sorted({s["type"] for s in subs})
            out = {"type": names[0] if len(names) == 1 else names}
        else:
            out = {"anyOf": subs}
        if type(None) in args:
            out["nullable"] = True
        return out
    if origin is Literal and args:
        if any(type(a) not in _JSON_SCALARS for a in args):
            raise LMForgeError(f"{where}: Literal values must be int, float, str, bool or None")
        return _enum(list(args))
    if origin is list:
        return {"type": "array", "items": _hint_schema(args[0], where)} if args else {"type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 1 or ... in args:
            raise LMForgeError(f"{where}: use list[...] rather than {hint!r} for a variable-length argument")
        return {"type": "array", "prefixItems": [_hint_schema(t, where) for t in args]}
    if origin is dict:
        out = {"type": "object"}
        if len(args) == 2:
            out["additionalProperties"] = _hint_schema(args[1], where)
        return out
    raise LMForgeError(f"{where}: the type hint {hint!r} has no JSON schema")


def function_schema(func: Callable) -> dict:
    """The tool schema of a Python function (transformers' `get_json_schema`): the docstring's first
    part is the description, its Args: block describes each parameter (a trailing `(choices: [...])`
    becomes an enum), the type hints give the types; parameters without a default are required."""
    name = getattr(func, "__name__", "operation")
    doc = inspect.getdoc(func)
    if not doc:
        raise LMForgeError(f"tool {name}: a function given as a tool needs a docstring (its description)")
    doc = doc.strip()
    m = _DESCRIPTION.search(doc)
    description = m.group(1).strip() if m else None
    m = _ARGS.search(doc)
    arg_docs = {}
    if m:
        block = "\n".join(line for line in m.group(1).split("\n") if line.strip())
        arg_docs = {a[1]: re.sub(r"\s*\n+\s*", " ", a[2].strip()) for a in _ARG_SPLIT.findall(block)}
    m = _RETURNS.search(doc)
    returns_doc = m.group(1).strip() if m else None

    hints = get_type_hints(func)
    sig = inspect.signature(func)
    first = next(iter(sig.parameters), None)
    receiver = first if first in {"self", "cls"} and sig.parameters[first].annotation == inspect.Parameter.empty \
        else None
    required = []
    for pname, p in sig.parameters.items():
        if pname == receiver:
            continue
        if p.annotation == inspect.Parameter.empty:
            raise LMForgeError(f"tool {name}: argument {pname} has no type hint")
        if p.default == inspect.Parameter.empty:
            required.append(pname)
    properties: dict[str, Any] = {}
    returns = None
    for pname, hint in hints.items():
        if pname == receiver:
            continue
        if pname == "return":
            try:  # the model never writes the return value: a hint without a schema is left out
                returns = _hint_schema(hint, f"tool {name}")
            except LMForgeError:
                pass
        elif pname in sig.parameters:
            properties[pname] = _hint_schema(hint, f"tool {name}, argument {pname}")
    for pname, schema in properties.items():
        if pname not in arg_docs:
            raise LMForgeError(f"tool {name}: the docstring's Args: block does not describe the argument '{pname}'")
        desc = arg_docs[pname]
        choices = _CHOICES.search(desc)
        if choices:
            schema["enum"] = [c.strip() if isinstance(c, str) else c for c in json.loads(choices.group(1))]
            desc = desc[:choices.start()].strip()
        schema["description"] = desc
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    out: dict[str, Any] = {"name": name, "description": description, "parameters": parameters}
    if returns is not None:
        if returns_doc is not None:
            returns["description"] = returns_doc
        out["return"] = returns
    return {"type": "function", "function": out}


def tool_schemas(tools: Any) -> list[dict] | None:
    """Tools as schemas: dicts are kept as they are, functions (and methods) are converted."""
    if tools is None:
        return None
    if isinstance(tools, dict) or not isinstance(tools, (list, tuple)):
        raise LMForgeError("tools must be a list of tool schemas or functions")
    out = []
    for i, tool in enumerate(tools):
        if isinstance(tool, dict):
            out.append(tool)
        elif inspect.isfunction(tool) or inspect.ismethod(tool):
            out.append(function_schema(tool))
        else:
            raise LMForgeError(f"tools[{i}] must be a JSON schema (a dict) or a function with type hints and a "
                               f"docstring, got {type(tool).__name__}")
    return out


def tool_name(tool: dict) -> str | None:
    """The name of a tool schema (OpenAI's {"type": "function", "function": {...}} or a bare function)."""
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) else None


def tool_parameters(tool: dict) -> dict:
    fn = tool.get("function", tool)
    params = fn.get("parameters") if isinstance(fn, dict) else None
    return params if isinstance(params, dict) and params else {"type": "object", "properties": {}}


def tool_call_schema(tools: list[dict], tool_choice: Any, parallel_tool_calls: bool = True) -> dict:
    """The JSON schema a constrained reply must follow when `tool_choice` forces a call (as vLLM
    constrains it): "required" -> a non-empty array of {"name": one of the tools, "parameters": its
    arguments} (at most one item without parallel calls); a named function ({"type": "function",
    "function": {"name": N}}) -> the arguments object of N alone. `lmforge.tool_parser.parse_forced_calls`
    reads the reply back."""
    if tool_choice == "required":
        items = [{"properties": {"name": {"type": "string", "enum": [tool_name(t)]},
                                 "parameters": tool_parameters(t)},
                  "required": ["name", "parameters"]} for t in tools]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
        if not parallel_tool_calls:
            schema["maxItems"] = 1
        return schema
    name = named_choice(tool_choice)
    if name is None:
        raise LMForgeError(f"tool_choice {json.dumps(tool_choice)} does not force a call ('required' or a named "
                           "function)")
    for t in tools:
        if tool_name(t) == name:
            return tool_parameters(t)
    raise LMForgeError(f"tool_choice names the function '{name}', which is not among the tools")


def named_choice(tool_choice: Any) -> str | None:
    """The function a tool_choice {"type": "function", "function": {"name": N}} names (None otherwise)."""
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        fn = tool_choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return fn["name"]
    return None


_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict,
          "null": type(None)}


def argument_error(tools: list[dict], name: str, arguments: Any) -> str | None:
    """Why a call of `name` with `arguments` (a dict) does not fit the tools (None when it does):
    an unknown tool, a missing required argument, an argument not in the schema, or a top-level
    value of the wrong JSON type or outside its enum."""
    tool = next((t for t in tools if tool_name(t) == name), None)
    if tool is None:
        return f"unknown tool '{name}'"
    if not isinstance(arguments, dict):
        return f"the arguments of {name} are not a JSON object"
    params = tool_parameters(tool)
    props = params.get("properties") or {}
    for req in params.get("required") or []:
        if req not in arguments:
            return f"{name} misses the argument '{req}'"
    for key, value in arguments.items():
        if key not in props:
            if params.get("additionalProperties", True) is False or props:
                return f"{name} has no argument '{key}'"
            continue
        spec = props[key]
        kinds = spec.get("type")
        if kinds is not None:
            allowed = tuple(_TYPES[k] for k in ([kinds] if isinstance(kinds, str) else kinds) if k in _TYPES)
            wrong_bool = isinstance(value, bool) and bool not in allowed
            if allowed and (not isinstance(value, allowed) or wrong_bool):
                return f"{name}'s argument '{key}' should be {kinds}, got {json.dumps(value)}"
        if "enum" in spec and value not in spec["enum"]:
            return f"{name}'s argument '{key}' should be one of {json.dumps(spec['enum'])}"
    return None
