"""Chat messages the chat template has no place for are rendered in a form it has, not dropped:
`developer` as `system`, a `tool` result as a `user` turn, an assistant's `tool_calls` as its
content. Forced tool calls' arguments are always an object, with the model's own digits."""

from __future__ import annotations

import json

import pytest
import test_serve

from moetorch.serve.tools import forced_calls

served = test_serve.served  # the module's fixture: an app over each embedded model
QUESTION = {"role": "user", "content": "What is 2+2?"}


def _ask(client, messages, **extra):
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def _prompt_tokens(engine, messages) -> int:
    """Transformers' tokenizer's count of the chat template's prompt."""
    hf_tok = test_serve.hf_tokenizer(engine)
    return len(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_a_developer_message_is_the_system_prompt(served):
    client, _, _, engine = served
    rule = "Answer in French, in capitals."
    as_developer = _ask(client, [{"role": "developer", "content": rule}, QUESTION])
    as_system = [{"role": "system", "content": rule}, QUESTION]
    assert as_developer["usage"]["prompt_tokens"] == _prompt_tokens(engine, as_system) > \
        _prompt_tokens(engine, [QUESTION])
    assert as_developer["choices"] == _ask(client, as_system)["choices"]


def test_tool_calls_and_results_reach_the_prompt(served):
    client, _, _, engine = served
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}]}
    result = {"role": "tool", "tool_call_id": "call_1", "content": "4"}
    reply = _ask(client, [QUESTION, call, result])
    # what the template renders instead: the calls' JSON as the assistant's turn, the result as a user's
    rendered = [QUESTION, {"role": "assistant", "content": '[{"name": "add", "arguments": {"a": 2, "b": 2}}]'},
                {"role": "user", "content": "4"}]
    assert reply["usage"]["prompt_tokens"] == _prompt_tokens(engine, rendered) > _prompt_tokens(engine, [QUESTION])
    assert reply["choices"] == _ask(client, rendered)["choices"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_a_function_of_no_arguments_is_called_with_an_object(served, choice):
    client, _, _, _ = served
    tools = [{"type": "function", "function": {"name": "get_time", "description": "the time", "parameters": {}}}]
    for seed in range(3):
        reply = _ask(client, [{"role": "user", "content": "What time is it?"}], tools=tools, tool_choice=choice,
                     max_tokens=40, temperature=1.0, seed=seed)
        message = reply["choices"][0]["message"]
        if reply["choices"][0]["finish_reason"] == "tool_calls":
            for call in message["tool_calls"]:
                assert isinstance(json.loads(call["function"]["arguments"]), dict)
    r = client.post("/v1/chat/completions", json={"messages": [QUESTION], "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]})
    assert r.status_code == 400 and "must describe an object" in r.json()["error"]["message"]


def test_call_arguments_keep_the_outputs_digits():
    """A number past the double range, trailing zeros, a long integer: the arguments are the JSON
    the output wrote (strict JSON, no `Infinity`)."""
    args = '{"x": 1e400, "y": [1.50, -0.0], "z": 123456789012345678901234567890, "s": "\\u00e9"}'
    tools = [{"type": "function", "function": {"name": "f"}}]
    named = forced_calls(tools, {"type": "function", "function": {"name": "f"}}, None).calls(args)
    assert named[0]["function"]["arguments"] == '{"x": 1e400, "y": [1.50, -0.0], "z": 123456789012345678901234567890, ' \
                                                '"s": "é"}'
    required = forced_calls(tools, "required", None).calls(f'[{{"name": "f", "arguments": {args}}}]')
    assert required[0]["function"]["arguments"] == named[0]["function"]["arguments"]
    assert json.loads(named[0]["function"]["arguments"], parse_constant=lambda c: pytest.fail(c))["x"] == float("inf")
