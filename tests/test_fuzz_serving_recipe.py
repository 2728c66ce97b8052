"""Property-based test of the serving recipes (`skattn.serving_recipe`) on a CPU with the
GPU launches stubbed (`helpers.stubbed_gpu`): for the random batches, caches, plans and
features of `test_fuzz_serving`, with a caller's workspace, work list and out (q itself
where it may be) drawn as well, a repeat call launches exactly what the checked path passes
Triton's launcher (pointers as integers), through Triton's C launch functions and through
skattn's C launcher; then again with fresh copies of every tensor (the same signature at
other addresses). No kernel runs, so a shard draws many cases in seconds."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

import skattn
from skattn import serving, serving_recipe
from helpers import stubbed_gpu
from test_fuzz_serving import INTERPRETER, _offsets, cases, tensors
from test_serving_recipe import fast_and_slow

EXAMPLES = 300   # a shard's cases


def _copies(q, k, v, kw, out, lens):
    """Fresh copies of every tensor (a block cache's values and scales too), out = q kept."""
    def fresh(x):
        if isinstance(x, skattn.quant.BLOCK_FORMS):
            return type(x)(x.values.clone(), x.scales.clone())
        return x.clone() if isinstance(x, torch.Tensor) else x
    q2 = fresh(q)
    return (q2, fresh(k), fresh(v), {n: fresh(x) for n, x in kw.items()},
            q2 if out is q else fresh(out), {n: fresh(x) for n, x in lens.items()})


def _lengths(case, device="cpu") -> dict:
    if case.api == "kvcache":
        return dict(cache_seqlens=torch.tensor(case.lens_k, dtype=torch.int32, device=device))
    return dict(cu_seqlens_q=_offsets(case.lens_q, device),
                cu_seqlens_k=_offsets(case.lens_k, device))


def _call(case, q, k, v, kw, out, lens):
    """The case's entry point with these length tensors (`test_fuzz_serving.call` makes new
    ones each call)."""
    p = case.plan
    kw = dict(kw, plan=p, out=out)
    if case.api == "kvcache":
        return skattn.attention_with_kvcache(q, k, v, **lens, **kw)
    max_q = p.max_q_len if hasattr(p, "max_q_len") else max(case.lens_q)
    return skattn.attention_varlen(q, k, v, lens["cu_seqlens_q"], lens["cu_seqlens_k"], max_q,
                                   p.max_kv_len, **kw)


def _check(gpu, case, buffers) -> None:
    q, k, v, kw, out = tensors(case)
    lens = _lengths(case)
    if "workspace" in buffers:
        kw["workspace"] = serving.workspace(case.plan, "cpu")
    if "work_list" in buffers:
        kw["work_list"] = serving.work_list(case.plan, **lens)
    if "out=q" in buffers and out.shape == q.shape:
        out = q
    elif "fresh out" in buffers:
        out = None
    for t in ((q, k, v, kw, out, lens), _copies(q, k, v, kw, out, lens)):
        serving_recipe.CHECKED.clear()
        _call(case, *t)  # checked, learns
        fast, slow = fast_and_slow(gpu, lambda t=t: _call(case, *t))
        assert fast == slow, (case.api, case.paged, case.dtype, sorted(case.features), buffers)


def _run(examples: int, shard: int, which: str) -> int:
    count = [0]

    @seed(3000 + shard)
    @settings(max_examples=examples, deadline=None, database=None, report_multiple_bugs=False,
              phases=(Phase.explicit, Phase.generate),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                     HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(case=cases(INTERPRETER),
           buffers=st.sets(st.sampled_from(["workspace", "work_list", "out=q", "fresh out"])))
    def fuzz(case, buffers):
        count[0] += 1
        with pytest.MonkeyPatch.context() as m:
            with stubbed_gpu(m, which, [serving_recipe.CHECKED]) as gpu:
                _check(gpu, case, buffers)

    fuzz()
    return count[0]


@pytest.mark.parametrize("which", ["triton", "skattn"])
def test_fuzz_serving_recipes(which):
    n = _run(EXAMPLES, 0 if which == "triton" else 1, which)
    assert n >= EXAMPLES, n
