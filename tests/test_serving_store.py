"""A serving loop over quantized paged caches: each step writes its tokens with
`quant_store`'s slot forms (vLLM's slot mapping) and attends with `attention_with_kvcache`,
under the interpreter: the pages hold exactly the torch quantizers' bits of each sequence's
tokens, and attention over them matches the float64 reference."""
import pytest
import torch

import skattn
from skattn import quant, quant_store, reference
from skattn.reference_serving import gather_keys
from skattn.transformers_fp8 import quantize as fp8_quantize
from serving_inputs import paged_cache, ragged_bound, randn, sequences_kvcache
from tolerance import rel_err

FP8 = torch.float8_e4m3fn
PAGE, HQ, HKV, D = 16, 4, 2, 32


def _slots(table, b, positions):
    """vLLM's slot of each position of sequence b: page id * page size + offset."""
    pos = torch.as_tensor(positions)
    return table[b, pos // PAGE].long() * PAGE + pos % PAGE


@pytest.mark.parametrize("form", ["fp8", "q8_0"])
def test_prefill_then_decode_steps_through_slots(form):
    prompt, steps = [20, 3, 33], 2
    lens = [n + steps for n in prompt]
    _, _, table = paged_cache(lens, page_size=PAGE, hkv=HKV, d=D, seed=3)
    pages = int(table[table < 10**6].max()) + 1
    g = torch.Generator().manual_seed(4)
    tokens_k = [randn((n, HKV, D), g, torch.float16, "cpu") * 2 for n in lens]
    tokens_v = [randn((n, HKV, D), g, torch.float16, "cpu") for n in lens]
    scale = torch.tensor([0.02, 0.01])
    if form == "fp8":
        kc, vc = (torch.zeros(pages, PAGE, HKV, D, dtype=torch.uint8).view(FP8) for _ in "kv")
        write = lambda k, v, slots: quant_store.store_fp8_slots(kc, vc, scale, scale, k, v,
                                                                slots)
        kw = dict(k_scale=scale, v_scale=scale)
    else:
        kc, vc = (quant.q8_0(torch.zeros(pages, PAGE, HKV, D)) for _ in "kv")
        write = lambda k, v, slots: quant_store.store_q8_0_slots(kc, vc, k, v, slots)
        kw = {}
    # the prompts in one call (a padding token at -1), then one token per sequence a step
    slots = torch.cat([_slots(table, b, range(n)) for b, n in enumerate(prompt)] + [
        torch.tensor([-1])])
    pad = torch.zeros(1, HKV, D, dtype=torch.float16)
    write(torch.cat([t[:n] for t, n in zip(tokens_k, prompt)] + [pad]),
          torch.cat([t[:n] for t, n in zip(tokens_v, prompt)] + [pad]), slots)
    for s in range(steps):
        at = torch.cat([_slots(table, b, [n + s]) for b, n in enumerate(prompt)])
        write(torch.stack([t[n + s] for t, n in zip(tokens_k, prompt)]),
              torch.stack([t[n + s] for t, n in zip(tokens_v, prompt)]), at)
    # each sequence's pages hold the quantizer's bits of its tokens
    for b, n in enumerate(lens):
        for cache, tokens in ((kc, tokens_k[b]), (vc, tokens_v[b])):
            if form == "fp8":
                got = gather_keys(cache.view(torch.uint8), n, b=b, block_table=table)
                want = fp8_quantize(tokens[None].transpose(1, 2), scale).transpose(1, 2)[0]
                assert torch.equal(got, want.view(torch.uint8))
            else:
                want = quant.q8_0(tokens)
                assert torch.equal(gather_keys(cache.values, n, b=b, block_table=table),
                                   want.values)
                assert torch.equal(gather_keys(cache.scales, n, b=b, block_table=table),
                                   want.scales)
    # and the last step's attention over them matches the float64 reference
    q = randn((3, 1, HQ, D), g, torch.float16, "cpu")
    lens_t = torch.tensor(lens, dtype=torch.int32)
    out = skattn.attention_with_kvcache(q, kc, vc, cache_seqlens=lens_t, block_table=table, **kw)
    ref = reference.attention_with_kvcache(q, kc, vc, cache_seqlens=lens_t, block_table=table,
                                           **kw)
    kd, vd = quant.dequantize_kv(kc, vc, kw.get("k_scale"), kw.get("v_scale"), torch.float16)
    tol = ragged_bound(sequences_kvcache(q, kd, vd, lens, table))
    assert rel_err(out, ref) <= tol, (rel_err(out, ref), tol)
