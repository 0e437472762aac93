"""Slash commands of the `lowbit run` REPL: /help, /reset, /system, /set, /stats, /save, /load, /exit.

Every handler takes the :class:`~lowbit.runtime.cli.repl.Repl` and the argument text. Bad input raises
:class:`CommandError`, which the REPL shows as one line; nothing here prints a traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from prompt_toolkit.completion import Completer, Completion

from lowbit.errors import LowbitError

if TYPE_CHECKING:
    from lowbit.runtime.cli.repl import Repl

log = logging.getLogger(__name__)

SAVE_FORMAT = "lowbit-chat"
SAVE_VERSION = 1


class CommandError(LowbitError):
    """A slash command was misused; the message is the one-line hint shown to the user."""


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    help: str
    fn: Callable[[Repl, str], None]
    aliases: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------------ /set
# user-facing key -> (SamplingParams field or "max_tokens", parser)
def _float(v: str) -> float:
    return float(v)


def _int(v: str) -> int:
    return int(v)


def _seed(v: str) -> int | None:
    return None if v.lower() in ("none", "off", "random") else int(v)


SETTINGS: dict[str, tuple[str, Callable[[str], object], str]] = {
    "temp": ("temperature", _float, "a number >= 0 (0 = greedy)"),
    "top_p": ("top_p", _float, "a number in (0, 1]"),
    "top_k": ("top_k", _int, "an integer >= 0 (0 = off)"),
    "min_p": ("min_p", _float, "a number in [0, 1]"),
    "repeat_penalty": ("repetition_penalty", _float, "a number > 0 (1 = off)"),
    "max_tokens": ("max_tokens", _int, "an integer >= 1"),
    "seed": ("seed", _seed, "an integer >= 0, or none"),
}
SETTING_ALIASES = {"temperature": "temp", "repetition_penalty": "repeat_penalty", "n": "max_tokens"}


def settings_text(repl: Repl) -> str:
    s = repl.chat.settings
    p = s.params
    seed = "none" if p.seed is None else p.seed
    return (
        f"temp={p.temperature:g} top_p={p.top_p:g} top_k={p.top_k} min_p={p.min_p:g} "
        f"repeat_penalty={p.repetition_penalty:g} max_tokens={s.max_tokens} seed={seed}"
    )


def cmd_set(repl: Repl, arg: str) -> None:
    parts = arg.split()
    if not parts:
        repl.info(settings_text(repl))
        return
    key = SETTING_ALIASES.get(parts[0].lower().replace("-", "_"), parts[0].lower().replace("-", "_"))
    if key not in SETTINGS:
        raise CommandError(f"/set: unknown setting {parts[0]!r}; one of: {', '.join(SETTINGS)}")
    if len(parts) != 2:
        raise CommandError(f"usage: /set {key} VALUE ({SETTINGS[key][2]})")
    field_name, parse, expected = SETTINGS[key]
    try:
        value = parse(parts[1])
    except ValueError:
        raise CommandError(f"/set {key}: expected {expected}, got {parts[1]!r}") from None
    settings = repl.chat.settings
    if key == "max_tokens":
        ctx = repl.chat.engine.ctx
        if not 1 <= value < ctx:
            raise CommandError(f"/set max_tokens: expected an integer from 1 to {ctx - 1} (the context is {ctx})")
        settings.max_tokens = value
    else:
        params = replace(settings.params, **{field_name: value})
        try:
            params.validate()
        except LowbitError as e:
            raise CommandError(f"/set {key}: {str(e).removeprefix('sampling: ')}") from None
        settings.params = params
    shown = "none" if value is None else f"{value:g}" if isinstance(value, float) else value
    repl.info(f"{key} = {shown}")


# ------------------------------------------------------------------------------------------------------ others
def cmd_help(repl: Repl, arg: str) -> None:
    repl.info(help_text())


def help_text() -> str:
    width = max(len(c.usage) for c in COMMANDS)
    lines = ["Commands:"]
    for c in COMMANDS:
        alias = f" (also {', '.join('/' + a for a in c.aliases)})" if c.aliases else ""
        lines.append(f"  {c.usage:<{width}}  {c.help}{alias}")
    lines += [
        "Keys:",
        "  Enter sends; Alt-Enter (or Esc then Enter) starts a new line; pasted text may span lines",
        "  Ctrl-C stops a reply (kept, marked interrupted) or clears the line; on an empty line it exits",
        "  Ctrl-D on an empty line exits",
        "  Up/Down browse input history (kept across sessions); Tab completes commands",
        "Start a message with // to send text that begins with /.",
    ]
    return "\n".join(lines)


def cmd_reset(repl: Repl, arg: str) -> None:
    repl.chat.reset()
    repl.last = None
    repl.info("conversation cleared (history and KV cache); system prompt and settings kept")


def cmd_system(repl: Repl, arg: str) -> None:
    chat = repl.chat
    if not arg:
        repl.info(f"system prompt: {chat.system}" if chat.system else "no system prompt (set one with /system TEXT)")
        return
    chat.system = None if arg == "clear" else arg
    done = "system prompt cleared" if chat.system is None else "system prompt set"
    if not chat.chat_mode:
        repl.info(f"{done}, but this model has no chat template, so it is not used")
    elif chat.messages:
        repl.info(f"{done}; it applies from the next reply (history kept, /reset to start over)")
    else:
        repl.info(done)


def cmd_stats(repl: Repl, arg: str) -> None:
    chat, engine = repl.chat, repl.chat.engine
    lines = [
        f"model:    {engine.path.name} ({engine.path}); context {engine.ctx} tokens; "
        f"{engine.threads} thread{'s' if engine.threads != 1 else ''}",
        f"chat:     {chat.turns} turns in history; system prompt {'set' if chat.system else 'none'}; "
        f"{'chat template' if chat.chat_mode else 'plain completion mode'}; "
        f"{len(engine.cached)} tokens in the KV cache",
        f"settings: {settings_text(repl)}",
    ]
    if repl.last is not None:
        st = repl.last.stats
        lines += [
            f"last:     prompt {st.prompt_tokens} tokens ({st.prefilled_tokens} computed, {st.reused_tokens} reused "
            f"from the cache) at {st.prefill_tps:.1f} tok/s; {st.generated_tokens} generated at "
            f"{st.decode_tps:.1f} tok/s; finish: {'interrupted' if repl.last.interrupted else st.finish_reason}",
        ]
    repl.info("\n".join(lines))


def _activations(engine) -> str:
    """What the products multiply: exact, or the rounding the default kernels apply (int8 for quantized weights on
    the byte dot product, bfloat16 for bfloat16 weights on the pair dot product)."""
    if engine.exact_activations:
        return "exact (int16 precision)"
    from lowbit.kernels.act_quant import linear_weights

    ws = linear_weights(engine.model) if engine.device == "cpu" else []
    kinds = ["int8"] if any(w.act_mode == "int8" for w in ws) else []
    kinds += ["bfloat16"] if any(w.bf16_dot for w in ws) else []
    return " and ".join(kinds) or "exact"


def cmd_show(repl: Repl, arg: str) -> None:
    """/show: the model (architecture, size, quantization, activations), the chat template's head and the settings;
    /show template: the whole chat template."""
    engine = repl.chat.engine
    template = engine.tokenizer.chat_template
    what = arg.strip()
    if what == "template":
        repl.info(template if template else "this model has no chat template (plain completion mode)")
        return
    if what not in ("", "model"):
        raise CommandError(f"/show: expected nothing or 'template', got {what!r}")
    meta = engine.container.meta
    arch = meta.get("architecture", {})
    a = engine.args
    q = meta.get("quantization", {})
    size = engine.path.stat().st_size if engine.path.exists() else 0
    head = (template or "").strip().splitlines()[:3]
    kv_mib = getattr(engine.cache, "full_nbytes", engine.cache.nbytes) / 2**20  # with the whole context written
    lines = [
        f"model:       {engine.path.name} ({size / 1e6:.1f} MB)",
        f"arch:        {arch.get('model_type')} ({arch.get('family')}): {a.num_hidden_layers} layers, hidden "
        f"{a.hidden_size}, {a.num_attention_heads} heads ({a.num_key_value_heads} kv), vocab {a.vocab_size}, "
        f"max context {a.max_position_embeddings}",
        f"quantized:   {q.get('method', '?')}, {q.get('bits', '?')} bits"
        + (f", group {q['group_size']}" if q.get("group_size") else ""),
        f"activations: {_activations(engine)}; context {engine.ctx}; "
        f"{engine.threads} thread{'s' if engine.threads != 1 else ''}",
        f"KV cache:    {engine.kv.label}, {kv_mib:.1f} MiB for the context",
        "template:    " + (" / ".join(head) + (" ..." if template and len(template.splitlines()) > 3 else "")
                          if template else "none (plain completion mode)"),
        f"settings:    {settings_text(repl)}",
    ]
    repl.info("\n".join(lines))


def cmd_save(repl: Repl, arg: str) -> None:
    force = arg.startswith("--force ")
    arg = arg.removeprefix("--force ").strip() if force else arg
    if not arg:
        raise CommandError("usage: /save [--force] FILE")
    path = Path(arg).expanduser()
    if path.exists() and not force:
        raise CommandError(f"/save: {path} exists; /save --force {arg} replaces it")
    chat = repl.chat
    data = {
        "format": SAVE_FORMAT,
        "version": SAVE_VERSION,
        "model": chat.engine.path.name,
        "system": chat.system,
        "messages": chat.messages,
    }
    try:
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as e:
        raise CommandError(f"/save: cannot write {path}: {e.strerror or e}") from None
    repl.info(f"saved {chat.turns} turns to {path}")


def read_conversation(path: Path) -> tuple[str | None, list[dict]]:
    """(system prompt, messages) from a file written by /save (or a plain list of role/content messages)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CommandError(f"/load: no such file: {path}") from None
    except OSError as e:
        raise CommandError(f"/load: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise CommandError(f"/load: {path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise CommandError(f"/load: {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    bad = f"/load: {path} is not a saved conversation"
    system = None
    if isinstance(data, dict):
        system = data.get("system")
        messages = data.get("messages")
    else:
        messages = data
    if not isinstance(messages, list):
        raise CommandError(f"{bad} (expected a 'messages' list)")
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        system, messages = messages[0].get("content"), messages[1:]
    if system is not None and not isinstance(system, str):
        raise CommandError(f"{bad} ('system' must be text)")
    out = []
    for i, m in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != want or not isinstance(m.get("content"), str):
            raise CommandError(f"{bad} (message {i + 1} should be a {want} message with text content)")
        msg = {"role": want, "content": m["content"]}
        if want == "assistant" and m.get("interrupted") is True:
            msg["interrupted"] = True
        out.append(msg)
    if len(out) % 2:
        raise CommandError(f"{bad} (it ends with a user message that has no reply)")
    return system or None, out


def cmd_load(repl: Repl, arg: str) -> None:
    if not arg:
        raise CommandError("usage: /load FILE")
    path = Path(arg).expanduser()
    system, messages = read_conversation(path)
    repl.chat.system = system
    repl.chat.messages = messages
    repl.last = None
    note = " and its system prompt" if system else ""
    repl.info(f"loaded {len(messages) // 2} turns{note} from {path}")


def cmd_exit(repl: Repl, arg: str) -> None:
    repl.running = False


COMMANDS: tuple[Command, ...] = (
    Command("help", "/help", "show this help", cmd_help, ("?",)),
    Command("reset", "/reset", "clear the conversation and the KV cache", cmd_reset, ("clear",)),
    Command("system", "/system [TEXT|clear]", "show, set or clear the system prompt", cmd_system),
    Command("set", "/set [KEY VALUE]", f"show or change a setting: {', '.join(SETTINGS)}", cmd_set),
    Command("stats", "/stats", "model, context use, settings and the last reply's speed", cmd_stats),
    Command("show", "/show [template]", "the model, its chat template and the settings", cmd_show),
    Command("save", "/save [--force] FILE", "save the conversation as JSON (--force replaces a file)", cmd_save),
    Command("load", "/load FILE", "load a conversation saved with /save", cmd_load),
    Command("exit", "/exit", "leave; Ctrl-D works too", cmd_exit, ("quit", "bye")),
)
_BY_NAME = {name: c for c in COMMANDS for name in (c.name, *c.aliases)}


def dispatch(repl: Repl, line: str) -> None:
    """Run one slash command line (``line`` starts with "/")."""
    name, _, arg = line[1:].partition(" ")
    if "\n" in name:  # "/save\nfile" from a paste: treat any whitespace as the separator
        name, _, rest = name.partition("\n")
        arg = rest + arg
    cmd = _BY_NAME.get(name.lower())
    if cmd is None:
        raise CommandError(f"unknown command /{name}; type /help for the list (start with // to send a literal /)")
    cmd.fn(repl, arg.strip())


class SlashCompleter(Completer):
    """Tab completion for command names and /set keys."""

    def get_completions(self, document, complete_event) -> Iterator[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        if " " not in text:
            for c in COMMANDS:
                if c.name.startswith(text[1:].lower()):
                    yield Completion("/" + c.name, start_position=-len(text), display_meta=c.help)
        elif text.startswith("/set ") and text.count(" ") == 1:
            prefix = text[5:]
            for key in SETTINGS:
                if key.startswith(prefix):
                    yield Completion(key, start_position=-len(prefix))
