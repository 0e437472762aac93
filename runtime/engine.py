"""The engine: load a container (read into memory, or mmap), keep a KV cache, prefill with prefix reuse, decode
one token at a time."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numba
import numpy as np
from numba.core import event as numba_event

from lowbit.errors import ContextOverflowError, FormatError, LowbitError
from lowbit.formats.reader import Container
from lowbit.formats.tokenizer import Tokenizer
from lowbit.kernels import act_quant as act_quant_mode
from lowbit.kernels import compile_ahead, kv_formats
from lowbit.kernels.heap import keep_freed_heap
from lowbit.kernels.kv_formats import KVSpec
from lowbit.models.validate import load_args
from lowbit.runtime.compile_notice import CompileNotice
from lowbit.runtime.constraint import Constraint, GrammarCompiler
from lowbit.runtime.device import resolve_device
from lowbit.runtime.sampling import SamplingParams
from lowbit.runtime.sequence import Event, SequenceState, common_prefix

log = logging.getLogger(__name__)

DEFAULT_CTX = 4096
PREFILL_CHUNK = 512  # prompt tokens per forward pass


def kernel_activations_exact(meta: dict, override: bool | None) -> bool:
    """Whether quantized products take int16-precision activations: ``--exact-activations`` /
    ``--int8-activations`` when given, else what the container asks for (``runtime.kernel_activations``, set by
    ``lowbit convert --exact-activations``), else int8."""
    if override is not None:
        return bool(override)
    runtime = meta.get("runtime")
    return isinstance(runtime, dict) and runtime.get("kernel_activations") == "exact"


def default_model_path() -> Path:
    """The model bundled with the package."""
    return Path(str(resources.files("lowbit") / "default" / "smollm2-135m-instruct.lowbit"))


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads share a core's SIMD units, so the
    kernels gain nothing from them); the logical count where the topology is not readable."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return max(len(cpus), 1)
    return max(len(cores), 1)


def set_threads(threads: int | None) -> int:
    """Set numba's thread count for the calling thread: ``threads``, or the physical core count. Returns it."""
    if threads is not None and threads < 1:
        raise LowbitError(f"--threads must be at least 1, got {threads}")
    if threads is not None and threads > (os.cpu_count() or 1):
        raise LowbitError(f"--threads {threads}: this machine has {os.cpu_count()} logical CPUs")
    n = min(threads or physical_cores(), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    return n


def open_container(path: str | os.PathLike, device: str, threads: int, mmap: bool = False,
                   verify: bool = True) -> Container:
    """The container as the runtime computes from it: on the CPU read into memory by ``threads`` readers (decode
    streams the weights from huge pages, formats/reader.py) unless ``mmap``; on a GPU mapped (weights are uploaded).
    ``verify``: every tensor's CRC32 is checked (while it is read into memory) unless this file, as it is now, passed
    before (verified_stamp); a damaged file is refused with a FormatError."""
    c = Container(path)
    stamp = verified_stamp(c) if verify else None
    check = stamp is not None and not stamp.exists()
    if device == "cpu" and not mmap:
        c.load_into_memory(threads, verify=check)
    elif check:
        c.verify_data(threads)
    if check:
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.touch()
        except OSError as e:  # a read-only cache: verify again next time
            log.info("cannot record that %s passed its checksums (%s)", c.path, e)
    return c


def verified_stamp(c: Container) -> Path | None:
    """The file whose existence records that this container, as it is now (path, inode, size, modification time,
    header checksum), passed its checksums: under $LOWBIT_CACHE (default ~/.cache/lowbit)/verified."""
    try:
        st = os.stat(c.path)
    except OSError:
        return None
    key = f"{c.path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{c.header_crc}"
    root = Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit").expanduser()
    return root / "verified" / hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass
class Stats:
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # tokens actually computed in prefill (prompt minus reused prefix)
    reused_tokens: int = 0
    shifted_tokens: int = 0  # tokens a full context dropped (context_shift)
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""
    stop_sequence: str | None = None  # the stop string that ended the text (finish_reason "stop")

    @property
    def prefill_tps(self) -> float:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # the first generated token comes from the prefill logits
        n = max(self.generated_tokens - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0


def shift_tokens(model, cache, tokens: list[int], keep: int) -> tuple[list[int], int]:
    """Context shift of a cache holding ``tokens``: half of those after the first ``keep`` are dropped (the oldest)
    and the rest move back (Model.shift_cache). Returns (the tokens the cache now holds, how many were dropped)."""
    held = len(tokens)
    keep = max(0, min(keep, held - 2))
    discard = max(1, (held - keep) // 2)
    model.shift_cache(cache, held, keep, discard)
    log.info("context full: dropped %d tokens after the first %d", discard, keep)
    return tokens[:keep] + tokens[keep + discard :], discard


class Engine:
    def __init__(
        self,
        path: str | os.PathLike | None = None,
        ctx: int | None = None,
        threads: int | None = None,
        device: str | None = "cpu",
        act_quant: str | None = "none",
        exact_activations: bool | None = None,
        mmap: bool = False,
        kv: str | KVSpec | None = None,
        context_shift: bool = False,
        verify: bool = True,
    ):
        self.path = Path(path) if path is not None else default_model_path()
        self.device = resolve_device(device)  # "cpu" or "cuda"; nothing CUDA is imported for "cpu"
        self.act_quant = act_quant_mode.check_mode(act_quant)  # int8 activations: none | dynamic | static
        if self.act_quant != "none" and self.device == "cuda":
            raise LowbitError("--act-quant is a CPU compute mode; use --device cpu")
        self.kv = KVSpec.parse(kv)  # the KV cache's storage formats (float16 by default)
        if self.device == "cuda":
            if kv is not None and self.kv != kv_formats.F32:
                raise LowbitError("--kv-bits is a CPU cache format; the cuda backend keeps a float32 cache")
            self.kv = kv_formats.F32
        # a full context drops the oldest half of the conversation after the kept tokens instead of ending
        self.context_shift = bool(context_shift)
        if self.context_shift and self.device == "cuda":
            raise LowbitError("--context-shift needs the CPU backend")
        self.threads = set_threads(threads)
        keep_freed_heap()  # a pass reuses the pages it frees (kernels/heap.py)
        t0 = time.perf_counter()
        self.container = open_container(self.path, self.device, self.threads, mmap, verify)
        meta = self.container.meta
        fam_name, self.family, self.args = load_args(self.container)  # every field and tensor shape checked
        try:
            self.tokenizer = Tokenizer(meta["tokenizer"], self.container.blobs())
        except LowbitError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the tokenizer libraries make of a damaged tokenizer section
            raise FormatError(f"{self.path}: corrupt header (tokenizer: {type(e).__name__} {str(e)[:80]})") from None
        limit = self.args.max_position_embeddings
        self.ctx = min(ctx or DEFAULT_CTX, limit) if ctx is None else ctx
        if self.ctx < 2:
            raise LowbitError("--ctx must be at least 2")
        if self.ctx > limit:
            log.warning("context %d is beyond the model's max_position_embeddings %d", self.ctx, limit)
        if self.device == "cuda":
            from lowbit.models.device_forward import cuda_model

            self.model = cuda_model(fam_name, self.family, self.args, self.container, self.ctx)
        else:
            # a cold start: the attention kernels compile in a helper process while this one builds the model
            # and compiles the rest of the first prompt's kernels
            ahead = compile_ahead.start(self.kv)
            self.model = self.family.Model(self.args, self.container, self.ctx)
            self.model.ops.compile_ahead = ahead
            act_quant_mode.apply(self.model, self.act_quant)
            exact_activations = kernel_activations_exact(meta, exact_activations)
            if exact_activations:
                act_quant_mode.set_kernel_precision(self.model, True)
        self.exact_activations = bool(exact_activations)
        gen = meta.get("generation", {})
        self.eos_ids = set(gen.get("eos_token_ids") or []) | set(self.tokenizer.eos_ids)
        self.generation_defaults = gen.get("defaults", {})
        self.model.kv = self.kv
        self.cache = self.model.new_cache()
        self.cached: list[int] = []  # tokens whose keys/values are in the cache, in order
        # how many of them a prompt pass computed: only those are reused (a decode step's numbers differ from a
        # prompt pass's in the last bits, which int8 activations can carry into a different answer)
        self.prompted = 0
        self.prefill_chunk = PREFILL_CHUNK
        self.load_seconds = time.perf_counter() - t0
        self.stats = Stats()
        self._grammars: GrammarCompiler | None = None
        # told about kernel compiles during forward passes (runtime/compile_notice.py): the CLI sets one
        self.compile_notice: CompileNotice | None = None

    @property
    def grammars(self) -> GrammarCompiler:
        """Compiles grammars and JSON schemas against this model's tokenizer (built on first use)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.args.vocab_size, self.eos_ids)
        return self._grammars

    # ------------------------------------------------------------------------------------------ forward
    def reset(self) -> None:
        self.cached = []
        self.prompted = 0

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Make the cache hold ``tokens``, computing only what is not already cached. Logits for the last token."""
        tokens = list(tokens)
        if not tokens:
            raise LowbitError("empty prompt")
        if len(tokens) > self.ctx:
            raise ContextOverflowError(f"prompt of {len(tokens)} tokens does not fit the context of {self.ctx}")
        # at least the last token runs (its logits); what decode steps computed (a reply) is computed again, as a
        # prompt pass would: a conversation continued from the cache gives the answer a fresh prefill gives
        n = min(common_prefix(self.cached, tokens), len(tokens) - 1, self.prompted)
        if not self.cache.can_rewind(len(self.cached), n):  # a sliding window's ring no longer holds what n needs
            n = 0
        # forward overwrites positions n.. of the cache: forget them first, so a prefill interrupted part-way
        # (Ctrl-C) never leaves old tokens listed whose keys/values are already gone
        self.cached = tokens[:n]
        self.prompted = n
        self.stats.reused_tokens += n
        t0 = time.perf_counter()
        try:
            # in chunks, so activation memory stays bounded however long the prompt (llama.cpp's ubatch)
            for i in range(n, len(tokens), self.prefill_chunk):
                chunk = tokens[i : i + self.prefill_chunk]
                logits = self._forward(chunk, i, prompt=True)
                self.cached = tokens[: i + len(chunk)]
                self.prompted = len(self.cached)
                self.stats.prefilled_tokens += len(chunk)
        finally:
            self.stats.prefill_seconds += time.perf_counter() - t0
        return logits[0]

    def step(self, token: int) -> np.ndarray:
        pos = len(self.cached)
        if pos >= self.ctx:
            raise ContextOverflowError(f"context of {self.ctx} tokens is full")
        logits = self._forward([token], pos)
        self.cached.append(token)
        return logits[0]

    def _forward(self, tokens: list[int], pos: int | None, cache=None, prompt: bool = False) -> np.ndarray:
        cache = self.cache if cache is None else cache
        notice = self.compile_notice
        if notice is None:
            return self.model.forward(np.array(tokens), pos, cache, prompt=prompt)
        with numba_event.install_listener("numba:compile", notice):
            logits = self.model.forward(np.array(tokens), pos, cache, prompt=prompt)
        notice.settle()
        return logits

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) the kernels of a first reply: a prompt pass and decode steps, on
        a cache of their own, so the conversation's cache is untouched. The server calls this before it listens, as
        llama.cpp's does; the REPL while the first message is typed."""
        if self.device != "cpu":
            return
        from lowbit.kernels.dispatch import DECODE_CHUNK, PARALLEL_ROWS, SMALL_BATCH
        from lowbit.models.common import cache_for

        n = min(self.ctx, DECODE_CHUNK + 2)
        cache = cache_for(self.args, n, self.kv)
        prompt = max(2 * SMALL_BATCH, PARALLEL_ROWS)
        passes = [(prompt, 0), (SMALL_BATCH // 2, prompt), (1, prompt + SMALL_BATCH // 2), (1, n - 1)]
        for t, pos in passes:  # a prompt (integer GEMM), a few tokens, one token, one deep (split attention)
            if pos + t <= n:
                self._forward([1] * t, pos, cache)

    def warm_up_batches(self) -> None:
        """Compile (or load from numba's cache) the kernels of a decode pass of several sequences — the server's
        continuous batching: weights packed for batches, attention per segment — on caches of their own. The
        scheduler calls it after packing, before the port answers: without it the first concurrent requests waited
        seconds for the compiler (time to first token p95 ~7 s with eight clients on a cold cache)."""
        if self.device != "cpu":
            return
        from lowbit.models.common import Segments, cache_for

        caches = [cache_for(self.args, 4, self.kv) for _ in range(2)]
        self._forward([1, 1], None, Segments(caches, [0, 0], [1, 1]))

    def keep_tokens(self, ids: Sequence[int], messages: list[dict] | None = None, **template_kwargs) -> int:
        """How many leading tokens of the prompt ``ids`` a context shift keeps: those it shares with the chat's
        leading system messages rendered alone (system prompt, tool definitions), else the BOS token."""
        ids = list(ids)
        bos = 1 if ids and ids[0] == self.tokenizer.bos_id else 0
        lead = []
        for m in messages or []:
            if m.get("role") not in ("system", "developer"):
                break
            lead.append(m)
        if not lead:
            return bos
        try:
            head = self.tokenizer.encode_chat(lead, add_generation_prompt=False, literal_content=True,
                                              **template_kwargs)
        except LowbitError:
            return bos
        return max(bos, common_prefix(head, ids))

    def shift_context(self, keep: int) -> int:
        """Make room in a full cache: drop half of the tokens after the first ``keep`` (llama.cpp's context shift),
        moving the rest back (keys re-rotated). Returns how many were dropped."""
        self.cached, discard = shift_tokens(self.model, self.cache, self.cached, keep)
        self.prompted = min(self.prompted, keep)  # the moved keys are re-rotated: not what a prompt pass makes
        self.stats.shifted_tokens += discard
        return discard

    def logits_all(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position of ``tokens`` from an empty cache: [T, vocab] (for evaluation)."""
        if len(tokens) > self.ctx:
            raise ContextOverflowError(f"{len(tokens)} tokens do not fit the context of {self.ctx}")
        self.cached = []
        self.prompted = 0
        out = self.model.forward(np.array(tokens), 0, self.cache, all_logits=True)
        return out

    # ------------------------------------------------------------------------------------------ generate
    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        if self.context_shift and n_prompt < self.ctx:  # the context moves on: only the prompt must fit
            return
        if n_prompt + max_tokens > self.ctx:
            raise ContextOverflowError(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the context of {self.ctx} tokens; "
                "shorten the prompt, lower max_tokens or raise --ctx"
            )

    def generate(
        self,
        prompt: Sequence[int],
        params: SamplingParams | None = None,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        logprobs: int | None = None,
        continuation: bool = False,
        constraint: Constraint | None = None,
        keep: int = 0,
    ) -> Iterator[Event]:
        """Yield generated tokens with their text (stop strings held back and cut, UTF-8 kept whole).
        ``continuation``: the text continues the prompt's text, so it is decoded after the prompt's last token (its
        first token keeps its leading space); otherwise it is decoded on its own, like a chat reply.
        ``constraint``: only tokens its grammar allows are sampled; generation stops when the grammar is complete.
        ``keep``: with ``context_shift``, the leading tokens (BOS, system prompt) a full context never drops.
        ``self.stats`` holds counts and timings of this call when the iterator ends."""
        params = params or SamplingParams()
        params.validate()
        if max_tokens < 1:
            raise LowbitError("max_tokens must be at least 1")
        prompt = list(prompt)
        self.check_fits(len(prompt), max_tokens)
        self.stats = Stats(prompt_tokens=len(prompt))
        seq = SequenceState(self.tokenizer, self.eos_ids, self.args.vocab_size, prompt, params, max_tokens, stop,
                       logprobs, continuation, constraint)  # fmt: skip
        logits = self.prefill(prompt)
        t0 = time.perf_counter()
        try:
            while True:
                events = seq.step(logits)
                self.stats.generated_tokens = len(seq.generated)
                if seq.done:
                    self.stats.finish_reason = seq.finish_reason
                    self.stats.stop_sequence = seq.stop_sequence
                yield from events
                if seq.done:
                    return
                if len(self.cached) >= self.ctx:  # only with context_shift (check_fits)
                    self.shift_context(keep)
                logits = self.step(seq.generated[-1])
        finally:
            self.stats.decode_seconds = time.perf_counter() - t0
