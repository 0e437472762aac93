"""Paths and helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFSMALL = SHARED / "models" / "refsmall"
DEV_EVAL = SHARED / "data" / "dev-eval.txt"
CALIB = SHARED / "data" / "calib.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja")
