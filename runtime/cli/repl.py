"""`lowbit run`: an interactive chat REPL (prompt_toolkit), or one prompt answered non-interactively.

:class:`Chat` holds the conversation and talks to the engine (no terminal I/O): it renders the history through the
model's chat template, drops the oldest turns when the conversation would no longer fit the context, and streams a
reply. :class:`Repl` is the terminal front end: a prompt_toolkit session for input (injectable input/output, so
tests drive the real session through a pipe), a text stream for the transcript, slash commands
(:mod:`lowbit.runtime.cli.repl_commands`) and a dim status line after each reply.

Prompt caching: the engine keeps the longest common token prefix of its cache and the next prompt, so turn N only
prefills what the template renders after the previous turn's cached tokens (the reply tokens stay cached).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from lowbit.errors import ContextOverflowError, LowbitError
from lowbit.runtime.cli.wrap import StreamWrap
from lowbit.runtime.compile_notice import CompileNotice
from lowbit.runtime.sampling import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512
DEFAULT_HISTORY_FILE = "~/.lowbit_history"
PROMPT = ">>> "
CONTINUATION = "... "
INTERRUPTED = "[interrupted]"

_DIM, _WARN, _BOLD, _RESET = "\x1b[2m", "\x1b[33m", "\x1b[1m", "\x1b[0m"


@dataclass
class ChatSettings:
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = DEFAULT_MAX_TOKENS
    grammar: str | None = None  # every reply follows this grammar (--json-schema / --grammar)


@dataclass
class Reply:
    text: str
    interrupted: bool
    dropped_turns: int
    stats: object  # lowbit.runtime.engine.Stats of this reply
    context_used: int


class Chat:
    """A conversation with a model: system prompt, history, settings and fitting into the context. No terminal I/O.

    ``messages`` alternate user/assistant; an assistant message cut short by Ctrl-C carries ``"interrupted": True``.
    A model without a chat template runs in plain completion mode: each message is continued as plain text and the
    history is kept only for /save.
    """

    def __init__(self, engine, settings: ChatSettings | None = None, system: str | None = None):
        self.engine = engine
        self.settings = settings or ChatSettings()
        self.system = system or None
        self.messages: list[dict] = []
        self.chat_mode = engine.tokenizer.has_chat_template

    @property
    def turns(self) -> int:
        return sum(m["role"] == "user" for m in self.messages)

    def reset(self) -> None:
        self.messages = []
        self.engine.reset()

    def render(self, messages: list[dict]) -> list[int]:
        """Prompt token ids that make the model answer the last (user) message of ``messages``."""
        tok = self.engine.tokenizer
        if not self.chat_mode:
            return tok.encode(messages[-1]["content"], add_special_tokens=True)
        head = [{"role": "system", "content": self.system}] if self.system else []
        # the template sees only role and content (our "interrupted" mark is not for it)
        body = [{"role": m["role"], "content": m["content"]} for m in messages]
        return tok.encode_chat(head + body, add_generation_prompt=True, literal_content=True)

    def prepare(self, text: str) -> tuple[list[int], int]:
        """Prompt ids for a new user message, and how many of the oldest messages must go for it to fit the context.

        Raises ContextOverflowError when even the message alone (with the system prompt) does not fit.
        """
        ctx, max_tokens = self.engine.ctx, self.settings.max_tokens
        new = [{"role": "user", "content": text}]
        starts = [i for i, m in enumerate(self.messages) if m["role"] == "user"] if self.chat_mode else []
        for start in [*starts, len(self.messages)]:
            ids = self.render(self.messages[start:] + new)
            if len(ids) + max_tokens <= ctx:
                return ids, start if self.chat_mode else 0
        what = "this message" + (" with the system prompt" if self.chat_mode and self.system else "")
        raise ContextOverflowError(
            f"{what} takes {len(ids)} tokens; with max_tokens {max_tokens} it does not fit the context of {ctx} "
            "tokens; shorten it, lower max_tokens or raise --ctx"
        )

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """Add a user message and generate the reply, streaming its text to ``on_text``.

        Ctrl-C (KeyboardInterrupt) during generation ends the reply early: the partial reply stays in the history,
        marked interrupted. Any other error leaves the history as it was.
        """
        ids, drop = self.prepare(text)
        before = list(self.messages)
        dropped_turns = sum(m["role"] == "user" for m in self.messages[:drop])
        del self.messages[:drop]
        self.messages.append({"role": "user", "content": text})
        parts: list[str] = []
        interrupted = False
        grammar = self.settings.grammar
        gen = self.engine.generate(
            ids, replace(self.settings.params), max_tokens=self.settings.max_tokens, continuation=not self.chat_mode,
            constraint=self.engine.grammars.compile(grammar) if grammar is not None else None,
        )  # fmt: skip
        try:
            for ev in gen:
                parts.append(ev.text)
                if on_text is not None:
                    on_text(ev.text)
        except KeyboardInterrupt:
            interrupted = True
        except BaseException:
            self.messages = before
            raise
        finally:
            gen.close()
        reply = {"role": "assistant", "content": "".join(parts)}
        if interrupted:
            reply["interrupted"] = True
            log.info("reply interrupted after %d tokens", self.engine.stats.generated_tokens)
        self.messages.append(reply)
        st = self.engine.stats
        return Reply(reply["content"], interrupted, dropped_turns, st, st.prompt_tokens + st.generated_tokens)


def status_line(reply: Reply, ctx: int) -> str:
    st = reply.stats
    if reply.interrupted and not st.generated_tokens:
        parts = [f"stopped while reading the {st.prompt_tokens}-token prompt", f"context {reply.context_used}/{ctx}"]
    else:
        prefill = f"prefill {st.prefilled_tokens} tok at {st.prefill_tps:.0f} tok/s"
        if st.reused_tokens:
            prefill += f" ({st.reused_tokens} cached)"
        parts = [f"{st.generated_tokens} tokens", prefill, f"decode {st.decode_tps:.1f} tok/s",
                 f"context {reply.context_used}/{ctx}"]  # fmt: skip
    if reply.dropped_turns:
        n = reply.dropped_turns
        parts.append(f"dropped the {n} oldest turns to fit the context" if n > 1 else
                     "dropped the oldest turn to fit the context")  # fmt: skip
    if reply.interrupted:
        parts.append("interrupted")
    elif st.finish_reason == "length":
        parts.append("stopped at max_tokens")
    return " | ".join(parts)


def _history(path: str | os.PathLike | None):
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    p = Path(path or DEFAULT_HISTORY_FILE).expanduser()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "ab"):
            pass
    except OSError as e:
        log.warning("cannot use the history file %s (%s); input history will not be kept", p, e.strerror or e)
        return InMemoryHistory()
    return FileHistory(str(p))


def _key_bindings():
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()

    @kb.add("c-c")
    def _ctrl_c(event) -> None:
        buf = event.app.current_buffer
        if buf.text:
            buf.reset()  # clear the line, like a shell
        else:  # Repl.run: the first one at an empty prompt only warns, so a stray Ctrl-C does not end the chat
            event.app.exit(exception=KeyboardInterrupt)

    @kb.add("escape", "enter")
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    return kb


EXIT_HINT = "(press Ctrl-C again or Ctrl-D to exit; the conversation is kept until then)"


class Repl:
    """The interactive chat: reads input with a prompt_toolkit session, writes the transcript to ``out``.

    ``input``/``output`` are prompt_toolkit Input/Output objects (default: the terminal); tests pass
    ``create_pipe_input()`` and ``DummyOutput()``. A ready ``session`` (anything with ``prompt()``) may be given
    instead.
    """

    def __init__(
        self,
        engine,
        settings: ChatSettings | None = None,
        system: str | None = None,
        *,
        out: TextIO | None = None,
        input=None,
        output=None,
        history_file: str | os.PathLike | None = None,
        color: bool | None = None,
        session=None,
        width: int | None = None,
    ):
        self.chat = Chat(engine, settings, system)
        self.out = out if out is not None else sys.stdout
        tty = hasattr(self.out, "isatty") and self.out.isatty()
        if color is None:
            color = "NO_COLOR" not in os.environ and tty
        self.color = color
        # replies are word-wrapped to the terminal's width (0: not wrapped; a pipe gets the text as it is)
        self.width = width if width is not None else (shutil.get_terminal_size().columns if tty else 0)
        self.session = session if session is not None else self._make_session(input, output, history_file)
        self.last: Reply | None = None
        self.running = True
        self._warm_up: threading.Thread | None = None
        self._warm_notice: CompileNotice | None = None

    def _make_session(self, input, output, history_file):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.auto_suggest import AutoSuggestFromHistory

        from lowbit.runtime.cli.repl_commands import SlashCompleter

        return PromptSession(
            [("bold", PROMPT)],
            input=input,
            output=output,
            history=_history(history_file),
            key_bindings=_key_bindings(),
            multiline=False,
            prompt_continuation=CONTINUATION,
            completer=SlashCompleter(),
            complete_while_typing=False,
            auto_suggest=AutoSuggestFromHistory(),
        )

    # ------------------------------------------------------------------------------------------ output
    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        notice = self.chat.engine.compile_notice
        if notice is not None:
            notice.saw(text)

    def _line(self, text: str, code: str) -> None:
        self.write(f"{code}{text}{_RESET}\n" if self.color else f"{text}\n")

    def info(self, text: str) -> None:
        self._line(text, _DIM)

    def error(self, text: str) -> None:
        self._line(text, _WARN)

    # ------------------------------------------------------------------------------------------ loop
    def banner(self) -> None:
        e, s = self.chat.engine, self.chat.settings
        self._line(f"lowbit run: {e.path.name}", _BOLD)
        self.info(f"context {e.ctx} tokens, up to {s.max_tokens} per reply; /help for commands, Ctrl-D to quit, "
                  "Alt-Enter for a new line")  # fmt: skip
        if not self.chat.chat_mode:
            self.error("note: this model has no chat template, so this is plain completion mode: each message is "
                       "continued as plain text, without the chat history")  # fmt: skip

    def run(self) -> int:
        """The read-eval-print loop; returns 0 when the user leaves (/exit, Ctrl-D, Ctrl-C twice at an empty
        prompt)."""
        self.banner()
        # the kernels of a first reply compile (a cold start) or load while the first message is typed
        engine = self.chat.engine
        self._warm_notice = CompileNotice("", stream=io.StringIO(), live=False)  # counts; shows nothing
        self._warm_up = threading.Thread(target=_warm_up, args=(engine, self._warm_notice), name="lowbit-warm-up",
                                         daemon=True)
        self._warm_up.start()
        armed = False
        while self.running:
            try:
                line = self.session.prompt()
            except EOFError:
                break
            except KeyboardInterrupt:
                if armed:
                    break
                armed = True
                self.info(EXIT_HINT)
                continue
            armed = False
            try:
                self.handle(line)
            except KeyboardInterrupt:  # Ctrl-C outside a reply (e.g. during a command): back to the prompt
                self.write("\n")
                self.info(INTERRUPTED)
        return 0

    def _join_warm_up(self) -> None:
        """Before the first reply: the warm-up thread has finished (one forward pass at a time on the model). Said
        only if it is still compiling; Ctrl-C while waiting leaves it to be joined before the next reply."""
        thread = self._warm_up
        if thread is None:
            return
        warm = self._warm_notice
        notice = CompileNotice.for_engine(self.chat.engine)  # kernels the warm-up did not reach still say so
        if thread.is_alive() and (warm.depth or warm.total or warm.kernels):  # compiling, not loading
            self.info(f"compiling kernels for {notice.label} (once per machine; numba caches them)...")
        thread.join()
        self._warm_up = None
        self.chat.engine.compile_notice = notice

    def handle(self, line: str) -> None:
        from lowbit.runtime.cli.repl_commands import dispatch

        text = line.strip()
        if not text:
            return
        try:
            if text.startswith("/") and not text.startswith("//"):
                dispatch(self, text)
            else:
                self.ask(text[1:] if text.startswith("//") else text)
        except LowbitError as e:
            self.error(str(e))

    def ask(self, text: str) -> Reply:
        self._join_warm_up()
        started = []
        wrap = StreamWrap(self.write, self.width)

        def stream(piece: str) -> None:
            started.append(piece)
            wrap.feed(piece)

        try:
            reply = self.chat.send(text, on_text=stream)
        finally:
            wrap.close()
        self.last = reply
        if not reply.text and not reply.interrupted:
            self.info("(empty reply)")
        elif "".join(started) or reply.interrupted:  # (a terminal shows "^C" where Ctrl-C was pressed)
            self.write("\n")
        if reply.interrupted:
            self.info(INTERRUPTED)
        self.info(status_line(reply, self.chat.engine.ctx))
        return reply


# ---------------------------------------------------------------------------------------------- `lowbit run`
def settings_from_args(args, ctx: int) -> ChatSettings:
    params = SamplingParams.from_args(args)
    params.validate()
    max_tokens = args.max_tokens if args.max_tokens is not None else min(DEFAULT_MAX_TOKENS, max(ctx // 2, 1))
    if max_tokens < 1:
        raise LowbitError(f"--max-tokens must be at least 1, got {max_tokens}")
    if max_tokens >= ctx:
        raise LowbitError(f"--max-tokens {max_tokens} leaves no room for a prompt in the context of {ctx} tokens")
    from lowbit.runtime.constraint import grammar_from_files

    grammar = grammar_from_files(getattr(args, "json_schema", None), getattr(args, "grammar", None))
    return ChatSettings(params, max_tokens, grammar)


def answer_once(engine, settings: ChatSettings, system: str | None, prompt: str, out: TextIO) -> int:
    """Non-interactive: stream the reply to ``prompt`` to ``out`` (nothing else), statistics to the log."""
    chat = Chat(engine, settings, system)
    if not chat.chat_mode:
        log.warning("this model has no chat template; continuing the prompt as plain text")

    notice = engine.compile_notice = CompileNotice.for_engine(engine)

    def stream(piece: str) -> None:
        out.write(piece)
        out.flush()
        notice.saw(piece)

    reply = chat.send(prompt, on_text=stream)
    out.write("\n")
    out.flush()
    if reply.interrupted:
        raise KeyboardInterrupt
    log.info("%s", status_line(reply, engine.ctx))
    return 0


def _stdin_prompt() -> str:
    if sys.stdin is None:
        raise LowbitError("no prompt: there is no stdin; pass one with -p TEXT")
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as e:
        raise LowbitError(f"stdin is not valid text ({e.reason})") from None


def _warm_up(engine, notice: CompileNotice) -> None:
    engine.compile_notice = notice
    try:
        engine.warm_up()
    except Exception:  # logged; the first reply then compiles what it needs, and reports any real error
        log.debug("warm-up failed", exc_info=True)


def run_command(args) -> int:
    """``lowbit run``: -p TEXT or text piped on stdin is answered once; otherwise the interactive chat."""
    prompt = args.prompt
    if prompt is None and (sys.stdin is None or not sys.stdin.isatty()):
        prompt = _stdin_prompt()
        if not prompt.strip():
            raise LowbitError("no prompt: stdin was empty (pipe some text in, pass -p TEXT, or run in a terminal)")
        prompt = prompt.strip()
    elif prompt is not None and not prompt.strip():
        raise LowbitError("empty prompt: -p needs some text")
    from lowbit.runtime.engine import Engine  # after the cheap checks: errors come fast
    from lowbit.runtime.store import resolve_model

    engine = Engine(resolve_model(args.model), ctx=args.ctx, threads=args.threads,
                    device=getattr(args, "device", "cpu"), act_quant=getattr(args, "act_quant", "none"),
                    exact_activations=getattr(args, "exact_activations", None), mmap=getattr(args, "mmap", False),
                    kv=getattr(args, "kv_bits", None), verify=getattr(args, "verify", True))
    settings = settings_from_args(args, engine.ctx)
    if settings.grammar is not None:
        engine.grammars.check(settings.grammar)  # a bad grammar fails now, not at the first reply
    if prompt is not None:
        return answer_once(engine, settings, args.system, prompt, sys.stdout)
    return Repl(engine, settings, args.system, history_file=args.history_file).run()
