"""`lowbit run`: the chat REPL driven through a real prompt_toolkit session (pipe input), a real terminal (pty, real
SIGINT) and the command line, on the bundled model."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
from lbtest import TOY_MODEL
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from lowbit.runtime.cli.repl import Chat, ChatSettings, Repl
from lowbit.runtime.engine import Engine
from lowbit.runtime.sampling import SamplingParams
from lowbit.runtime.sequence import common_prefix

STATUS = re.compile(r"^\d+ tokens \| prefill \d+ tok at \d+ tok/s( \(\d+ cached\))? \| decode [\d.]+ tok/s \| "
                    r"context \d+/\d+", re.M)  # fmt: skip


@pytest.fixture(scope="module")
def engine():
    return Engine(TOY_MODEL, threads=1)


class Spy:
    """Records every engine.generate call (prompt, cache before it, params, tokens, stats); optionally raises
    KeyboardInterrupt inside the engine (in ``step``) after ``after`` tokens of call number ``interrupt_call``."""

    def __init__(self, engine, monkeypatch, interrupt_call: int | None = None, after: int = 4):
        self.calls: list[dict] = []
        real_generate, real_step = engine.generate, engine.step
        steps = [0]

        def generate(prompt, params=None, max_tokens=256, **kw):
            rec = {"prompt": list(prompt), "cached_before": list(engine.cached), "params": params,
                   "max_tokens": max_tokens, "tokens": []}  # fmt: skip
            self.calls.append(rec)
            inner = real_generate(prompt, params, max_tokens, **kw)
            try:
                for ev in inner:
                    if ev.token >= 0:
                        rec["tokens"].append(ev.token)
                    yield ev
            finally:
                inner.close()
                rec["stats"] = engine.stats

        def step(token):
            if interrupt_call is not None and len(self.calls) - 1 == interrupt_call:
                steps[0] += 1
                if steps[0] >= after:
                    raise KeyboardInterrupt
            return real_step(token)

        monkeypatch.setattr(engine, "generate", generate)
        monkeypatch.setattr(engine, "step", step)


def drive(engine, keys: str, tmp_path, settings=None, system=None):
    """Run a Repl on ``keys`` (typed into a pipe, which is then closed); return (repl, transcript, exit code)."""
    out = io.StringIO()
    with create_pipe_input() as inp:
        inp.send_text(keys)
        inp.close()  # input runs out -> EOF -> the session ends even if the keys forget to
        repl = Repl(engine, settings or ChatSettings(max_tokens=16), system, out=out, input=inp,
                    output=DummyOutput(), history_file=tmp_path / "history", color=False)  # fmt: skip
        rc = repl.run()
    text = out.getvalue()
    assert "Traceback" not in text
    return repl, text, rc


def chat_ids(engine, messages):
    return engine.tokenizer.encode_chat([{"role": m["role"], "content": m["content"]} for m in messages])


def test_session_turns_commands_interrupt_save_load(engine, tmp_path, monkeypatch):
    engine.reset()
    spy = Spy(engine, monkeypatch, interrupt_call=2, after=4)
    saved = tmp_path / "chat.json"
    system = "Answer in one short sentence."
    keys = ("What is Python?\r" "And what is Rust?\r" "/set temp 0\r" f"/system {system}\r"
            "Tell me about lists.\r" f"/save {saved}\r" "/reset\r" "Hello again.\r" f"/load {saved}\r"
            "Go on.\r" "/stats\r" "/exit\r" "This line is never read.\r")  # fmt: skip
    settings = ChatSettings(SamplingParams(temperature=0.8, seed=7), max_tokens=16)
    repl, out, rc = drive(engine, keys, tmp_path, settings)
    calls = spy.calls
    assert rc == 0 and len(calls) == 5  # /exit ended the session: the last line was never sent
    assert "This line is never read" not in engine.tokenizer.decode(calls[-1]["prompt"])
    # /set temp 0 applies to the replies after it
    assert calls[0]["params"].temperature == 0.8 and calls[0]["params"].seed == 7
    assert all(c["params"].temperature == 0.0 for c in calls[2:]) and "temp = 0\n" in out

    # turn 1 from an empty cache; turn 2 prefills only what is not shared with the cache
    first, second = calls[0], calls[1]
    assert first["cached_before"] == [] and first["stats"].prefilled_tokens == len(first["prompt"])
    # the reply's tokens stayed in the cache (all but the last sampled one, which was never fed back) ...
    assert second["cached_before"] == first["prompt"] + first["tokens"][:-1]
    # ... but only what turn 1's prompt pass computed is reused: the reply is computed again as a prompt pass would
    lcp = min(common_prefix(second["cached_before"], second["prompt"]), len(first["prompt"]))
    st = second["stats"]
    assert lcp > 0 and st.prefilled_tokens == len(second["prompt"]) - lcp and st.reused_tokens == lcp
    assert st.prefilled_tokens < len(second["prompt"]) and lcp == len(first["prompt"])
    assert second["prompt"] == chat_ids(engine, repl_history_at(first, second, engine))
    assert f"({lcp} cached)" in out

    # transcript: every reply streamed, then a status line
    assert len(STATUS.findall(out)) == 5
    for c in calls[:2]:
        assert engine.tokenizer.decode(c["tokens"]) in out

    # /system applies from the next reply and keeps the history
    assert "system prompt set; it applies from the next reply" in out
    text3 = engine.tokenizer.decode(calls[2]["prompt"], skip_special_tokens=False)
    assert f"<<SYS>>\n{system}\n<</SYS>>" in text3 and "What is Python?" in text3 and "And what is Rust?" in text3

    # the interrupted reply: 4 tokens, kept in history and in the saved file, marked interrupted
    assert len(calls[2]["tokens"]) == 4 and calls[2]["stats"].generated_tokens == 4
    partial = engine.tokenizer.decode(calls[2]["tokens"])
    assert f"{partial}\n[interrupted]\n4 tokens | prefill" in out and "| interrupted\n" in out
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert data["format"] == "lowbit-chat" and data["system"] == system and len(data["messages"]) == 6
    assert data["messages"][5] == {"role": "assistant", "content": partial, "interrupted": True}
    assert data["messages"][0] == {"role": "user", "content": "What is Python?"}
    assert f"saved 3 turns to {saved}" in out

    # /reset cleared history and KV cache, kept the system prompt
    assert "conversation cleared" in out and calls[3]["cached_before"] == []
    sys_msg = {"role": "system", "content": system}
    assert calls[3]["prompt"] == chat_ids(engine, [sys_msg, {"role": "user", "content": "Hello again."}])
    assert calls[3]["stats"].prefilled_tokens == len(calls[3]["prompt"])

    # /load brought back the saved conversation (with the partial reply); the next turn continues it
    assert f"loaded 3 turns and its system prompt from {saved}" in out
    assert calls[4]["prompt"] == chat_ids(engine, [sys_msg, *data["messages"], {"role": "user", "content": "Go on."}])
    assert repl.chat.messages[:6] == data["messages"] and len(repl.chat.messages) == 8
    assert "4 turns in history; system prompt set; chat template" in out and "last:     prompt" in out


def test_ctrl_c_during_prefill_keeps_the_cache_consistent(engine, tmp_path, monkeypatch):
    engine.reset()
    spy = Spy(engine, monkeypatch)
    real_forward = engine.model.forward
    fired = []

    def forward(tokens, pos, cache, **kw):
        out = real_forward(tokens, pos, cache, **kw)  # the cache is already overwritten from ``pos`` on
        if len(spy.calls) == 2 and len(tokens) > 1 and not fired:  # the second turn's prefill
            fired.append(pos)
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(engine.model, "forward", forward)
    # /system changes the start of the prompt, so the second prefill rewrites the cache from an early position
    keys = "What is Python?\r/system Be brief.\rAnd Rust?\rAnd Go?\r/exit\r"
    repl, out, rc = drive(engine, keys, tmp_path)
    calls = spy.calls
    assert rc == 0 and len(calls) == 3 and fired
    n = common_prefix(calls[1]["cached_before"], calls[1]["prompt"])
    assert fired == [n] and n < len(calls[1]["cached_before"]) - 10
    assert calls[2]["cached_before"] == calls[1]["prompt"][:n]  # the overwritten old tokens are no longer listed
    assert f"[interrupted]\nstopped while reading the {len(calls[1]['prompt'])}-token prompt" in out
    assert repl.chat.messages[3] == {"role": "assistant", "content": "", "interrupted": True}
    st = calls[2]["stats"]
    assert st.reused_tokens == common_prefix(calls[2]["cached_before"], calls[2]["prompt"]) == n
    assert st.prefilled_tokens == len(calls[2]["prompt"]) - n and len(STATUS.findall(out)) == 2


def repl_history_at(first, second, engine):
    """The conversation the second prompt must render: question 1, the reply as streamed, question 2."""
    reply = engine.tokenizer.decode(first["tokens"])
    return [{"role": "user", "content": "What is Python?"}, {"role": "assistant", "content": reply},
            {"role": "user", "content": "And what is Rust?"}]  # fmt: skip


def test_bad_commands_and_values_give_one_line_hints(engine, tmp_path, monkeypatch):
    spy = Spy(engine, monkeypatch)
    notjson = tmp_path / "bad.json"
    notjson.write_text("{not json", encoding="utf-8")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}), encoding="utf-8")
    cases = [
        ("/foo", "unknown command /foo; type /help"),
        ("/set temp abc", "/set temp: expected a number >= 0 (0 = greedy), got 'abc'"),
        ("/set temp -1", "/set temp: temperature must be >= 0"),
        ("/set top_p 0", "/set top_p: top_p must be in (0, 1], got 0.0"),
        ("/set top_k 1.5", "/set top_k: expected an integer >= 0 (0 = off), got '1.5'"),
        ("/set max_tokens 0", "/set max_tokens: expected an integer from 1 to 1023"),
        ("/set seed -3", "/set seed: seed must be >= 0"),
        ("/set bogus 1", "/set: unknown setting 'bogus'"),
        ("/set temp", "usage: /set temp VALUE"),
        (f"/load {tmp_path / 'missing.json'}", "/load: no such file:"),
        (f"/load {notjson}", f"/load: {notjson} is not valid JSON (line 1"),
        (f"/load {wrong}", f"/load: {wrong} is not a saved conversation (message 1 should be a user message"),
        (f"/load {tmp_path}", f"/load: cannot read {tmp_path}:"),
        (f"/save {tmp_path / 'no' / 'dir' / 'x.json'}", "/save: cannot write"),
        ("/save", "usage: /save [--force] FILE"),
        (f"/save {notjson}", f"/save: {notjson} exists; /save --force {notjson} replaces it"),
        ("/system", "no system prompt"),
        ("/set", "temp=0 top_p=1 top_k=0 min_p=0 repeat_penalty=1 max_tokens=16 seed=none"),
    ]
    repl, out, rc = drive(engine, "".join(f"{c}\r" for c, _ in cases) + "/quit\r", tmp_path)
    lines = out.splitlines()[2:]  # after the two banner lines
    assert rc == 0 and len(lines) == len(cases), out
    for (cmd, want), line in zip(cases, lines):
        assert line.startswith(want), (cmd, line)
    assert spy.calls == [] and repl.chat.messages == []
    assert repl.chat.settings.params == SamplingParams() and repl.chat.settings.max_tokens == 16


def test_help_lists_every_command(engine, tmp_path):
    _, out, rc = drive(engine, "/help\r\x04", tmp_path)
    assert rc == 0
    for usage in ("/help", "/reset", "/system [TEXT|clear]", "/set [KEY VALUE]", "/stats", "/save [--force] FILE",
                  "/load FILE", "/exit", "/show [template]", "Alt-Enter", "Ctrl-C", "Ctrl-D"):  # fmt: skip
        assert usage in out


def test_show_model_template_and_settings(engine, tmp_path):
    _, out, rc = drive(engine, "/show\r/show template\r/show nonsense\r\x04", tmp_path)
    assert rc == 0
    assert f"model:       {engine.path.name}" in out and f"{engine.args.num_hidden_layers} layers" in out
    assert "settings:    temp=" in out and f"KV cache:    {engine.kv.label}, " in out
    from lowbit.kernels.ir.vnni import host_has_byte_dot

    assert f"activations: {'int8' if host_has_byte_dot() else 'exact'}; context" in out  # a 4-bit toy
    assert engine.tokenizer.chat_template.strip().splitlines()[-1].strip() in out  # the whole template
    assert "/show: expected nothing or 'template'" in out


def test_keys_newline_paste_ctrl_c(engine, tmp_path, monkeypatch):
    engine.reset()
    spy = Spy(engine, monkeypatch)
    keys = ("line one\x1b\rline two\r"  # Esc-Enter (what Alt-Enter sends) inserts a newline
            "\x1b[200~pasted one\r\npasted two\x1b[201~\r"  # a bracketed paste of two lines
            "typo\x03"  # Ctrl-C with text: clears the line
            "//etc is a folder\r"  # // sends a literal /
            "\x03"  # Ctrl-C at an empty prompt: a hint, the chat goes on
            "still here\r"
            "\x03\x03"  # twice: exit
            "never sent\r")  # fmt: skip
    repl, out, rc = drive(engine, keys, tmp_path)
    users = [m["content"] for m in repl.chat.messages if m["role"] == "user"]
    assert rc == 0 and users == ["line one\nline two", "pasted one\npasted two", "/etc is a folder", "still here"]
    assert out.count("press Ctrl-C again or Ctrl-D to exit") == 2
    assert len(spy.calls) == 4 and "line one\nline two [/INST]" in engine.tokenizer.decode(spy.calls[0]["prompt"])


def test_input_history_persists_across_sessions(engine, tmp_path, monkeypatch):
    engine.reset()
    spy = Spy(engine, monkeypatch)
    _, _, rc = drive(engine, "first question\r\x04", tmp_path)  # Ctrl-D exits
    assert rc == 0 and "first question" in (tmp_path / "history").read_text(encoding="utf-8")
    repl, _, rc = drive(engine, "\x1b[A\r\x04", tmp_path)  # a new session: Up recalls it, Enter sends it
    assert rc == 0 and repl.chat.messages[0] == {"role": "user", "content": "first question"}
    assert len(spy.calls) == 2 and spy.calls[1]["prompt"] == spy.calls[0]["prompt"]


def test_context_full_drops_oldest_turns_never_system(tmp_path, monkeypatch):
    small = Engine(TOY_MODEL, ctx=160, threads=1)
    spy = Spy(small, monkeypatch)
    questions = ["What is a list?", "What is a dict?", "What is a set?", "What is a tuple?"]
    keys = "".join(f"{q}\r" for q in questions) + "word " * 200 + "\r/exit\r"
    repl, out, rc = drive(small, keys, tmp_path, ChatSettings(max_tokens=48), system="Be brief.")
    calls = spy.calls
    assert rc == 0 and len(calls) == 4  # the over-long message was refused, not sent
    assert all(len(c["prompt"]) + 48 <= 160 for c in calls)
    assert re.search(r"^\d+ tokens \|.*\| dropped the (\d )?oldest turns? to fit the context", out, re.M), out
    last = small.tokenizer.decode(calls[-1]["prompt"], skip_special_tokens=False)
    assert "<<SYS>>\nBe brief.\n<</SYS>>" in last and "What is a list?" not in last and "What is a tuple?" in last
    users = [m["content"] for m in repl.chat.messages if m["role"] == "user"]
    assert users[-1] == "What is a tuple?" and "What is a list?" not in users
    assert "this message with the system prompt takes" in out and "does not fit the context of 160 tokens" in out


def test_plain_completion_mode_without_chat_template(engine, tmp_path, monkeypatch):
    engine.reset()
    monkeypatch.setattr(engine.tokenizer, "chat_template", None)
    spy = Spy(engine, monkeypatch)
    repl, out, rc = drive(engine, "Once upon a time\r/system Be nice.\rThe os module\r/exit\r", tmp_path)
    assert rc == 0 and "no chat template, so this is plain completion mode" in out
    assert "system prompt set, but this model has no chat template, so it is not used" in out
    tok = engine.tokenizer
    assert [c["prompt"] for c in spy.calls] == [tok.encode(t, add_special_tokens=True)
                                                for t in ("Once upon a time", "The os module")]  # fmt: skip
    assert len(repl.chat.messages) == 4


def test_chat_send_restores_history_on_error(engine):
    chat = Chat(engine, ChatSettings(SamplingParams(), max_tokens=8))
    chat.send("Hi")
    before = list(chat.messages)
    chat.settings.params.temperature = -1.0  # bypasses /set validation: the engine refuses it
    with pytest.raises(Exception, match="temperature"):
        chat.send("Again")
    assert chat.messages == before


# ---------------------------------------------------------------------------------------------- real processes
def lowbit(*args, input=None, env_extra=None):
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "lowbit.runtime.cli", "run", str(TOY_MODEL), *map(str, args)]
    return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=120, env=env)


def expected_reply(engine, prompt: str, n: int) -> str:
    engine.reset()
    return Chat(engine, ChatSettings(max_tokens=n)).send(prompt).text


def test_one_shot_prompt_and_piped_stdin(engine, tmp_path):
    res = lowbit("-p", "Explain the asyncio module.", "-n", 8, env_extra={"HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    want = expected_reply(engine, "Explain the asyncio module.", 8)
    assert res.stdout == want + "\n" and len(want) > 10 and res.stderr == ""

    res = lowbit("-n", 8, input="hi\n", env_extra={"HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected_reply(engine, "hi", 8) + "\n" and res.stdout.strip()
    assert not (tmp_path / ".lowbit_history").exists()  # non-interactive runs keep no input history


def test_one_shot_errors(tmp_path):
    res = lowbit("-n", 8, input="")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("lowbit: error: no prompt: stdin was empty")
    res = lowbit("--ctx", 64, "-n", 16, "-p", "word " * 100)
    assert res.returncode == 2 and "does not fit the context of 64 tokens" in res.stderr
    assert "Traceback" not in res.stderr


def test_real_terminal_ctrl_c_stops_reply_then_exits(tmp_path):
    """A real pty: Ctrl-C during a reply is a SIGINT (terminal in cooked mode), at the prompt a key (raw mode)."""
    ansi = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]|\x1b\][^\x07]*\x07|\x1b[=>]|\r")
    env = {**os.environ, "TERM": "xterm-256color", "PROMPT_TOOLKIT_NO_CPR": "1", "NUMBA_NUM_THREADS": "1",
           "HOME": str(tmp_path)}  # fmt: skip
    pid, fd = pty.fork()
    if pid == 0:  # child: the pty is its controlling terminal
        os.execve(sys.executable, [sys.executable, "-m", "lowbit.runtime.cli", "run", str(TOY_MODEL)], env)
    buf = b""

    def expect(pattern: str, timeout: float = 60) -> str:
        nonlocal buf
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = ansi.sub("", buf.decode("utf-8", "replace"))
            if re.search(pattern, text):
                return text
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    buf += os.read(fd, 65536)
                except OSError:
                    break
        raise AssertionError(f"no {pattern!r} in:\n{ansi.sub('', buf.decode('utf-8', 'replace'))}")

    try:
        expect(r">>>")
        os.write(fd, b"Tell me about the os module.\r")
        expect(r"Tell me about the os module\.\n\S.{4}")  # the reply has started streaming
        os.write(fd, b"\x03")
        text = expect(r"\[interrupted\]\n\d+ tokens \|.*\| interrupted\n[\s\S]*>>>")
        os.write(fd, b"\x03")  # Ctrl-C at the empty prompt: a hint
        expect(r"press Ctrl-C again or Ctrl-D to exit[^\n]*\n[\s\S]*>>>")
        time.sleep(0.5)  # the prompt is back (raw mode): the key reaches it, not the terminal's SIGINT
        os.write(fd, b"\x03")  # and again: leaves
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:  # keep draining the pty so the child never blocks on output
                try:
                    buf += os.read(fd, 65536)
                except OSError:
                    pass
        assert done[0] == pid, "lowbit run did not exit after Ctrl-C at the empty prompt"
        status, pid = done[1], 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert "Traceback" not in text and int(re.search(r"(\d+) tokens \|", text).group(1)) < 512
    assert (tmp_path / ".lowbit_history").read_text(encoding="utf-8").count("Tell me about the os module.") == 1


def test_replies_are_word_wrapped_to_the_width(engine, tmp_path):
    """A reply streams word-wrapped to the terminal's width: lines break between words, and the words are the
    reply's own (a pipe, width 0, gets the text as it is)."""
    from lowbit.runtime.cli.wrap import StreamWrap

    engine.reset()
    out = io.StringIO()
    with create_pipe_input() as inp:
        inp.send_text("Tell me about the history of Paris and its river.\r")
        inp.close()
        repl = Repl(engine, ChatSettings(max_tokens=60), out=out, input=inp, output=DummyOutput(),
                    history_file=tmp_path / "history", color=False, width=24)
        repl.run()
    reply = repl.last.text
    shown = out.getvalue()
    words = reply.split()
    start = shown.index(words[0], shown.index("Alt-Enter"))  # after the banner (not wrapped)
    body = shown[start : shown.rindex(words[-1], start, shown.index(" tokens | ", start)) + len(words[-1])]
    assert " ".join(body.split()) == " ".join(words)  # same words, only the breaks differ
    assert all(len(ln) <= 24 for ln in body.split("\n")), body
    assert body.count("\n") >= 2
    # the wrapper alone: fences pass through untouched, words longer than a line are broken
    got = []
    w = StreamWrap(got.append, 12)
    for piece in ["one two three four", " five\n```\nlong_code_line = 1\n```\n", "abcdefghijklmnopq"]:
        w.feed(piece)
    w.close()
    assert "".join(got) == "one two\nthree four\nfive\n```\nlong_code_line = 1\n```\nabcdefghijkl\nmnopq"


def test_first_reply_waits_for_the_warm_up(engine, tmp_path, monkeypatch):
    """The REPL compiles the first reply's kernels in a thread while the first message is typed; the reply starts
    only when that thread is done (one forward pass at a time on the model)."""
    events = []

    def warm_up():
        events.append("warm-up start")
        time.sleep(0.3)
        events.append("warm-up end")

    real_generate = engine.generate

    def generate(*a, **kw):
        events.append("reply")
        return real_generate(*a, **kw)

    monkeypatch.setattr(engine, "warm_up", warm_up)
    monkeypatch.setattr(engine, "generate", generate)
    repl, out, rc = drive(engine, "Hello\r/exit\r", tmp_path)
    assert rc == 0 and events == ["warm-up start", "warm-up end", "reply"]
