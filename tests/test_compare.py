"""`lowbit compare`: the config grammar, clean errors, and an end-to-end run on a tiny model whose numbers must equal
what runtime.measure.evaluate gives on the same containers."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import sys
from pathlib import Path

import pytest
from lbtest import CALIB, DEV_EVAL, assert_clean_error, run_cli

from lowbit.convert import converter
from lowbit.errors import LowbitError
from lowbit.runtime.cli import main
from lowbit.runtime.engine import Engine
from lowbit.runtime.measure import compare_report
from lowbit.runtime.measure import evaluate as ev
from lowbit.runtime.measure.configs import parse_configs

CTX = 32
MAX_TOKENS = 200  # 6 windows of 31 scored tokens
CONFIGS = "rtn:8,search:4:g32,rtn:2:pc,search:8:pt,f16"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("text") / "t.txt"
    f.write_text(DEV_EVAL.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    return f


def _argv(src, text, out, configs=CONFIGS, *extra) -> list[str]:
    return ["compare", str(src), "--configs", configs, "--text", str(text), "--eval-ctx", str(CTX), "--max-tokens",
            str(MAX_TOKENS), "--decode-tokens", "8", "--threads", "1", "--out-dir", str(out), *extra]


# ------------------------------------------------------------------------------------------------ grammar
def test_parse_configs_labels_and_options():
    got = {c.label: c for c in parse_configs(
        "rtn:4, gptq:3:g128:sym:embed=4, hadamard+gptq+lowrank:2:pc:lowrank=0.1, mixed:2.5bpw, mixed:12MB:rtn:g32, 16",
        converter.ConvertOptions(calib="c.txt", seed=7))}
    assert list(got) == ["rtn:4:g64", "gptq:3:g128:sym:embed=4", "hadamard+gptq+lowrank:2:pc:lowrank=0.1",
                         "mixed:2.5bpw", "mixed:12MB:rtn:g32", "f16"]
    o = got["gptq:3:g128:sym:embed=4"].opts
    assert (o.bits, o.group_size, o.asym, o.embed_bits, o.method, o.calib, o.seed) == (3, 128, False, 4, "gptq",
                                                                                       "c.txt", 7)
    assert got["hadamard+gptq+lowrank:2:pc:lowrank=0.1"].opts.group_size == 0
    assert got["hadamard+gptq+lowrank:2:pc:lowrank=0.1"].opts.lowrank_bpw == 0.1
    assert parse_configs("gptq:4:pt", converter.ConvertOptions())[0].opts.group_size == -1
    s8 = parse_configs("search:4:g32:scales=8", converter.ConvertOptions())[0]
    assert s8.label == "search:4:g32:scales=8" and s8.opts.scale_bits == 8 and s8.opts.scale_width == 8
    assert got["mixed:2.5bpw"].opts.scale_width == 8 and got["rtn:4:g64"].opts.scale_width == 16
    assert got["mixed:2.5bpw"].opts.target_bpw == 2.5 and got["mixed:2.5bpw"].method == "mixed"
    assert got["mixed:12MB:rtn:g32"].opts.max_size == 12_000_000 and got["mixed:12MB:rtn:g32"].method == "mixed(rtn)"
    assert got["f16"].opts.bits == 16 and got["f16"].opts.calib == "c.txt"
    assert got["gptq:3:g128:sym:embed=4"].shown_method == "gptq (sym, embed=4)"
    assert len({c.slug for c in got.values()}) == len(got)


@pytest.mark.parametrize("spec, needle", [
    ("rtn:7", "config 'rtn:7': bits '7'"),
    ("gptx:4", "unknown method step 'gptx'"),
    ("rtn:4:g48", "unknown group 'g48'"),
    ("rtn:4,rtn:4:g64", "config 'rtn:4:g64' is the same as 'rtn:4'"),
    ("f16,16", "is the same as 'f16'"),
    ("rtn", "expected METHOD:BITS"),
    ("rtn:4,,search:4", "empty item"),
    ("rtn:4:lowrank=0.1", "needs the lowrank method step"),
    ("gptq+lowrank:4:lowrank=x", "lowrank=x: expected a positive number"),
    ("rtn:4:embed=7", "embed=7"),
    ("rtn:4:scales=4", "scales=4"),
    ("rtn:4:g32:g64", "group given twice"),
    ("rtn:4:colour=red", "unknown option 'colour'"),
    ("rtn:4:sym:asym", "sym/asym given twice"),
    ("gptq+gptq:4", "'gptq' is given twice"),
    ("mixed:lots", "mixed target 'lots'"),
    ("rtn:16:g64", "no group or options"),
    (" , ", "empty"),
])
def test_parse_errors(spec, needle):
    with pytest.raises(LowbitError, match="^[^\n]*$") as e:
        parse_configs(spec)
    assert needle in str(e.value)


def test_cli_errors_are_one_line_and_convert_nothing(tiny_models, text_file, tmp_path):
    out = tmp_path / "out"
    res = run_cli(*_argv(tiny_models["llama"], text_file, out, "rtn:4,rtn:5:g17"))
    assert_clean_error(res, "config 'rtn:5:g17': unknown group 'g17'")
    assert not out.exists()
    short = tmp_path / "short.txt"
    short.write_text("tiny", encoding="utf-8")
    assert_clean_error(run_cli(*_argv(tiny_models["llama"], short, out, "rtn:4")), "text is too short")
    assert not out.exists()
    assert_clean_error(run_cli(*_argv(text_file, text_file, out, "rtn:4")), "not a file")
    no_configs = [a for a in _argv(tiny_models["llama"], text_file, out) if a != CONFIGS and a != "--configs"]
    assert_clean_error(run_cli(*no_configs), "give --configs")
    assert_clean_error(run_cli(*no_configs, "--preset", "seeds", "--preset-bits", "4"), "give --calib FILE")
    assert_clean_error(run_cli(*_argv(tiny_models["llama"], text_file, out, "rtn:8:pt", "--preset", "seeds",
                                      "--preset-bits", "8")), "in --configs and in --preset")  # fmt: skip


def test_existing_files_in_the_out_dir_need_force(tiny_models, text_file, tmp_path):
    """compare writes <config>.lowbit and results.* into --out-dir and deletes the containers afterwards: a file
    already there (the user's own, or a previous run's) is refused before anything runs unless --force."""
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "rtn_4_g64.lowbit"
    mine.write_bytes(b"my own model")
    res = run_cli(*_argv(tiny_models["llama"], text_file, out, "rtn:4"))
    assert_clean_error(res, f"--out-dir: {mine}: file exists; pass --force to replace it")
    mine.unlink()
    (out / "results.json").write_text("{}", encoding="utf-8")
    assert_clean_error(run_cli(*_argv(tiny_models["llama"], text_file, out, "rtn:4")), "results.json: file exists")
    assert sorted(p.name for p in out.iterdir()) == ["results.json"] and (out / "results.json").read_text() == "{}"


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def run(tiny_models, text_file, tmp_path_factory) -> dict:
    """One comparison of the tiny llama with --keep-models: exit code, stdout, stderr, out dir."""
    out = tmp_path_factory.mktemp("cmp") / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(_argv(tiny_models["llama"], text_file, out, CONFIGS, "--keep-models"))
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "out": out,
            "hf": tiny_models["llama"]}


def test_end_to_end_writes_table_csv_json_png(run):
    assert run["code"] == 0, run["stderr"]
    out = run["out"]
    table = run["stdout"]
    head = "| method | bits | group | bpw | size | ppl | Δppl % | KL mean | top-1 % | convert s | decode tok/s |"
    assert head in table
    assert table.count("\n| ") == 1 + 5 and "error" not in table
    for f in ("results.json", "results.csv", "results.md", "pareto.png"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))
    assert (out / "results.md").read_text(encoding="utf-8").strip() == table.strip()
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rows = list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))
    assert [r["label"] for r in doc["results"]] == [r["label"] for r in rows] == [
        "rtn:8:g64", "search:4:g32", "rtn:2:pc", "search:8:pt", "f16"]
    for j, c in zip(doc["results"], rows):
        assert j["status"] == c["status"] == "ok" and j["error"] is None
        assert float(c["kl_mean"]) == j["kl_mean"] and float(c["bpw"]) == j["bpw"]
        assert j["tokens"] == 6 * (CTX - 1) and j["windows"] == 6
        assert j["convert_seconds"] > 0 and j["decode_tps"] > 0
        assert (out / f"{j['label'].replace(':', '_')}.lowbit").exists()  # --keep-models
    by = {r["label"]: r for r in doc["results"]}
    assert by["rtn:2:pc"]["bpw"] < by["search:4:g32"]["bpw"] < by["rtn:8:g64"]["bpw"] < by["f16"]["bpw"]
    # the unquantized weights with the default float16 KV cache, against the reference's float32 cache
    assert 0.0 <= by["f16"]["kl_mean"] < 1e-6 and by["f16"]["top1"] > 0.99
    assert by["f16"]["ppl"] == pytest.approx(doc["reference"]["ppl"], rel=1e-4)
    assert by["rtn:2:pc"]["kl_mean"] > by["search:4:g32"]["kl_mean"] > by["rtn:8:g64"]["kl_mean"] > 0
    # one scale per matrix: fewer bits than groups of 64, and more error
    assert by["search:8:pt"]["bpw"] < by["rtn:8:g64"]["bpw"]
    assert by["search:8:pt"]["kl_mean"] > by["rtn:8:g64"]["kl_mean"]
    assert "eval" in run["stderr"] and "wrote" in run["stderr"]


def test_numbers_equal_lowbit_eval_on_the_same_containers(run, text_file):
    doc = json.loads((run["out"] / "results.json").read_text(encoding="utf-8"))
    text = text_file.read_text(encoding="utf-8")
    with ev.reference_engine(str(run["hf"]), CTX) as ref:
        ids = ref.tokenizer.encode(text, add_special_tokens=False)
        for row in doc["results"]:
            path = run["out"] / f"{row['label'].replace(':', '_')}.lowbit"
            cand = Engine(path, ctx=CTX)
            want = ev.evaluate(cand.logits_all, ids, CTX, ref.tokenizer.bos_id, MAX_TOKENS, ref.logits_all)
            for key in ("ppl", "kl_mean", "kl_p99", "kl_max", "top1", "delta_ppl_pct"):
                assert row[key] == pytest.approx(getattr(want, key), rel=1e-12, abs=1e-15), (row["label"], key)
            assert doc["reference"]["ppl"] == pytest.approx(want.ref_ppl, rel=1e-12)
            assert row["file_bytes"] == path.stat().st_size


def test_failed_config_is_a_row_and_exit_1_without_matplotlib(tiny_models, text_file, tmp_path, monkeypatch,
                                                               capsys, caplog):
    real = converter.convert

    def convert(src, out, opts, progress=True):
        if opts.bits == 2:
            raise LowbitError("this method is not implemented yet")
        return real(src, out, opts, progress=progress)

    monkeypatch.setattr(converter, "convert", convert)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails: as if matplotlib were missing
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        code = main(_argv(tiny_models["llama"], text_file, out, "rtn:2:pc,rtn:4", "--json"))
    printed = json.loads(capsys.readouterr().out)
    assert code == 1
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| error |" in table and "conversion failed: this method is not implemented yet" in table
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert printed == {**doc, "files": {k: str(out / f) for k, f in (("json", "results.json"), ("csv", "results.csv"),
                                                                      ("md", "results.md"))}}
    failed, ok = doc["results"]
    assert failed["status"] == "failed" and failed["ppl"] is None and "not implemented" in failed["error"]
    assert ok["status"] == "ok" and ok["kl_mean"] > 0
    assert (out / "results.csv").exists() and not (out / "pareto.png").exists()
    assert not list(out.glob("*.lowbit"))  # no --keep-models
    assert "matplotlib is not installed" in caplog.text and "1 of 2 configurations failed" in caplog.text


def test_crash_while_writing_leaves_no_result_files(tiny_models, text_file, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(compare_report, "render_pareto", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(_argv(tiny_models["llama"], text_file, out, "rtn:4", "--json"))
    assert sorted(p.name for p in out.iterdir()) == []  # no results, no temporary files, no containers


def test_pareto_front():
    pts = [(4.5, 0.01), (2.5, 0.3), (3.5, 0.05), (3.6, 0.2), (8.5, 0.001), (2.5, 0.5)]
    assert compare_report.pareto_front(pts) == [(2.5, 0.3), (3.5, 0.05), (4.5, 0.01), (8.5, 0.001)]


def test_the_seeds_preset_names_the_twelve_approaches():
    from lowbit.convert.converter import ConvertOptions
    from lowbit.runtime.measure.presets import parse_bits, preset_configs

    cfgs = preset_configs("seeds", (8, 4, 3, 2), ConvertOptions(calib=str(CALIB)))
    assert len({c.method for c in cfgs}) == 12
    per_width = {b: [c for c in cfgs if c.bits == str(b)] for b in (8, 4, 3, 2)}
    assert [len(per_width[b]) for b in (8, 4, 3, 2)] == [9, 11, 11, 12]
    assert len({c.label for c in cfgs}) == len(cfgs)
    assert {c.act for c in cfgs} == {"none", "dynamic", "static"}
    assert all(not c.opts.resolved_method().tune for c in per_width[8])
    with pytest.raises(LowbitError, match="--calib"):
        preset_configs("seeds", (4,), ConvertOptions())
    assert len(preset_configs("seeds", (8,), ConvertOptions())) == 9  # no tuning row at 8 bits: no text needed
    with pytest.raises(LowbitError, match="unknown --preset"):
        preset_configs("nope", (4,), ConvertOptions())
    for bad in ("4,4", "7", "x", ""):
        with pytest.raises(LowbitError, match="--preset-bits"):
            parse_bits(bad)
