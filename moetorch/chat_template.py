"""Chat templates as Transformers 5 renders them: jinja2's immutable sandbox with Transformers'
globals and filters, `{% generation %}` blocks (the assistant masks), messages rebuilt of plain
data with their reasoning fields aliased, `continue_final_message`'s cut, the control tokens that
`sanitize_control_tokens` encodes as text, and `get_json_schema` for Python functions as tools.
`Tokenizer.apply_chat_template` (moetorch.tokenizer) drives them."""

from __future__ import annotations

import contextvars
import dataclasses
import enum
import functools
import inspect
import json
import logging
import re
import types
import typing
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .tokenizer import BatchEncoding

logger = logging.getLogger("moetorch.tokenizer")

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def render_chat(
    template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, continue_final_message: bool | str,
    variables: dict[str, Any], spans: list | None = None,
) -> str:
    """Render one chat as Transformers 5 does: the messages rebuilt of plain data (`plain_data`), their
    reasoning fields aliased, then rendered with `variables`. With `continue_final_message` (True:
    the final message's "content", or a field's name) the text is cut right after that content:
    the content (or its last text block) is marked with a tag, and the text is cut at the tag's
    last place (whitespace before it dropped when the template trimmed the content). With `spans`
    (a list), the chat's {% generation %} spans (character (start, end) pairs) are appended to it."""
    messages = [_alias_reasoning(m) for m in plain_data(list(messages))]  # (dicts: apply_chat_template checks)
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        last = messages[-1]
        final = last.get(field)
        if final is None:
            raise ValueError(f"continue_final_message: the final message has no {field!r} to continue")
        # the reasoning is there under several names: each copy is tagged, whichever the template reads
        fields = [f for f in _REASONING_FIELDS if last.get(f) == final] if field in _REASONING_FIELDS else [field]
        if not any(f in template for f in fields):
            raise ValueError(f"continue_final_message: the chat template does not read the messages' {field!r}")
        if isinstance(final, (list, tuple)):
            block = next((b for b in reversed(final) if isinstance(b, dict) and "text" in b), None)
            if block is None:
                raise ValueError("continue_final_message: the final message has no text block to continue")
            final, block["text"] = block["text"], block["text"] + _CONTINUE_TAG
        elif isinstance(final, str):
            for f in fields:
                last[f] = last[f] + _CONTINUE_TAG
        else:
            raise ValueError(f"continue_final_message: the final message's {field!r} must be a string or a list "
                             f"of text blocks, got {type(final).__name__}")
    compiled = compile_template(template)
    variables = dict(variables, messages=messages, add_generation_prompt=add_generation_prompt)
    if spans is None:
        text = compiled.render(**variables)
    else:  # the generation blocks' spans, at the length rendered so far when each is rendered
        state: list = [0, []]
        reset = _GENERATION_SPANS.set(state)
        try:
            parts = []
            for part in compiled.generate(**variables):
                parts.append(part)
                state[0] += len(part)
        finally:
            _GENERATION_SPANS.reset(reset)
        text = "".join(parts)
        spans.append(state[1])
    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ValueError("continue_final_message: the final message's content is not in the rendered chat "
                             "(the chat template dropped part of it)")
        at = text.rindex(tag)
        text = text[:at] if text.startswith(_CONTINUE_TAG, at) else text[:at].rstrip()
    return text


# The names a message's reasoning goes by; templates read the first (gpt-oss's, "thinking")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# While apply_chat_template tracks {% generation %} blocks: [characters rendered so far, spans]
_GENERATION_SPANS: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "moetorch_generation_spans", default=None)
# Private-use characters marking the control tokens typed in the inputs (sanitize_control_tokens)
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    # the first reasoning field set, as `reasoning_content` and (where unset) `thinking`, as Transformers
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


def plain_data(value: Any) -> Any:
    """`value` rebuilt of plain data, as Transformers rebuilds what a template sees (the sandbox
    does not know other objects' methods): str, int and float subclasses as those, mappings as
    dicts, lists, tuples, numpy scalars, dataclasses and pydantic models (as dicts); anything else
    a "<TypeName>" placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):
        if isinstance(value, base):
            return getattr(base, f"__{base.__name__}__")(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if isinstance(value, np.generic):
        return plain_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def tool_schema(tool: Any) -> dict[str, Any]:
    # a tool as the template gets it: a dict as it is, a function's schema from get_json_schema
    if isinstance(tool, dict):
        return tool
    if inspect.isfunction(tool) or inspect.ismethod(tool):
        return get_json_schema(tool)
    raise ValueError(f"apply_chat_template: tools must be JSON schemas (dicts) or functions with type hints and a "
                     f"docstring (get_json_schema), got {tool!r}")


def assistant_masks(out: BatchEncoding, spans: list, batched: bool, return_tensors: str | None):
    """1 on each token holding a character of a {% generation %} span, as Transformers maps the
    spans: from the token of the span's first character to that of its last (to the row's end
    where that one is cut off); a span whose first character is cut off ends the row's spans."""
    rows = out["input_ids"] if batched or return_tensors else [out["input_ids"]]
    masks = []
    for i, row in enumerate(rows):
        mask = [0] * len(row)
        encoding = out.encodings[i]
        for start, end in spans[i]:
            first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
            if first is None:
                break
            for t in range(first, last + 1 if last else len(row)):  # (a last token 0 reads as cut off)
                mask[t] = 1
        masks.append(mask)
    if return_tensors:
        return torch.tensor(masks) if return_tensors == "pt" else np.asarray(masks)
    return masks if batched else masks[0]


@functools.cache
def warn_once(message: str) -> None:
    logger.warning(message)


@functools.cache
def token_patterns(tokens: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    # a regex of `tokens` (longest first), and one of a marked token (its group) or a lone marker
    any_token = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) or "(?!)"
    return re.compile(any_token), re.compile(f"{_MARK_START}({any_token}){_MARK_END}|[{_MARK_START}{_MARK_END}]")


def mark_control_tokens(value: Any, pattern: re.Pattern) -> Any:
    """`value` (a string, or lists and dicts of them: messages, tools, documents, template
    variables) with each control token in its strings wrapped in private-use markers, and markers
    already there dropped; dict keys are left as they are, tuples become lists."""
    if isinstance(value, str):
        value = value.replace(_MARK_START, "").replace(_MARK_END, "")
        return pattern.sub(lambda m: _MARK_START + m.group(0) + _MARK_END, value)
    if isinstance(value, dict):
        return {k: mark_control_tokens(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mark_control_tokens(v, pattern) for v in value]
    return value


@functools.cache
def template_literals(template: str) -> str:
    # the template's literal text and string constants, joined by NULs (so no token spans two of them)
    import jinja2.nodes

    tree = compile_template(template).environment.parse(template)
    strings = {n.data for n in tree.find_all(jinja2.nodes.TemplateData)}
    strings |= {n.value for n in tree.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    return "\0".join(strings)


@functools.lru_cache(maxsize=1)
def _environment():
    """Transformers' chat-template environment: jinja2's ImmutableSandboxedEnvironment (3.1.6 or
    later) with trim_blocks, lstrip_blocks, loop controls and {% generation %}; tojson without
    HTML escaping, raise_exception, strftime_now, a `dict` with no attributes but fromkeys, and a
    namespace() that refuses underscore-prefixed names."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from packaging.version import Version

    if Version(jinja2.__version__) < Version("3.1.6"):  # older ones have known sandbox escapes
        raise ImportError(f"chat templates need jinja2>=3.1.6 (its sandbox), got {jinja2.__version__}: "
                          f"pip install -U jinja2")

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %}: the body, its span recorded while tracked."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_span"), [], [], body).set_lineno(lineno)

        def _span(self, caller) -> str:
            text, state = caller(), _GENERATION_SPANS.get()
            if state is not None:
                state[1].append((state[0], state[0] + len(text)))
            return text

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template's namespace cannot hold the underscore-prefixed "
                                                  f"name {name!r}")

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # (no `self` name, so that namespace(self=...) works, as jinja's)
            attrs = dict(*args[1:], **kwargs)
            for name in attrs:
                check_name(name)
            jinja2.utils.Namespace.__init__(args[0], attrs)

        def __setitem__(self, name, value):
            check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=TemplateDict(), namespace=Namespace)
    return env


_TEMPLATES: dict[str, Any] = {}


def compile_template(template: str):
    if template not in _TEMPLATES:
        import jinja2

        try:
            _TEMPLATES[template] = _environment().from_string(template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"chat_template is not a valid jinja template: {e}") from e
    return _TEMPLATES[template]


# ---- tools as JSON schemas ----------------------------------------------------------------------
class TypeHintParsingException(ValueError):
    """A tool function's type hint has no JSON schema (get_json_schema)."""


class DocstringParsingException(ValueError):
    """A tool function's docstring lacks its description or an argument's (get_json_schema)."""


# Google-style docstrings: the description (up to the first section), the Args section (up to
# Returns: or Raises:), its "name: description" entries (a deeper-indented line continues one),
# the Returns section, and an argument's trailing "(choices: [...])"
_DOC_SECTION = re.compile(r"Args:|Returns:|Raises:")
_DOC_ARGS = re.compile(r"\n\s*Args:\n(.*?)\s*(?:Returns:|Raises:|\Z)", re.DOTALL)
_DOC_ARG = re.compile(r"(?:^|\n)([ \t]*)(\w+):\s*(.*?)\s*(?=\n(?!\1[ \t])[ \t]*\w+:|\Z)", re.DOTALL)
_DOC_RETURNS = re.compile(r"\n\s*Returns:\n\s*(.*?)\s*(?:Raises:|\Z)", re.DOTALL)
_DOC_CHOICES = re.compile(r"\(choices:\s*(.*?)\)\s*$", re.IGNORECASE)
_JSON_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}


def get_json_schema(func: Callable) -> dict[str, Any]:
    """The JSON schema of a tool function, as Transformers' `get_json_schema` builds it (what
    apply_chat_template(tools=[func]) renders): the name, the Google-style docstring's description,
    each argument's JSON type (from its type hint) and description (from the Args section; a
    trailing "(choices: [...])" as an enum), the required ones (no default), and the return's type
    and description where they convert. A missing docstring or argument description raises
    DocstringParsingException, an argument without a type hint or with one of no JSON type
    TypeHintParsingException (a `self` / `cls` without one is skipped)."""
    name = getattr(func, "__name__", "operation")
    doc = (inspect.getdoc(func) or "").strip()
    if not doc:
        raise DocstringParsingException(f"get_json_schema: {name} has no docstring to describe it")
    section = _DOC_SECTION.search(doc)
    description = doc[:section.start() if section else len(doc)].strip()
    args = _DOC_ARGS.search(doc)
    block = "\n".join(line for line in args.group(1).split("\n") if line.strip()) if args else ""
    arg_docs = {m[1]: re.sub(r"\s*\n+\s*", " ", m[2].strip()) for m in _DOC_ARG.findall(block)}
    returns = _DOC_RETURNS.search(doc)
    params = inspect.signature(func).parameters
    first = next(iter(params), None)
    receiver = first if first in ("self", "cls") and params[first].annotation is inspect.Parameter.empty else None
    required = []
    for p in params.values():
        if p.name == receiver:
            continue
        if p.annotation is inspect.Parameter.empty:
            raise TypeHintParsingException(f"get_json_schema: argument {p.name!r} of {name} has no type hint")
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    properties, result = {}, None
    for arg, hint in typing.get_type_hints(func).items():
        if arg == receiver:
            continue
        if arg != "return":
            properties[arg] = _hint_schema(hint)
            continue
        try:  # the model never writes the return value: one of no JSON type is left out
            result = _hint_schema(hint)
        except TypeHintParsingException:
            pass
    for arg, schema in properties.items():
        if arg not in arg_docs:
            raise DocstringParsingException(f"get_json_schema: {name}'s docstring has no description of its "
                                            f"argument {arg!r} (an Args: section line '{arg}: ...')")
        text = arg_docs[arg]
        choices = _DOC_CHOICES.search(text)
        if choices:
            schema["enum"] = [c.strip() if isinstance(c, str) else c for c in json.loads(choices.group(1))]
            text = text[:choices.start()].strip()
        schema["description"] = text
    parameters = {"type": "object", "properties": properties, **({"required": required} if required else {})}
    function = {"name": name, "description": description, "parameters": parameters}
    if result is not None:
        function["return"] = {**result, **({"description": returns.group(1).strip()} if returns else {})}
    return {"type": "function", "function": function}


def _enum_schema(values: list) -> dict[str, Any]:
    # a JSON enum; its type: each JSON type of the values, once, in their order (one: a string)
    kinds = list(dict.fromkeys(_JSON_SCALARS[type(v)] for v in values))
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


def _hint_schema(hint: Any) -> dict[str, Any]:
    """The JSON schema of a type hint, as Transformers maps them: int, float, str, bool, None,
    Any, list / tuple / dict (with their item types), Union / Optional (nullable), Literal and Enum
    (enums), a PIL image ("image") and a torch tensor ("audio")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is None:
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            values = [member.value for member in hint]
            if not values or any(type(v) not in _JSON_SCALARS for v in values):
                raise TypeHintParsingException(f"get_json_schema: the Enum {hint.__name__} needs members whose "
                                               f"values are int, float, str, bool or None")
            return _enum_schema(values)
        basic = {**_JSON_SCALARS, list: "array", tuple: "array", dict: "object", torch.Tensor: "audio"}
        try:
            from PIL.Image import Image
            basic[Image] = "image"
        except ImportError:
            pass
        if hint is typing.Any:
            return {}
        if hint not in basic:
            raise TypeHintParsingException(f"get_json_schema: the type hint {hint!r} has no JSON schema (basic types, "
                                           f"Enums, Literal, and list, tuple, dict and Union of those have one); "
                                           f"write the tool's schema by hand")
        return {"type": basic[hint]}
    if origin is typing.Union or origin is getattr(types, "UnionType", None):
        subtypes = [_hint_schema(t) for t in args if t is not type(None)]
        if len(subtypes) == 1:
            schema = subtypes[0]
        elif all(s.keys() == {"type"} and isinstance(s["type"], str) for s in subtypes):
            names = sorted({s["type"] for s in subtypes})
            schema = {"type": names[0] if len(names) == 1 else names}
        else:
            schema = {"anyOf": subtypes}
        return {**schema, "nullable": True} if type(None) in args else schema
    if origin is typing.Literal and args:
        if any(type(a) not in _JSON_SCALARS for a in args):
            raise TypeHintParsingException(f"get_json_schema: Literal values must be int, float, str, bool or None, "
                                           f"got {hint!r}")
        return _enum_schema(list(args))
    if origin is list:
        return {"type": "array", **({"items": _hint_schema(args[0])} if args else {})}
    if origin is tuple:
        if len(args) == 1 or ... in args:
            raise TypeHintParsingException(f"get_json_schema: {hint!r}: a tuple hint needs two or more item types "
                                           f"(list[...] for one, or for any number)")
        return {"type": "array", **({"prefixItems": [_hint_schema(t) for t in args]} if args else {})}
    if origin is dict:
        return {"type": "object", **({"additionalProperties": _hint_schema(args[1])} if len(args) == 2 else {})}
    raise TypeHintParsingException(f"get_json_schema: the type hint {hint!r} has no JSON schema")
