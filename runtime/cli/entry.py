"""The `lowbit` command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import lowbit
from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")


def _add_runtime_args(p: argparse.ArgumentParser, model_optional: bool = True) -> None:
    p.add_argument("model", nargs="?" if model_optional else None,
                   help="a .lowbit file, or a GGUF file, HF folder or hub id (converted once into the model store, "
                   "$LOWBIT_MODELS or ~/.cache/lowbit/models); default: the bundled model")
    p.add_argument("--ctx", type=int, default=None, help="context length in tokens (default: min(4096, model max))")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    _add_device_arg(p)
    _add_mmap_arg(p)
    _add_verify_arg(p)
    p.add_argument("--act-quant", choices=["none", "dynamic", "static"], default="none",
                   help="int8 activations (quality measurement, not faster): dynamic per-token scales, or static "
                   "calibrated scales (needs a --method smoothquant+... container); default none")
    _add_exact_arg(p)
    _add_kv_arg(p)


def _add_kv_arg(p: argparse.ArgumentParser) -> None:
    from lowbit.kernels.kv_formats import KV_BITS_HELP

    p.add_argument("--kv-bits", default=None, metavar="BITS", help=KV_BITS_HELP)


def _add_context_shift_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context-shift", action="store_true",
                   help="when the context is full, drop the older half of the conversation after the system prompt "
                   "and go on (default: off; a request that cannot fit is refused, nothing is dropped silently)")


def _add_exact_arg(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--exact-activations", dest="exact_activations", action="store_const", const=True, default=None,
                   help="quantized products take int16-precision activations (the float product's quality, up to ~30%% "
                   "slower) instead of int8 ones below 8 bits (default: what the container asks for, else int8)")
    g.add_argument("--int8-activations", dest="exact_activations", action="store_const", const=False,
                   help="int8 activations below 8 bits even where the container asks for exact ones")


def _add_verify_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the tensor checksums a file is checked against on its first load (default: checked "
                   "once per file as it is now, then remembered under ~/.cache/lowbit/verified)")


def _add_mmap_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mmap", action="store_true",
                   help="compute from the file's mapping instead of reading it into memory (huge pages) at load: "
                   "less memory when several processes share one model, slower decode where the page cache maps the "
                   "file in small pages")


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="cpu (default), cuda (NVIDIA GPU, needs the cuda extra), auto (cuda when usable, else cpu)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: off)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens whose probability reaches p (default 1.0: off)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than p times the most likely one (default 0.0: off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already seen by this (default 1.0: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh one each run)")


def _add_constraint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json-schema", default=None, metavar="FILE",
                   help="replies are JSON valid under this JSON schema file (default: free text)")
    g.add_argument("--grammar", default=None, metavar="FILE",
                   help="replies follow this grammar: Lark in llguidance's dialect, or llama.cpp GBNF (default: none)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lowbit", description="Quantize and run LLMs locally.")
    ap.add_argument("-v", "--verbose", action="store_true", help="show diagnostic logging")
    # -v after the sub-command too (SUPPRESS: not given there leaves the top-level value alone)
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="show diagnostic logging")
    ap.add_argument("--version", action="version", version=f"lowbit {lowbit.__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "convert", parents=[verbose], help="convert a Hugging Face checkpoint or a GGUF file into a .lowbit container"
    )
    p.add_argument("source", help="local checkpoint folder, hub repo id (org/name), or a .gguf file")
    p.add_argument("-o", "--output", required=True, help="output .lowbit file (an existing file needs --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output file (never a source file)")
    p.add_argument("--bits", type=int, default=None,
                   help="2, 3, 4, 5, 6, 8; 16 keeps weights unquantized (default 4; a GGUF keeps its own types unless "
                   "a quantization option is given)")
    p.add_argument("--float-type", choices=["bf16", "f16"], default=None,
                   help="with --bits 16: write every matrix as bfloat16 or float16, rounded to nearest (default: "
                   "the source's own type; float32 stays float32)")
    p.add_argument("--group-size", type=int, default=None,
                   help="32, 64, 128, 0 for per-channel, or -1 for per-tensor (one scale per matrix) (default 32 "
                   "at 4 bits, else 64)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="asym", action="store_false", default=None,
                   help="symmetric groups (no min; the default at 8 bits)")
    g.add_argument("--asym", dest="asym", action="store_true",
                   help="asymmetric groups (fp16 min per group; the default below 8 bits)")
    p.add_argument("--scale-bits", type=int, default=None, choices=(16, 8),
                   help="bits per group scale (and min): 16 stores float16, 8 codes them on a per-matrix grid "
                   "(4-bit groups of 32 in 4.5 instead of 5.0 bits per weight; the ..s8 types, 2-5 bits) (default 8 "
                   "with --target-bpw/--max-size, else 16)")
    p.add_argument("--gguf-compatible", action="store_true",
                   help="only types that `lowbit export` writes to GGUF exactly (groups of 32; 4, 5 or 8 bits; no min "
                   "at 8), so that llama.cpp computes this file's numbers (default: off)")
    p.add_argument("--embed-bits", type=int, default=None,
                   help="bits for embeddings and lm_head (default 6, or --bits where that is more)")
    p.add_argument(
        "--method",
        default="auto",
        help="quantization method: steps joined by '+' from rtn, search, imatrix, gptq, awq, hadamard, smoothquant, "
        "lowrank, tune (e.g. gptq, awq+gptq, hadamard+gptq+lowrank, smoothquant+rtn, gptq+tune: tuned after "
        "conversion, needs --calib and PyTorch); auto (default): search, or the best measured calibrated method "
        "with --target-bpw/--max-size",
    )
    p.add_argument("--calib", default=None, help="calibration text file (default: text sampled from the model)")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration sequences (default 64)")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampled calibration text and rotations (default 0)")
    p.add_argument("--lowrank-bpw", type=float, default=0.0,
                   help="extra bits per weight for the low-rank correction (method step lowrank; default 0)")
    p.add_argument("--tune-seconds", type=float, default=600.0,
                   help="time budget of the method step tune, in seconds (default 600)")
    p.add_argument("--target-bpw", type=float, default=None,
                   help="mixed precision: choose per-tensor types to fit this many bits per weight over all tensors "
                        "(default: off, one type)")
    p.add_argument("--max-size", type=int, default=None,
                   help="mixed precision: ... or a file of at most this many bytes, header and tokenizer "
                        "included (default: off)")
    p.add_argument("--recipe", default=None,
                   help="JSON file of tensor name -> quant type to use (inspect --save-recipe writes one; default: "
                        "none)")
    p.add_argument("--exact-activations", action="store_true",
                   help="record in the container that its products should take int16-precision activations by "
                   "default (run/generate/serve/eval; --int8-activations overrides): for models whose answers "
                   "int8 activations change (default: exact for a GGUF whose weights are kept, else int8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown on a terminal)")

    p = sub.add_parser("generate", parents=[verbose], help="continue a prompt and print tokens/s")
    _add_runtime_args(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt (a user message unless --raw)")
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--raw", action="store_true", help="plain completion: do not apply the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (chat template mode; default: none)")
    p.add_argument("--stop", action="append", default=[],
                   help="stop string (repeatable; default: only the model's end-of-turn tokens)")
    _add_context_shift_arg(p)
    _add_sampling_args(p)
    _add_constraint_args(p)

    p = sub.add_parser("run", parents=[verbose], help="interactive chat with a model (REPL)")
    _add_runtime_args(p)
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt, print the reply and exit")
    p.add_argument("--system", default=None, help="system prompt (default: none)")
    p.add_argument(
        "-n", "--max-tokens", type=int, default=None, help="most tokens per reply (default 512, at most half the ctx)"
    )
    p.add_argument("--history-file", default=None, help="input history file (default ~/.lowbit_history)")
    _add_sampling_args(p)
    _add_constraint_args(p)

    p = sub.add_parser("serve", parents=[verbose], help="OpenAI-compatible HTTP server")
    _add_runtime_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require this bearer token (Authorization: Bearer / x-api-key; default: none, fine on "
                        "loopback)")
    p.add_argument("--parallel", type=int, default=4,
                   help="most requests generated at once, batched in one forward pass per step (default 4)")
    p.add_argument("--cache-ram", type=int, default=2048, metavar="MIB",
                   help="MiB of keys/values idle conversations keep for prompt reuse (default 2048)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; beyond, 503 at once (default 64)")
    p.add_argument("--cors", action="append", default=None, metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000) call the server (repeatable; "
                   "default: none)")
    p.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: file stem)")
    _add_context_shift_arg(p)

    p = sub.add_parser(
        "bench", parents=[verbose], help="speed and memory: prefill, decode vs the bandwidth roofline, RSS, start-up"
    )
    p.add_argument("model", nargs="?", help="a .lowbit file (default: a random-weight model of --shape)")
    p.add_argument("--shape", default=None, help="random-weight model shape: smollm2-135m (default), smollm2-360m, "
                   "llama3.2-1b, tinyllama-1.1b")
    p.add_argument("--bits", default="4", help="bits for --shape, comma-separated for several rows (default 4)")
    p.add_argument("--group-size", type=int, default=64, help="group size for --shape (default 64)")
    p.add_argument("--prompt", type=int, default=512, help="prefill tokens (default 512)")
    p.add_argument("--gen", type=int, default=128, help="decode tokens (default 128)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-start (empty numba cache) measurement")
    _add_mmap_arg(p)
    _add_exact_arg(p)
    p.add_argument("--kv-bits", action="append", default=None, metavar="BITS",
                   help="KV cache as in run (16, 32, 8, 4, k8,v4; default 16); repeat for one row each")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="cpu (default), cuda (decode against the GPU's memory bandwidth; needs a real GPU) or auto")
    p.add_argument("--workdir", default="~/.cache/lowbit/bench",
                   help="where random-weight containers are kept (default ~/.cache/lowbit/bench)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("list", parents=[verbose], help="list the models in the local model store")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = sub.add_parser("rm", parents=[verbose], help="remove a model from the local model store")
    p.add_argument("name", help="a name `lowbit list` shows")

    p = sub.add_parser("inspect", parents=[verbose], help="show what is inside a .lowbit file")
    p.add_argument("model", nargs="?", help="a .lowbit file, or a GGUF / HF folder / hub id through the model store "
                   "(default: the bundled model)")
    p.add_argument("--verify", action="store_true", help="check every CRC32")
    p.add_argument("--tensors", action="store_true", help="list every tensor (default: a summary per kind)")
    p.add_argument("--save-recipe", default=None, metavar="FILE",
                   help="write the tensor -> quant type recipe as JSON (reuse with convert --recipe)")
    p.add_argument("--force", action="store_true", help="replace an existing --save-recipe file (never the model)")

    p = sub.add_parser("tune", parents=[verbose],
                       help="quantization-aware tuning: learn a quantized file's scales and mins from its float model")
    p.add_argument("model", help="a .lowbit file (quantized)")
    p.add_argument("-o", "--output", required=True, help="output .lowbit file (an existing file needs --force)")
    p.add_argument("--calib", required=True, help="calibration text file")
    p.add_argument("--teacher", default=None,
                   help="the float checkpoint the file was converted from (default: the file's recorded source)")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--steps", type=int, default=64, help="most optimizer steps per block (default 64)")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate of the log-scales (default 0.005)")
    p.add_argument("--time-budget", type=float, default=600.0,
                   help="seconds for the whole run; blocks get the steps that fit (default 600)")
    p.add_argument("--e2e-share", type=float, default=1.0,
                   help="share of the time budget for the end-to-end stage after the block stage: all scales learn "
                   "together from the logits' KL (0: blocks only, 0.5: half each; default 1: end to end only)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--force", action="store_true", help="replace an existing output file (never the input)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")

    p = sub.add_parser("export", parents=[verbose],
                       help="write a .lowbit file as a GGUF for llama.cpp, Ollama and LM Studio")
    p.add_argument("model", help="a .lowbit file")
    p.add_argument("-o", "--output", required=True,
                   help="output .gguf file, or folder for compressed-tensors (an existing one needs --force)")
    p.add_argument("--format", default="gguf", metavar="{gguf,compressed-tensors}",
                   help="gguf (llama.cpp, Ollama, LM Studio) or compressed-tensors (a Hugging Face checkpoint for vLLM "
                   "and transformers; symmetric 4- and 8-bit files); default gguf")
    p.add_argument("--strict", action="store_true",
                   help="refuse unless every tensor keeps lowbit's numbers exactly (default: tensors without an exact "
                   "GGUF type are re-quantized to Q8_0, and the report says which)")
    p.add_argument("--force", action="store_true", help="replace an existing output file (never the model)")

    p = sub.add_parser(
        "eval", parents=[verbose], help="perplexity on a text file; KL and top-1 agreement against a reference"
    )
    _add_runtime_args(p)
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--eval-ctx", type=int, default=256, help="window length incl. BOS (default 256)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="only the first N tokens of the text (default: all of it)")
    p.add_argument("--stride", type=int, default=None,
                   help="start a window every N tokens, scoring only tokens not scored before (default: ctx-1, "
                   "non-overlapping windows)")
    p.add_argument("--reference", default=None, metavar="SRC", help="also compare with this model (a .lowbit file, "
                   "or a Hugging Face checkpoint run unquantized): KL divergence and top-1 agreement")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser(
        "compare", parents=[verbose], help="convert a checkpoint several ways; one table of size, quality and speed"
    )
    p.add_argument("source", help="local checkpoint folder or hub repo id (org/name)")
    p.add_argument("--configs", default=None, help="comma-separated METHOD:BITS[:GROUP][:OPTION...] items, e.g. "
                   "rtn:4:g64,gptq:3:g64,awq+gptq:4:g128:sym,mixed:2.5bpw,f16 (see the README)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="a named set of configurations (added to --configs): seeds, the twelve approaches of the seed "
                   "articles (static/dynamic PTQ, tuning, symmetric, asymmetric, per-tensor, per-channel, group-wise, "
                   "weight-only, activation-aware, low-rank, extreme 2-bit) at --preset-bits; its tuning rows need "
                   "--calib")
    p.add_argument("--preset-bits", default="8,4,3,2", help="bit-widths of --preset's rows (default 8,4,3,2)")
    p.add_argument("--tune-seconds", type=float, default=600.0,
                   help="time budget of each configuration's tune step, in seconds (default 600)")
    p.add_argument("--text", required=True, help="UTF-8 text file to evaluate on")
    p.add_argument("--eval-ctx", type=int, default=256, help="window length incl. BOS (default 256)")
    p.add_argument("--max-tokens", type=int, default=32768, help="only the first N tokens of the text (default 32768)")
    p.add_argument("--calib", default=None, help="calibration text for every config (default: sampled from the model)")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration sequences (default 64)")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    p.add_argument("--seed", type=int, default=0, help="calibration seed (default 0)")
    p.add_argument("--out-dir", default=None, help="containers and results (default ./compare-<source name>)")
    p.add_argument("--keep-models", action="store_true", help="keep the converted containers in --out-dir")
    p.add_argument("--force", action="store_true", help="replace containers and results already in --out-dir")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens for decode tok/s; 0 skips it (default 32)")
    _add_exact_arg(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from lowbit.runtime.cli import commands

    handler = getattr(commands, f"cmd_{args.command}")
    prev = signal.signal(signal.SIGTERM, _sigterm)
    try:
        return handler(args) or 0
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except Terminated:  # SIGTERM: a server's normal way to stop
        if args.command == "serve":
            return 0
        print("lowbit: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    finally:
        signal.signal(signal.SIGTERM, prev)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so that the same clean-up runs (temporary files, the server)."""


def _sigterm(signum, frame):
    raise Terminated

