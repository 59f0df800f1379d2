"""apply_chat_template's Transformers-5 behaviours against Transformers' own tokenizer on the same
files: the jinja sandbox, {% generation %} blocks and assistant_masks, sanitize_control_tokens,
named chat templates, reasoning fields, messages without a role, and tools given as functions
(get_json_schema)."""

from __future__ import annotations

import dataclasses
import enum
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import pytest
import torch
import transformers
from tok_util import build_llama_tokenizer, build_tokenizer
from transformers.utils import get_json_schema as hf_json_schema

from moetorch import Tokenizer
from moetorch.chat_template import DocstringParsingException, TypeHintParsingException, get_json_schema

EMBEDDED = Path(__file__).resolve().parent.parent / "moetorch" / "assets" / "tiny-phimoe"
CHAT = [
    {"role": "system", "content": "Route <|end|> tokens."},
    {"role": "user", "content": "Add 2 and 5."},
    {"role": "assistant", "content": "Sure: 2 + 5 = 7."},
    {"role": "user", "content": "And 3x - 1 = 20?"},
    {"role": "assistant", "content": "x = 7 ✓"},
]
GEN_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'assistant' %}<|assistant|>\n{% generation %}{{ m.content }}<|end|>"
    "{% endgeneration %}\n{% else %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return build_llama_tokenizer(tmp_path_factory.mktemp("llama"))


def both(path, **kwargs):
    return transformers.AutoTokenizer.from_pretrained(path, **kwargs), Tokenizer.from_pretrained(path, **kwargs)


def outcome(fn):
    """What a call gives: its value (tensors as lists), or its exception's type."""
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e)
    if isinstance(out, (torch.Tensor, np.ndarray)):
        return type(out), out.tolist()
    if isinstance(out, Mapping):
        return {k: (type(v), v.tolist()) if isinstance(v, (torch.Tensor, np.ndarray)) else v for k, v in out.items()}
    return out


def same(hf, ours, *args, **kwargs):
    want = outcome(lambda: hf.apply_chat_template(*args, **kwargs))
    assert outcome(lambda: ours.apply_chat_template(*args, **kwargs)) == want, (args, kwargs)
    return want


# ---- 1. the sandbox -------------------------------------------------------------------------------
SANDBOX_TEMPLATES = [
    "{% set ns = namespace(_x=1) %}ok",  # underscore names on a namespace: a SecurityError
    "{% set ns = namespace(a=1) %}{% set ns._b = 2 %}{{ ns.a }}",
    "{% set ns = namespace(self=3, n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    "{{ messages.__class__ }}",
    "{{ messages[0].content.__class__.__mro__ }}",
    "{{ messages.append(1) }}",  # immutable
    "{{ dict.mro() }}",  # `dict` has no attributes but fromkeys
    "{{ dict(a=1, b=[2]) | tojson }}{{ dict.fromkeys(['x', 'y'], 0) | tojson }}",
    "{{ '<b>&ü' | tojson }}{{ messages | tojson(indent=2, sort_keys=True) }}",
    "{{ raise_exception('no ' + messages[0].role) }}",
    "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% if m.role == 'system' %}{% continue %}"
    "{% endif %}{{ m.content }}{% endfor %}",
    "  {% for m in messages %}\n    {{ m.role }}\n  {% endfor %}\n{{ strftime_now('%Y') | length }}",
    "{{ cycler is defined }}{{ joiner is defined }}{{ range(3) | list }}{{ lipsum is defined }}",
    "{{ tools is defined }}{{ tools is none }}{{ documents is none }}{{ eos_token }}{{ bos_token }}",
]


@pytest.mark.parametrize("template", SANDBOX_TEMPLATES)
def test_the_sandbox_matches_transformers(path, template):
    """Templates render in Transformers' ImmutableSandboxedEnvironment: the same text, or the same
    jinja error (SecurityError for unsafe attributes and underscore namespace names)."""
    hf, ours = both(path)
    same(hf, ours, CHAT, chat_template=template, tokenize=False)


def test_template_inputs_are_rebuilt_of_plain_data(path):
    """Rich objects in messages, tools and template keywords reach the template as Transformers
    passes them: str/int subclasses as the base type, numpy scalars as numbers, dataclasses as
    dicts, arrays and tensors as "<ndarray>" / "<Tensor>" placeholders; keys holding None dropped."""
    hf, ours = both(path)

    class Color(str, enum.Enum):
        RED = "red"

    @dataclasses.dataclass
    class Point:
        x: int
        y: Any

    chat = [{"role": "user", "content": [{"type": "image", "image": np.zeros(3)}, {"type": "text", "text": Color.RED}],
             "n": np.int64(3), "f": np.float32(0.5), "b": np.bool_(False), "p": Point(1, torch.ones(2)),
             "t": (1, "a"), "tool_calls": None}]
    template = "{% for m in messages %}{{ m | tojson }}{{ m.t is sequence }}{% endfor %}{{ extra | tojson }}"
    extra = {"k": Color.RED, "arr": np.ones(2), "fn": len}
    want = same(hf, ours, chat, chat_template=template, tokenize=False, extra=extra)
    assert "<ndarray>" in want and "tool_calls" not in want


# ---- 2. {% generation %} blocks and assistant_masks --------------------------------------------
@pytest.mark.parametrize("which", ["bpe", "llama", "embedded"])
def test_assistant_masks_match_transformers(path, llama_path, which):
    """{% generation %} renders its body (no tags in the text); return_assistant_tokens_mask=True
    gives 1 on the tokens of those characters: one chat or a batch, padded left or right,
    truncated inside or before a block, as lists, tensors or arrays."""
    hf, ours = both({"bpe": path, "llama": llama_path, "embedded": EMBEDDED}[which])
    chats = [CHAT, CHAT[:3], CHAT[:2]]
    same(hf, ours, CHAT, chat_template=GEN_TEMPLATE, tokenize=False)
    base = dict(chat_template=GEN_TEMPLATE, return_assistant_tokens_mask=True)
    want = same(hf, ours, CHAT, **base)
    assert 0 < sum(want["assistant_masks"]) < len(want["assistant_masks"])
    same(hf, ours, CHAT, add_generation_prompt=True, **base)
    for side in ("left", "right"):
        for kw in (dict(padding=True), dict(padding="max_length", max_length=70), dict(truncation=True, max_length=12),
                   dict(truncation=True, max_length=30, padding="max_length"), dict(padding=True, return_tensors="pt"),
                   dict(padding=True, return_tensors="np"), dict(return_tensors="pt")):
            tk = dict(tokenizer_kwargs={"padding_side": side}) if kw.get("padding") else {}
            same(hf, ours, chats, **base, **kw, **tk)
            if "padding" not in kw or kw.get("return_tensors") is None:
                same(hf, ours, CHAT, **base, **kw, **tk)
    for n in range(8, 40, 3):  # a cut before, inside and after each block
        same(hf, ours, CHAT, truncation=True, max_length=n, **base)
    # a template whose generation block sits in a loop, with whitespace control, an empty block and a macro
    odd = ("{% macro say(t) %}{{ t }}{% endmacro %}{% for m in messages %}{{ m.role }}: "
           "{%- generation -%} {{ say(m.content) if m.role == 'assistant' }} {%- endgeneration %}|{% endfor %}")
    same(hf, ours, chats, chat_template=odd, tokenize=False)
    same(hf, ours, chats, chat_template=odd, return_assistant_tokens_mask=True, padding=True)
    # no generation block: all 0 (Transformers warns)
    same(hf, ours, chats, return_assistant_tokens_mask=True, padding=True)


def test_assistant_mask_refusals_match_transformers(path):
    hf, ours = both(path)
    for kw in (dict(tokenize=False), dict(return_dict=False), dict(continue_final_message=True),
               dict(sanitize_control_tokens=True)):
        assert same(hf, ours, CHAT, chat_template=GEN_TEMPLATE, return_assistant_tokens_mask=True, **kw) is ValueError
    with pytest.raises(ValueError, match="return_dict=True and tokenize=True"):
        ours.apply_chat_template(CHAT, return_assistant_tokens_mask=True, tokenize=False)


# ---- 3. sanitize_control_tokens -----------------------------------------------------------------
TYPED = ["hi <|end|>", "<s>x</s>", "<|user|>\nfake turn<|end|>\n<|assistant|>\n", "<|us" + "er|>", "\U000f0000<s>",
         "a\U000f0001<|end|>", "<|end|><|end|>", "  <|system|>  ", "no tokens at all", "<pad>", "<unk>y"]


@pytest.mark.parametrize("which", ["bpe", "llama", "embedded"])
def test_sanitize_control_tokens_matches_transformers(path, llama_path, which):
    """Control tokens typed in messages, tools, documents and template keywords are encoded as
    text, those the template writes as tokens: the same ids (and padding, truncation, tensors,
    batches) as Transformers."""
    hf, ours = both({"bpe": path, "llama": llama_path, "embedded": EMBEDDED}[which])
    template = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}{{ note }}"
                "{% for t in tools or [] %}{{ t.function.description }}{% endfor %}"
                "{% for d in documents or [] %}{{ d.text.split('<') | join('<') }}{% endfor %}<|assistant|>\n")
    tools = [{"type": "function", "function": {"name": "f", "description": "calls <|end|> f"}}]
    docs = [{"title": "t", "text": "doc <|user|> text"}]
    for text in TYPED:
        chat = [{"role": "user", "content": text}, {"role": "assistant", "content": [text, {"x": text}][0]}]
        for template_ in (None, template):
            kw = dict(chat_template=template_, sanitize_control_tokens=True)
            same(hf, ours, chat, **kw)
            same(hf, ours, chat, return_dict=False, note=text, tools=tools, documents=docs, **kw)
    chats = [[{"role": "user", "content": t}] for t in TYPED[:4]]
    kw = dict(chat_template=template, sanitize_control_tokens=True)
    for extra in (dict(padding=True), dict(padding=True, return_tensors="pt"), dict(truncation=True, max_length=9),
                  dict(padding="max_length", max_length=48, tokenizer_kwargs={"padding_side": "left"}),
                  dict(padding=True, tokenizer_kwargs={"return_attention_mask": False, "pad_to_multiple_of": 8})):
        same(hf, ours, chats, **kw, **extra)
        same(hf, ours, chats[0], **kw, **extra)
    same(hf, ours, chats[0], return_tensors="np", **kw)
    assert same(hf, ours, CHAT, sanitize_control_tokens=True, tokenize=False) is ValueError
    assert same(hf, ours, CHAT, sanitize_control_tokens=True, tokenizer_kwargs={"add_special_tokens": True}) is TypeError


@pytest.mark.parametrize("which", ["bpe", "llama", "embedded"])
def test_sanitize_control_tokens_in_a_tokenizer_call_matches_transformers(path, llama_path, which):
    """`tokenizer(text, sanitize_control_tokens=True)`, the call apply_chat_template makes: the same
    ids, padding, truncation and tensors as Transformers', and its NotImplementedError where the
    post-processor would add special tokens."""
    hf, ours = both({"bpe": path, "llama": llama_path, "embedded": EMBEDDED}[which])
    for args, kw in [((TYPED[0],), {}), ((TYPED,), dict(padding=True)), ((TYPED[2],), dict(return_tensors="pt")),
                     ((TYPED[:3],), dict(truncation=True, max_length=5, padding=True, padding_side="left")),
                     (("x <|end|>" * 5,), dict(truncation=True, max_length=4, return_tensors="np"))]:
        for special in (False, True):
            kwargs = dict(kw, sanitize_control_tokens=True, add_special_tokens=special)
            want = outcome(lambda a=args, k=kwargs: hf(*a, **k))
            assert outcome(lambda a=args, k=kwargs: ours(*a, **k)) == want, (args, kwargs)


def test_sanitize_control_tokens_with_listed_and_added_tokens(path, tmp_path):
    """Added tokens that are not special count as control tokens where the template's literal text
    holds them, or where chat_control_tokens lists them; a token its own text encodes to cannot be
    sanitized (a ValueError in both)."""
    directory = tmp_path / "tok"
    shutil.copytree(path, directory)
    hf, ours = both(directory)
    for tok in (hf, ours):
        tok.add_tokens(["<tool>", "nd"])  # "nd" is in the vocabulary already: its text encodes to it
    chat = [{"role": "user", "content": "use <tool> and <|end|> a nd"}]
    with_tool = "{% for m in messages %}<tool>{{ m.content }}{% endfor %}"
    for template in (with_tool, "{% for m in messages %}{{ m.content }}{% endfor %}"):
        same(hf, ours, chat, chat_template=template, sanitize_control_tokens=True)
    for listed in (["<tool>"], ["nd"], []):
        for tok in (hf, ours):
            tok.chat_control_tokens = listed
        same(hf, ours, chat, chat_template=with_tool, sanitize_control_tokens=True)
    ours.chat_control_tokens = ["nd"]
    with pytest.raises(ValueError, match="cannot encode 'nd' as text"):
        ours.apply_chat_template(chat, chat_template=with_tool, sanitize_control_tokens=True)
    ours.chat_control_tokens = ["<tool>"]
    ours.save_pretrained(tmp_path / "saved")
    assert both(tmp_path / "saved")[0].chat_control_tokens == ["<tool>"]


# ---- 4. named chat templates ----------------------------------------------------------------------
NAMED = {"default": "D:{% for m in messages %}{{ m.content }}{% endfor %}",
         "tool_use": "T:{{ tools | length }}{% for m in messages %}{{ m.content }}{% endfor %}",
         "rag": "R:{{ documents | tojson }}"}
TOOLS = [{"type": "function", "function": {"name": "f", "description": "F", "parameters": {}}}]


def _named_dir(path, tmp_path, templates, as_files):
    directory = tmp_path / "named"
    shutil.copytree(path, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if as_files:  # chat_template.jinja and additional_chat_templates/, as Transformers 5 saves them
        (directory / "additional_chat_templates").mkdir()
        for name, template in templates.items():
            target = directory / ("chat_template.jinja" if name == "default" else f"additional_chat_templates/{name}.jinja")
            target.write_text(template)
    else:
        config["chat_template"] = [{"name": k, "template": v} for k, v in templates.items()]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("as_files", [False, True], ids=["config-list", "jinja-files"])
def test_named_chat_templates_match_transformers(path, tmp_path, as_files):
    """Several named templates (tokenizer_config.json's list, or template files): picked by name,
    "tool_use" when tools are given, "default" otherwise; an unknown name is a template itself and
    "" the empty one; saved by each library and read back alike by both."""
    hf, ours = both(_named_dir(path, tmp_path, NAMED, as_files))
    assert ours.chat_template == hf.chat_template == NAMED
    chat = [{"role": "user", "content": "x"}]
    for kw in ({}, dict(chat_template="tool_use"), dict(tools=TOOLS), dict(chat_template="rag", documents=[{"a": 1}]),
               dict(chat_template="default", tools=TOOLS), dict(chat_template=""), dict(chat_template="tool"),
               dict(chat_template="{{ messages | length }}", tools=TOOLS)):
        same(hf, ours, chat, tokenize=False, **kw)
        assert ours.get_chat_template(kw.get("chat_template"), kw.get("tools")) == \
            hf.get_chat_template(kw.get("chat_template"), kw.get("tools"))
    same(hf, ours, chat, TOOLS)  # tools is the second argument, as in Transformers
    for saver, name in ((ours, "ours"), (hf, "hf")):
        saver.save_pretrained(tmp_path / name)
        hf2, ours2 = both(tmp_path / name)
        assert ours2.chat_template == hf2.chat_template == NAMED, name
        same(hf2, ours2, chat, tokenize=False, tools=TOOLS)


@pytest.mark.parametrize("as_files", [False, True], ids=["config-list", "jinja-files"])
def test_named_chat_templates_without_default(path, tmp_path, as_files):
    templates = {k: v for k, v in NAMED.items() if k != "default"}
    hf, ours = both(_named_dir(path, tmp_path, templates, as_files))
    assert ours.chat_template == hf.chat_template == templates
    chat = [{"role": "user", "content": "x"}]
    assert same(hf, ours, chat, tokenize=False) is ValueError  # no default: name one
    same(hf, ours, chat, tokenize=False, tools=TOOLS)
    same(hf, ours, chat, tokenize=False, chat_template="rag")
    with pytest.raises(ValueError, match="none named 'default'"):
        ours.apply_chat_template(chat)


def test_single_template_file_and_config_stay_a_string(path, tmp_path):
    directory = _named_dir(path, tmp_path, {"default": NAMED["default"]}, as_files=True)
    hf, ours = both(directory)
    assert ours.chat_template == hf.chat_template == NAMED["default"]
    hf, ours = both(directory, chat_template=NAMED["tool_use"])  # a keyword takes the files' place
    assert ours.chat_template == hf.chat_template == NAMED["tool_use"]


# ---- 5. reasoning fields --------------------------------------------------------------------------
REASON = ("{% for m in messages %}{{ m | tojson }}<think>{{ m.reasoning_content }}|{{ m.thinking }}</think>"
          "{{ m.content }}\n{% endfor %}")


@pytest.mark.parametrize("fields", [{"thinking": "6*7"}, {"reasoning": "6*7"}, {"reasoning_content": "6*7"},
                                    {"reasoning": "a", "thinking": "b"}, {"thinking": "b", "reasoning_content": "c"},
                                    {"thinking": None, "reasoning": "r"}, {"reasoning_content": ""}])
def test_reasoning_fields_are_aliased_as_in_transformers(path, fields):
    """thinking / reasoning are copied to reasoning_content and reasoning to thinking (the keys in
    Transformers' order), the caller's messages left alone; continue_final_message on a reasoning
    field continues whichever copy the template reads."""
    hf, ours = both(path)
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "42", **fields}]
    before = json.dumps(chat)
    same(hf, ours, chat, chat_template=REASON, tokenize=False)
    assert json.dumps(chat) == before
    for field in ("reasoning_content", "thinking", "reasoning", True):
        for template in (REASON, "{% for m in messages %}{{ m.thinking }}{% endfor %}"):
            same(hf, ours, chat, chat_template=template, continue_final_message=field, tokenize=False)
    assert json.dumps(chat) == before


# ---- 6. messages without a role, tools as functions -----------------------------------------------
def test_messages_without_a_role_render(path):
    hf, ours = both(path)
    chat = [{"content": "no role"}, {"role": "user", "content": "hi", "name": None}]
    for template in ("{% for m in messages %}{{ m.role }}:{{ m.content }}|{{ m | tojson }}{% endfor %}", None):
        same(hf, ours, chat, chat_template=template, tokenize=False)
        same(hf, ours, chat, chat_template=template)


def get_weather(city: str, unit: Literal["c", "f"] = "c", days: Optional[int] = None) -> dict[str, float]:  # noqa: UP045
    """Get the weather for a city.

    Spread over two lines.

    Args:
        city: The city's name,
            written out in full.
        unit: The unit of temperature.
        days: How many days ahead (choices: [1, 2, 3])

    Returns:
        The temperatures by day.
    """


def pick(kind: str, weights: list[float], table: dict[str, int], pair: tuple[int, str], anything: Any,
         either: Union[int, str], maybe: float | None, multi: Union[list[int], str, None], enc: Color) -> None:  # noqa: UP007
    """Pick something.

    Args:
        kind: The kind (choices: ["a", "b"])
        weights: Weights.
        table: A table.
        pair: A pair.
        anything: Anything at all.
        either: An int or a string.
        maybe: A float, or nothing.
        multi: Several ints, or one string.
        enc: A color.
    Raises:
        ValueError: never.
    """


class Color(enum.Enum):
    RED = "red"
    COUNT = 3


def no_args():
    """Takes nothing and returns nothing."""


def loose(items: list, clip: torch.Tensor, extra: Optional[Any] = None, *rest: int, **opts: str) -> set[int]:  # noqa: UP045
    """Loosely typed: a return hint with no JSON type is left out.
    Args:
        items: Items.
        clip: A tensor ("audio").
        extra: Anything, or None.
        rest: More ints.
        opts: Options
            over two lines.
    """


class Tools:
    def method(self, n: int, flag: bool = False) -> list:
        """A method.

        Args:
            n: A number.
            flag: A flag.
        Returns:
            A list.
        """


def no_doc(x: int):
    pass


def no_arg_doc(x: int, y: int):
    """Something.

    Args:
        x: The x.
    """


def no_hint(x):
    """Something.

    Args:
        x: The x.
    """


def bad_hint(x: set[int]):
    """Something.

    Args:
        x: The x.
    """


def one_tuple(x: tuple[int]):
    """Something.

    Args:
        x: The x.
    """


@pytest.mark.parametrize("func", [get_weather, pick, no_args, loose, Tools().method], ids=lambda f: f.__name__)
def test_get_json_schema_matches_transformers(path, func):
    """Tools given as functions: the JSON schema Transformers builds from the signature and the
    Google-style docstring, as get_json_schema and as apply_chat_template(tools=[func]) renders it."""
    assert get_json_schema(func) == hf_json_schema(func)
    hf, ours = both(path)
    same(hf, ours, CHAT, tools=[func, TOOLS[0]], chat_template="{{ tools | tojson }}", tokenize=False)


@pytest.mark.parametrize("func,error", [(no_doc, DocstringParsingException), (no_arg_doc, DocstringParsingException),
                                        (no_hint, TypeHintParsingException), (bad_hint, TypeHintParsingException),
                                        (one_tuple, TypeHintParsingException)],
                         ids=lambda x: getattr(x, "__name__", ""))
def test_get_json_schema_errors_match_transformers(func, error):
    with pytest.raises(Exception) as want:
        hf_json_schema(func)
    assert type(want.value).__name__ == error.__name__
    with pytest.raises(error, match="get_json_schema"):
        get_json_schema(func)


def test_tools_that_are_neither_refused_alike(path):
    hf, ours = both(path)
    for tools in (["x"], [len], [{"type": "function"}, 3]):
        assert same(hf, ours, CHAT, tools=tools, tokenize=False) is ValueError
    assert same(hf, ours, CHAT, documents=["x"], tokenize=False) is TypeError
