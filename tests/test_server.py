"""`lowbit serve` end to end: a real uvicorn server on a free local port with the bundled model, driven by the
official ``openai`` client (and raw HTTP for what a client library would refuse to send)."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from lbtest import KEY, TOY_MODEL, LiveServer

from lowbit.runtime.engine import Engine
from lowbit.runtime.sampling import SamplingParams
from lowbit.runtime.server import create_app

MODEL = TOY_MODEL.stem
QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "How do I sort a list in Python?",
    "Who wrote Hamlet?",
    "What is 2 + 2?",
    "Tell me a joke.",
    "Describe a cat.",
]
JSON = {"content-type": "application/json"}
COUNTING = "1, 2, 3, 4, 5,"  # greedy continues "4, 4, 4, ..." without ever ending: a long generation on demand


@pytest.fixture(scope="module")
def live():
    engine = Engine(TOY_MODEL, threads=1)
    with LiveServer(create_app(engine, api_key=KEY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(live):
    return live.client()


@pytest.fixture(scope="module")
def http(live):
    with live.http() as h:
        yield h


def chat(client, question: str, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 16)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}], **kw)


def health(http) -> dict:
    r = http.get("/health")
    assert r.status_code == 200
    return r.json()


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


# ------------------------------------------------------------------------------------------------ basics
def test_models_and_health(live, client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    h = health(http)
    assert h["status"] == "ok" and h["model"] == MODEL and h["context_length"] == 1024
    assert live.base.startswith("http://127.0.0.1:")


def test_chat_matches_the_engine(client):
    ref = Engine(TOY_MODEL, threads=1)
    ids = ref.tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
    expected = "".join(e.text for e in ref.generate(ids, SamplingParams(), max_tokens=24))

    r = chat(client, QUESTIONS[0], max_tokens=24, user="someone")
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert choice.message.content == expected != ""
    assert choice.finish_reason == ref.stats.finish_reason
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == ref.stats.generated_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_usage(client):
    full = chat(client, QUESTIONS[1], max_tokens=12)
    chunks = list(chat(client, QUESTIONS[1], max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # without include_usage no chunk carries usage
    assert all(c.usage is None for c in chat(client, QUESTIONS[1], max_tokens=4, stream=True))


def test_stream_ends_with_done(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    json.loads(events[-2].removeprefix("data: "))


def test_completions(client):
    r = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text.startswith(" 4,") and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 5
    stream = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8
    # a prompt given as token ids continues the same way
    ids = Engine(TOY_MODEL, threads=1).tokenizer.encode(COUNTING)
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert r2.choices[0].text == r.choices[0].text


def test_content_parts_and_system(client):
    plain = chat(client, QUESTIONS[4], max_tokens=8)
    parts = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=8,
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTIONS[4]}]}],
    )  # fmt: skip
    assert parts.choices[0].message.content == plain.choices[0].message.content
    sys_msg = {"role": "system", "content": "You are terse."}
    with_sys = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=8, messages=[sys_msg, {"role": "user", "content": QUESTIONS[4]}]
    )
    assert with_sys.usage.prompt_tokens > plain.usage.prompt_tokens


def test_stop_sequences(client):
    full = chat(client, QUESTIONS[0], max_tokens=24).choices[0].message.content
    words = full.split(" ")
    assert len(words) >= 4, full
    cut = " " + words[2]
    r = chat(client, QUESTIONS[0], max_tokens=24, stop=cut)
    assert r.choices[0].message.content == full[: full.index(cut)]
    assert r.choices[0].finish_reason == "stop"
    r = chat(client, QUESTIONS[0], max_tokens=24, stop=["never appears", words[1]])
    assert r.choices[0].message.content == full[: full.index(words[1])]
    streamed = chat(client, QUESTIONS[0], max_tokens=24, stop=[cut], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[: full.index(cut)]


def test_seed_reproducible(client):
    def sample(seed):
        r = chat(client, QUESTIONS[6], temperature=1.0, top_p=0.95, seed=seed, max_tokens=16)
        return r.choices[0].message.content

    # the first call may prefill the prompt in one batch and a repeat reuses all of it but the last token: the
    # products differ by float rounding, which int8 activations can turn into a different sample (llama.cpp's
    # cache_prompt has the same caveat). A repeat of a repeat meets the same cache, so it must agree to the token.
    sample(1234)
    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))


def test_chat_logprobs(client):
    r = chat(client, QUESTIONS[0], max_tokens=8, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        lps = [t.logprob for t in item.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert item.top_logprobs[0].token == item.token and item.top_logprobs[0].logprob == item.logprob  # greedy
        assert bytes(item.bytes).decode() == item.token
    assert "".join(t.token for t in content).strip() == r.choices[0].message.content.strip()
    assert chat(client, QUESTIONS[0], max_tokens=4).choices[0].logprobs is None
    streamed = list(chat(client, QUESTIONS[0], max_tokens=4, logprobs=True, top_logprobs=1, stream=True))
    got = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert got == [t.token for t in content[:4]]


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and max(top.values()) == val and top[tok] == val


# ------------------------------------------------------------------------------------------------ errors
def test_error_malformed_and_bad_types(live, client, http):
    assert_error(http.post("/v1/chat/completions", content=b'{"model": ', headers=JSON), 400, "invalid_json")
    assert_error(http.post("/v1/completions", content=b"", headers=JSON), 400, "invalid_json")
    assert_error(http.post("/v1/chat/completions", json=[1, 2]), 400)
    assert_error(http.post("/v1/chat/completions", json={"model": MODEL}), 400, param="messages")
    bad = [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
        ({"n": 2}, "n"),
        ({"stop": 5}, "stop"),
        ({"seed": "x"}, "seed"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
        ({"stream": "yes"}, "stream"),
        ({"presence_penalty": 9}, "presence_penalty"),
    ]
    for extra, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **extra)
        assert e.value.status_code == 400 and e.value.param == param, (extra, e.value.body)
    for messages in ([{"role": "user", "content": 5}], [{"role": "wizard", "content": "hi"}], ["hi"],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):  # fmt: skip
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=messages)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=["one", "two"])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[99999999])


def test_error_unknown_model_and_routes(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    assert_error(http.get("/v1/nothing"), 404, "not_found")
    assert_error(http.get("/v1/chat/completions"), 405, "method_not_allowed")
    assert_error(http.delete("/health"), 405)


def test_error_api_key(live):
    with pytest.raises(openai.AuthenticationError) as e:
        live.client(api_key="wrong").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        live.client(api_key="wrong").models.list()
    with live.http(auth=False) as h:
        assert_error(h.get("/v1/models"), 401, "invalid_api_key")
        assert_error(h.post("/v1/completions", json={"prompt": "hi"}), 401, "invalid_api_key")
        assert_error(h.get("/v1/models", headers={"Authorization": "Basic abc"}), 401)
        assert h.get("/health").status_code == 200  # health needs no key


def test_error_context_length(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "word " * 1100, max_tokens=None)
    assert e.value.code == "context_length_exceeded" and "1024" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "Hi", max_tokens=1020)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 1100, stream=True)
    assert e.value.code == "context_length_exceeded"
    # without max_tokens a request may use all the context the prompt leaves (here it stops on its own)
    r = chat(client, "Hi", max_tokens=None)
    assert r.usage.total_tokens <= 1024 and r.choices[0].finish_reason in ("stop", "length")


def test_error_body_too_large(http):
    big = b'{"model": "x", "prompt": "' + b"a" * (1 << 20) + b'"}'
    err = assert_error(http.post("/v1/completions", content=big, headers=JSON), 413, "request_too_large")
    assert "limit" in err["message"]

    def chunks():  # no content-length: the limit applies to what arrives
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"a" * (64 << 10)
        yield b'"}'

    assert_error(http.post("/v1/completions", content=chunks(), headers=JSON), 413, "request_too_large")
    assert http.post("/v1/completions", json={"prompt": "a" * 1000, "max_tokens": 1}).status_code == 200


def test_chat_without_template_is_400_but_completions_work():
    engine = Engine(TOY_MODEL, threads=1)
    engine.tokenizer.chat_template = None
    with LiveServer(create_app(engine, model_name="plain")) as srv:
        client = srv.client(api_key="unused")
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}])
        assert e.value.code == "no_chat_template" and "chat template" in e.value.message
        assert "/v1/completions" in e.value.message
        r = client.completions.create(model="plain", prompt=COUNTING, max_tokens=4, temperature=0)
        assert r.choices[0].text.startswith(" 4,")


# ------------------------------------------------------------------------------------------------ the worker
def test_concurrent_requests_are_independent(client):
    one_by_one = [chat(client, q, max_tokens=20).choices[0].message.content for q in QUESTIONS]
    assert len(set(one_by_one)) == len(QUESTIONS)  # distinct answers, so a mix-up would show
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(lambda q: chat(client, q, max_tokens=20), QUESTIONS))
    assert [r.choices[0].message.content for r in together] == one_by_one
    assert all(r.usage.completion_tokens <= 20 for r in together)


def test_disconnect_cancels_generation(live, client, http):
    before = health(http)["worker"]
    max_tokens = 900  # ~5 s or more of generation if it were not cancelled
    stream = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=max_tokens, temperature=0, stream=True)
    received = []
    for chunk in stream:
        received.append(chunk)
        if len(received) == 1:  # /health answers while a generation runs
            t0 = time.perf_counter()
            h = health(http)
            assert h["busy"] is True and time.perf_counter() - t0 < 1.0
        if len(received) == 3:
            break
    stream.close()
    t_close = time.perf_counter()

    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)  # starts promptly
    assert r.usage.completion_tokens == 2
    assert time.perf_counter() - t_close < 2.5

    after = health(http)["worker"]
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["last_cancel_overrun"] <= 2  # tokens generated after the server saw the disconnect
    assert 3 <= after["last_cancel_tokens"] < 100 < max_tokens


def test_non_streaming_client_that_gives_up_cancels(live, client, http):
    before = health(http)["worker"]
    body = {"model": MODEL, "prompt": COUNTING, "max_tokens": 900, "temperature": 0}
    with live.http() as h, pytest.raises(httpx.ReadTimeout):
        h.post("/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 5
    while (after := health(http)["worker"])["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, "the abandoned generation was not cancelled"
        time.sleep(0.05)
    assert after["last_cancel_overrun"] <= 2 and after["last_cancel_tokens"] < 900
    assert health(http)["busy"] is False


def test_prefix_reuse_on_second_turn(client, http):
    tok = Engine(TOY_MODEL, threads=1).tokenizer
    turn1 = [{"role": "user", "content": "Tell me about the moon."}]
    r1 = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=12, temperature=0)
    answer = r1.choices[0].message.content
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "And the sun?"}]
    ids1, ids2 = tok.encode_chat(turn1), tok.encode_chat(turn2)
    assert ids2[: len(ids1)] == ids1 and r1.usage.prompt_tokens == len(ids1)
    before = health(http)["worker"]
    r2 = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=4, temperature=0)
    after = health(http)["worker"]
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert r2.usage.prompt_tokens == len(ids2)
    assert cached >= len(ids1)  # the whole first prompt (and what of the answer tokenizes the same) was reused
    prefilled = after["prefilled_tokens"] - before["prefilled_tokens"]
    assert prefilled == len(ids2) - cached <= len(ids2) - len(ids1)
    # an unrelated prompt reuses (almost) nothing
    r3 = client.completions.create(model=MODEL, prompt="Zebras", max_tokens=1)
    assert r3.usage.prompt_tokens_details.cached_tokens <= 1


def test_request_log_line(client, caplog):
    caplog.set_level(logging.INFO, logger="lowbit.runtime.server")
    chat(client, "Hi", max_tokens=3)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        lines = [r.getMessage() for r in caplog.records if r.name == "lowbit.runtime.server"]
        if any("/v1/chat/completions" in m for m in lines):
            break
        time.sleep(0.02)
    [line] = [m for m in lines if "/v1/chat/completions" in m]
    assert line.startswith("POST /v1/chat/completions 200 prompt=")
    assert "completion=3" in line and "cached=" in line and "finish=length" in line and line.endswith("s")


def test_web_pages_cannot_drive_the_local_server():
    """A loopback server refuses foreign Host headers (DNS rebinding) and non-JSON POSTs (the cross-origin "simple"
    requests a page can send without a preflight); it sends no CORS headers unless --cors names an origin; lone
    surrogates are a 400, and /health tells nothing but "ok" without the key."""
    engine = Engine(TOY_MODEL, threads=1)
    body = {"model": TOY_MODEL.stem, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with LiveServer(create_app(engine, api_key=KEY, loopback=True)) as srv, srv.http() as h:
        r = h.post("/v1/chat/completions", json=body, headers={"host": "evil.example:8000"})
        assert_error(r, 403, "forbidden_host")
        for host in (f"localhost:{srv.port}", f"127.0.0.1:{srv.port}", "[::1]", "LOCALHOST"):
            assert h.post("/v1/chat/completions", json=body, headers={"host": host}).status_code == 200, host
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            r = h.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": ctype})
            assert_error(r, 415, "unsupported_media_type")
        r = h.post("/v1/chat/completions", json=body, headers={"origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        for text in ('"\\ud800"', '"a\\udfffb"', '"\\udc80\\ud800"'):
            raw = '{"model": "%s", "messages": [{"role": "user", "content": %s}]}' % (TOY_MODEL.stem, text)
            assert_error(h.post("/v1/chat/completions", content=raw, headers=JSON), 400, "invalid_text")
        raw = '{"model": "%s", "prompt": "x\\ud800", "max_tokens": 1}' % TOY_MODEL.stem
        assert_error(h.post("/v1/completions", content=raw, headers=JSON), 400, "invalid_text")
        assert httpx.get(f"{srv.base}/health").json() == {"status": "ok"}
        assert h.get("/health").json()["model"] == TOY_MODEL.stem
    with LiveServer(create_app(engine, loopback=True, cors=("http://localhost:3000",))) as srv, srv.http() as h:
        r = h.post("/v1/chat/completions", json=body, headers={"origin": "http://localhost:3000"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = h.post("/v1/chat/completions", json=body, headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
