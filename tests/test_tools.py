"""Tool calling without a live server: request parsing, formats, grammars on a tokenizer, and parsing replies."""

from __future__ import annotations

import json

import pytest
from lbtest import TOY_MODEL

from lowbit.formats.chat_template import render_chat_template
from lowbit.formats.reader import Container
from lowbit.formats.tokenizer import Tokenizer
from lowbit.runtime.constraint import GrammarCompiler, GrammarError, json_schema_grammar, lark_grammar
from lowbit.runtime.engine import Engine, default_model_path
from lowbit.runtime.server.tools import (
    Tool,
    ToolError,
    ToolSpec,
    anthropic_choice,
    fallback_messages,
    grammar_for,
    openai_choice,
    parse_calls,
    parse_tools,
    tool_format,
)

WEATHER = Tool("get_weather", "Weather", {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"], "additionalProperties": False})  # fmt: skip
ADD = Tool("add", "Add", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                          "required": ["a", "b"], "additionalProperties": False})  # fmt: skip
QWEN_LIKE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n{{ {'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
)
LLAMA3_LIKE = "{% if tools %}Use JSON {\"name\": ..., \"parameters\": ...} <|python_tag|>{% endif %}"
MISTRAL_LIKE = "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"


@pytest.fixture(scope="module")
def compiler():
    """SmolLM2's byte-level BPE (no prefix space, so a text's tokens are what the model would write)."""
    c = Container(default_model_path())
    tok = Tokenizer(c.meta["tokenizer"], c.blobs())
    return GrammarCompiler(tok, c.meta["architecture"]["args"]["vocab_size"], tok.eos_ids)


def test_toy_metaspace_tokenizer_generates_valid_json():
    engine = Engine(TOY_MODEL, threads=1)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}  # fmt: skip
    ids = engine.tokenizer.encode("Count:", add_special_tokens=True)
    c = engine.grammars.compile(json_schema_grammar(schema))
    text = "".join(ev.text for ev in engine.generate(ids, max_tokens=40, constraint=c))
    assert engine.stats.finish_reason == "stop" and 0 <= json.loads(text)["n"] <= 99


def test_parse_openai_and_anthropic_tools():
    tools = parse_tools([{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER.parameters}},
                         {"type": "function", "function": {"name": "noargs"}}])  # fmt: skip
    assert tools[0] == Tool("get_weather", "", WEATHER.parameters)
    assert tools[1].parameters == {"type": "object", "properties": {}}
    (a,) = parse_tools([{"name": "add", "description": "Add", "input_schema": ADD.parameters}], anthropic=True)
    assert a == ADD
    assert openai_choice(None, tools) == "auto" and openai_choice(None, []) == "none"
    assert openai_choice({"type": "function", "function": {"name": "noargs"}}, tools) == "noargs"
    assert anthropic_choice({"type": "any", "disable_parallel_tool_use": True}, [a]) == ("required", False)
    assert anthropic_choice({"type": "tool", "name": "add"}, [a]) == ("add", True)
    for bad in ({"type": "tool", "name": "nope"}, {"type": "sometimes"}, "auto"):
        with pytest.raises(ToolError):
            anthropic_choice(bad, [a])
    with pytest.raises(ToolError, match="input_schema"):
        parse_tools([{"name": "f"}], anthropic=True)


def test_formats_follow_the_template():
    assert tool_format(None) == "hermes"
    assert tool_format(QWEN_LIKE) == "hermes"
    assert tool_format(LLAMA3_LIKE) == "llama3"
    assert tool_format(MISTRAL_LIKE) == "mistral"


def test_native_template_gets_tools_and_history_calls():
    history = [{"role": "user", "content": "2+3?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
               {"role": "tool", "content": "5", "tool_call_id": "c1"}]  # fmt: skip
    text = render_chat_template(QWEN_LIKE, history, tools=[ADD.openai()])
    assert '"name": "add"' in text and '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}' in text
    assert "<|im_start|>tool\n5" in text


def test_fallback_prompt_for_templates_without_tools():
    history = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "2+3 and 4+5?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c1", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}},
                   {"id": "c2", "function": {"name": "add", "arguments": {"a": 4, "b": 5}}}]},
               {"role": "tool", "content": "5", "tool_call_id": "c1"},
               {"role": "tool", "content": "9", "tool_call_id": "c2"}]  # fmt: skip
    out = fallback_messages(history, [ADD])
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be nice.\n\n") and '"name": "add"' in out[0]["content"]
    assert out[2]["content"].count("<tool_call>") == 2
    assert out[3]["content"] == "<tool_response>\n5\n</tool_response>\n<tool_response>\n9\n</tool_response>"
    assert all(set(m) == {"role", "content"} for m in out)


def test_parse_calls_in_each_format():
    tools = [WEATHER, ADD]
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = parse_calls(text, "hermes", tools)
    assert content == "Let me check." and [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Oslo"})]
    two = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call><tool_call>{"name": "add", ' \
          '"arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>'  # fmt: skip
    assert [c.arguments for c in parse_calls(two, "hermes", tools)[1]] == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    broken = "<tool_call>{not json}</tool_call>"
    assert parse_calls(broken, "hermes", tools) == (broken, [])
    assert parse_calls('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', "hermes", tools)[1] == []
    llama = '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}'
    assert [(c.name, c.arguments) for c in parse_calls(llama, "llama3", tools)[1]] == [("add", {"a": 1, "b": 2})]
    several = '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "get_weather", "parameters": {"city": "X"}}'
    assert len(parse_calls(several, "llama3", tools)[1]) == 2
    mistral = '[TOOL_CALLS][{"name": "add", "arguments": {"a": 5, "b": 6}}]'
    assert parse_calls(mistral, "mistral", tools)[1][0].arguments == {"a": 5, "b": 6}
    assert parse_calls("Just text.", "llama3", tools) == ("Just text.", [])


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
@pytest.mark.parametrize("choice", ["required", "add"])
def test_forced_grammars_accept_exactly_valid_calls(compiler, fmt, choice):
    spec = ToolSpec([WEATHER, ADD], choice, parallel=False)
    args = "arguments" if fmt != "llama3" else "parameters"
    good = json.dumps({"name": "add", args: {"a": 1, "b": 2}})
    bad = json.dumps({"name": "add", args: {"a": "one", "b": 2}})
    wrap = {"hermes": lambda s: f"<tool_call>\n{s}\n</tool_call>", "llama3": lambda s: s, "mistral": lambda s: f"[{s}]"}
    tok = compiler.tokenizer
    for text, ok in ((wrap[fmt](good), True), (wrap[fmt](bad), False), ("Hello", False)):
        c = compiler.compile(grammar_for(spec, fmt))
        accepted = True
        for t in tok.encode(text, add_special_tokens=False):
            if not c.allowed()[t]:
                accepted = False
                break
            c.advance(t)
        assert accepted == ok, (fmt, text)


def test_auto_grammar_is_lazy(compiler):
    c_text = compiler.compile(grammar_for(ToolSpec([ADD]), "hermes"))
    tok = compiler.tokenizer
    for t in tok.encode("Hi there, no tools needed.", add_special_tokens=False):
        assert c_text.allowed()[t]
        c_text.advance(t)
    c = compiler.compile(grammar_for(ToolSpec([ADD]), "hermes"))
    rejected = False
    for t in tok.encode('Sure. <tool_call>{"name": "add", "arguments": {"a": "x"', add_special_tokens=False):
        if not c.allowed()[t]:
            rejected = True
            break
        c.advance(t)
    assert rejected  # text is free, but an opened call must be valid
    assert grammar_for(ToolSpec([ADD], "none"), "hermes") is None
    assert grammar_for(ToolSpec([ADD]), "llama3") is None  # parsed afterwards


def test_constraint_errors(compiler):
    with pytest.raises(GrammarError):
        json_schema_grammar([1, 2])
    with pytest.raises(GrammarError, match="empty"):
        lark_grammar("  ")
    with pytest.raises(GrammarError):
        compiler.compile(lark_grammar("start: (\n"))
    with pytest.raises(GrammarError, match="Unsatisfiable"):
        compiler.compile(json_schema_grammar({"type": "integer", "minimum": 3, "maximum": 1}))
    # unbounded integers are held to the safe range, so a reply always ends
    c = compiler.compile(json_schema_grammar({"type": "integer"}))
    tok = compiler.tokenizer
    nine = tok.encode("9", add_special_tokens=False)[-1]
    for _ in range(15):  # 999999999999999 < 2**53 - 1 = 9007199254740991 < 9999999999999999
        assert c.allowed()[nine]
        c.advance(nine)
    assert c.done or not c.allowed()[nine]
