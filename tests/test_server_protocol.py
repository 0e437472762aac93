"""The server's protocol layer without a network: request parsing, defaults, response shapes, error handlers."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from lbtest import TOY_MODEL

from lowbit.runtime.engine import Engine
from lowbit.runtime.server import create_app
from lowbit.runtime.server import protocol as P
from lowbit.runtime.server.app import TokenTexts

USER = [{"role": "user", "content": "hi"}]


def test_chat_defaults_and_roles():
    req = P.parse_chat({"messages": [{"role": "developer", "content": "be brief"}, *USER]})
    o = req.options
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert o.model is None and o.max_tokens is None and o.stop == [] and not o.stream and o.logprobs is None
    assert o.params.temperature == 1.0 and o.params.top_p == 1.0 and o.params.seed is None  # OpenAI's defaults
    # the model's own generation defaults come before OpenAI's; the request before both
    assert P.parse_chat({"messages": USER}, {"temperature": 0.6, "top_k": 20}).options.params.top_k == 20
    assert P.parse_chat({"messages": USER}, {"do_sample": False}).options.params.temperature == 0.0
    assert P.parse_chat({"messages": USER, "temperature": 0.2}, {"temperature": 0.6}).options.params.temperature == 0.2


def test_chat_content_parts_and_assistant_null():
    req = P.parse_chat({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
    ]})  # fmt: skip
    assert [m["content"] for m in req.messages] == ["a\nb", ""]


def test_options():
    o = P.parse_chat({"messages": USER, "max_tokens": 5, "max_completion_tokens": 7, "stop": ["x", "x", "y"],
                      "top_p": 0, "top_k": -1, "seed": -1, "stream": True,
                      "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2,
                      "n": 1, "user": "u", "logit_bias": {}, "tools": []}).options  # fmt: skip
    assert o.max_tokens == 7 and o.stop == ["x", "y"] and o.stream and o.include_usage and o.logprobs == 2
    assert o.params.top_k == 1 and o.params.top_p == 1.0  # top_p 0 = only the most likely token
    assert o.params.seed == 2**64 - 1
    assert P.parse_chat({"messages": USER, "logprobs": True}).options.logprobs == 0
    c = P.parse_completion({"prompt": ["just one"], "logprobs": 3, "stop": "\n"})
    assert c.prompt == "just one" and c.options.logprobs == 3 and c.options.stop == ["\n"]
    assert P.parse_completion({"prompt": [[1, 2, 3]]}, vocab_size=10).prompt == [1, 2, 3]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),  # needs stream
        ({"messages": USER, "logit_bias": {"5": 10}}, "logit_bias"),
        ({"messages": USER, "tools": [{"type": "function"}]}, "tools[0].function"),
        ({"messages": USER, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
         "tools[0].function.parameters"),
        ({"messages": USER, "tools": "f"}, "tools"),
        ({"messages": USER, "tool_choice": "required"}, "tool_choice"),  # no tools
        ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools"),
        ({"messages": USER, "response_format": {"type": "xml"}}, "response_format.type"),
        ({"messages": USER, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x y", "schema": {}}}},
         "response_format.json_schema.name"),
        ({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": 3}}},
         "response_format"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]},
         "messages[0].tool_calls[0].function.arguments"),
        ({"messages": USER, "stop": [""]}, "stop"),
        ({"messages": USER, "stop": ["s"] * 17}, "stop"),
        ({"messages": USER, "top_p": 1.5}, "top_p"),
        ({"messages": USER, "min_p": -0.1}, "min_p"),
        ({"messages": USER, "temperature": float("nan")}, "temperature"),
        ({"messages": USER, "max_tokens": True}, "max_tokens"),
        ({"messages": USER, "model": 3}, "model"),
        ({"messages": USER, "user": 3}, "user"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    ],
)
def test_chat_rejects(body, param):
    with pytest.raises(P.APIError) as e:
        P.parse_chat(body)
    assert e.value.status == 400 and e.value.param == param
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "body",
    [{}, {"prompt": ""}, {"prompt": 5}, {"prompt": ["a", "b"]}, {"prompt": [1, 99]}, {"prompt": "a", "echo": True},
     {"prompt": "a", "suffix": "b"}, {"prompt": "a", "best_of": 2}, {"prompt": "a", "logprobs": 21}, "text"],
)  # fmt: skip
def test_completion_rejects(body):
    with pytest.raises(P.APIError) as e:
        P.parse_completion(body, vocab_size=10)
    assert e.value.status == 400


def test_response_shapes():
    usage = P.Usage(prompt_tokens=5, completion_tokens=3, cached_tokens=2)
    assert usage.body() == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                            "prompt_tokens_details": {"cached_tokens": 2}}  # fmt: skip
    texts = {1: (" a", [32, 97]), 2: ("b", [98])}
    items = [P.TokenLogprob(1, -0.1, [(1, -0.1), (2, -2.0)]), P.TokenLogprob(2, -0.5, [(2, -0.5)])]
    chat = P.chat_logprobs(items, texts.__getitem__)
    assert chat["content"][0] == {
        "token": " a",
        "logprob": -0.1,
        "bytes": [32, 97],
        "top_logprobs": [
            {"token": " a", "logprob": -0.1, "bytes": [32, 97]},
            {"token": "b", "logprob": -2.0, "bytes": [98]},
        ],
    }
    legacy = P.completion_logprobs(items, texts.__getitem__, offset=4)
    assert legacy == {"tokens": [" a", "b"], "token_logprobs": [-0.1, -0.5],
                      "top_logprobs": [{" a": -0.1, "b": -2.0}, {"b": -0.5}], "text_offset": [4, 6]}  # fmt: skip


def test_token_texts_keep_leading_spaces():
    tok = Engine(TOY_MODEL, threads=1).tokenizer
    texts = TokenTexts(tok)
    ids = tok.encode("Hello world, café", add_special_tokens=False)
    pieces = [texts.get(i)[0] for i in ids]
    assert b"".join(bytes(texts.get(i)[1]) for i in ids).decode().strip() == "Hello world, café"
    assert pieces[:3] == [" H", "ello", " world"] and texts.loses_leading_space(ids[2])
    byte_ids = [i for i in ids if i in tok.byte_token_ids()]
    assert len(byte_ids) == 2 and all(len(texts.get(i)[1]) == 1 for i in byte_ids)  # é as its two UTF-8 bytes
    assert all(bytes(texts.get(i)[1]).decode() == texts.get(i)[0] for i in ids if i not in byte_ids)
    eos = tok.eos_id
    assert texts.get(eos)[0] == "</s>"


def test_framework_errors_have_openai_shape():
    app = create_app(Engine(TOY_MODEL, threads=1))

    @app.get("/v1/typed/{n}")
    async def typed(n: int):
        return {"n": n}

    client = TestClient(app, raise_server_exceptions=False)  # no lifespan: the worker is not needed here
    r = client.get("/v1/typed/abc")
    assert r.status_code == 400 and r.json()["error"]["param"] == "path.n"
    assert client.get("/v1/typed/3").json() == {"n": 3}
    r = client.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"  # worker not running


@pytest.mark.parametrize(
    "extra, param, code",
    [
        ({"seed": "5"}, "seed", "invalid_type"),  # no string-to-number coercion
        ({"temperature": True}, "temperature", "invalid_type"),  # nor bool-to-number
        ({"top_p": 1.5}, "top_p", "invalid_value"),
        ({"top_k": -2}, "top_k", "invalid_value"),
        ({"n": 2}, "n", "invalid_value"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", "invalid_type"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ],
)
def test_scalar_fields_are_checked_by_their_declarations(extra, param, code):
    """runtime/server/schema.py declares each setting's type and range; an error names the field and says why."""
    with pytest.raises(P.APIError) as e:
        P.parse_chat({"messages": USER, **extra})
    err = e.value.body()["error"]
    assert (e.value.status, err["param"], err["code"]) == (400, param, code)
    assert err["message"].startswith(f"'{param}': ")


def test_integral_floats_count_as_integers():
    o = P.parse_chat({"messages": USER, "max_tokens": 12.0, "seed": 3.0, "top_k": 5.0}).options
    assert (o.max_tokens, o.params.seed, o.params.top_k) == (12, 3, 5)
    with pytest.raises(P.APIError):
        P.parse_chat({"messages": USER, "max_tokens": 12.5})
