"""The fused decode layer (kernels/cpu_decode.py): one kernel call per layer of a one-token pass gives the
per-primitive path's logits bit for bit — every cache format, q/k/v biases, both sides of the split-decode chunk,
int8 and split activations — and steps aside where it does not apply."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.convert.converter import ConvertOptions, convert
from lowbit.formats.reader import Container
from lowbit.kernels import cpu_quant
from lowbit.kernels.kv_formats import KVSpec
from lowbit.kernels.ops import CpuOps, ObservingOps
from lowbit.models import family_for

pytestmark = pytest.mark.skipif(not cpu_quant.HAS_BYTE_DOT, reason="the fused layer runs on the byte dot product")


@pytest.fixture(scope="module")
def tiny4(tiny_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fused")
    opts = ConvertOptions(bits=4, group_size=32)
    return {k: convert(str(tiny_models[k]), root / f"{k}.lowbit", opts, progress=False) for k in ("llama", "qwen2")}


def _model(path, ops=None, ctx=200):
    c = Container(path)
    arch = c.meta["architecture"]
    _, family = family_for(arch["model_type"])
    return family.Model(family.ModelArgs.from_dict(arch["args"]), c, ctx, ops)


def _ready(model) -> None:
    """Build the plan and wait for its kernel (compiled on a helper thread) for the model's cache formats."""
    cache = model.new_cache()
    x = np.ascontiguousarray(model.embed_tokens(np.array([3])))
    model.fused_decode(x, 0, cache)
    plan = model._decode_plan
    assert plan, "no fused plan for a plain llama-style model"
    assert plan.run(x, model.new_cache(), 0, model.cos, model.sin, wait=True) is not None


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", ["16", "32", "k8,v4"])
@pytest.mark.parametrize("mode", ["int8", "split"])
def test_fused_decode_steps_equal_the_primitives_bit_for_bit(tiny4, kind, spec, mode):
    fused, plain = _model(tiny4[kind]), _model(tiny4[kind])
    for m in (fused, plain):
        m.kv = KVSpec.parse(spec)
        for layer in m.layers:
            for w in layer.values():
                if getattr(w, "int_kernels", None) is not None:
                    w.set_activation_mode(mode)
    plain._decode_plan = False
    _ready(fused)
    prompt = np.arange(5, 25)
    caches = [fused.new_cache(), plain.new_cache()]
    assert np.array_equal(fused.forward(prompt, 0, caches[0]), plain.forward(prompt, 0, caches[1]))
    calls = []
    run = fused._decode_plan.run
    fused._decode_plan.run = lambda *a, **kw: calls.append(1) or run(*a, **kw)
    rng = np.random.default_rng(3)
    for pos in range(len(prompt), 150):  # past DECODE_CHUNK: the split attention kernel too
        t = np.array([int(rng.integers(3, 4000))])
        a, b = fused.forward(t, pos, caches[0]), plain.forward(t, pos, caches[1])
        assert np.array_equal(a, b), pos
    assert len(calls) == 150 - len(prompt)
    for la, lb in zip(caches[0].layers, caches[1].layers):  # the same keys and values were written
        for x, y in zip(la, lb):
            assert np.array_equal(x, y)


def test_fused_decode_steps_aside_where_it_does_not_apply(tiny4):
    model = _model(tiny4["llama"])
    x = np.ascontiguousarray(model.embed_tokens(np.array([3])))
    # exact (int16) activations: no byte dot product, no plan
    exact = _model(tiny4["llama"])
    for layer in exact.layers:
        for w in layer.values():
            if getattr(w, "int_kernels", None) is not None:
                w.set_activation_mode("int16")
    assert exact.fused_decode(x, 0, exact.new_cache()) is None and exact._decode_plan is False
    # a family that computes a hook its own way keeps its own layers
    variant = type("Variant", (type(model),), {"act_mul": lambda self, g, u: self.ops.silu_mul(g, u)})
    other = variant(model.args, Container(tiny4["llama"]), 200)
    assert other.fused_decode(x, 0, other.new_cache()) is None and other._decode_plan is False
    # calibration's observing ops see every product
    observed = _model(tiny4["llama"], ObservingOps(CpuOps(), observer=None))
    assert observed.fused_decode(x, 0, observed.new_cache()) is None
    # a weight whose activation mode changed after the plan was made ends the plan's use
    _ready(model)
    plan = model._decode_plan
    assert plan.valid()
    model.layers[1]["ffn_down"].set_activation_mode("int16")
    assert not plan.valid() and model.fused_decode(x, 0, model.new_cache()) is None
    # a prompt pass of one token takes the prompt kernels
    fresh = _model(tiny4["llama"])
    _ready(fresh)
    with fresh.ops.forward_pass(1, prompt=True):
        assert fresh.fused_decode(x, 0, fresh.new_cache()) is None


def test_the_fused_kernels_compile_only_once_a_reply_goes_on(tiny4, monkeypatch):
    """A short reply never spends a core compiling them: where numba's cache does not hold them, the helper thread
    starts at the START_AFTER-th one-token pass, and the passes before take the primitives."""
    from lowbit.kernels import cpu_decode
    from lowbit.kernels.cpu_decode import START_AFTER

    monkeypatch.setattr(cpu_decode, "load_cached", lambda *a: False)
    model = _model(tiny4["llama"])
    cache = model.new_cache()
    model.forward(np.arange(5, 9), 0, cache)
    for pos in range(4, 4 + START_AFTER - 1):
        model.forward(np.array([7]), pos, cache)
    plan = model._decode_plan
    assert plan and not plan._ready and plan.asked == START_AFTER - 1
    model.forward(np.array([7]), 4 + START_AFTER - 1, cache)
    assert len(plan._ready) == 1


def test_cached_fused_kernels_serve_from_the_first_pass(tiny4):
    """Where numba's cache holds them (every run after the first), they are loaded at the first one-token pass and
    serve it: no pass waits for a helper thread."""
    _ready(_model(tiny4["llama"]))  # compiled, so in numba's cache
    model = _model(tiny4["llama"])
    cache = model.new_cache()
    model.forward(np.arange(5, 9), 0, cache)
    served = []
    model.forward(np.array([7]), 4, cache)
    plan = model._decode_plan
    run = plan.run
    plan.run = lambda *a, **kw: served.append(run(*a, **kw) is not None) or None
    model.fused_decode(np.ascontiguousarray(model.embed_tokens(np.array([7]))), 5, cache)
    assert plan.asked == 0 and served == [True]


def test_a_benchmark_waits_for_the_fused_kernels(tiny4, monkeypatch):
    """``ops.wait_for_fused`` (lowbit bench's warm-up): the first one-token pass compiles the fused kernels and
    waits for them, so a timed decode never runs beside the helper thread's compile."""
    from lowbit.kernels import cpu_decode

    monkeypatch.setattr(cpu_decode, "load_cached", lambda *a: False)
    model = _model(tiny4["llama"])
    cache = model.new_cache()
    model.forward(np.arange(5, 9), 0, cache)
    model.ops.wait_for_fused = True
    model.forward(np.array([7]), 4, cache)
    plan = model._decode_plan
    assert plan and plan.asked == 0 and [e.is_set() for e in plan._ready.values()] == [True]
