"""The steps transformers' continuous batching hands the attention, and the work skattn plans
for each: no GPU needed.

    PYTHONPATH=src python3 tools/cb_steps.py [--requests 32] [--prompt 2048] [--new 64]

Runs `generate_batch` on the CPU with `tools/cb_bench.py`'s request mix and transformers'
default scheduling at llama-8b's scale (pages of 256 rows, 8192 tokens a step) through a
stand-in attention that records each step's lengths (layer 0) and returns zeros, so the
scheduling is the real one and the model a toy. For each step it then plans skattn's call
as `transformers_paged` does (llama-8b heads, the bounds rounded up to powers of two): in
one plan (`register(q_split=None)`) as transformers calls it eagerly and as under its CUDA
graphs (query tokens padded to a multiple of 64, `max_seqlen_q` = the padded count, 32
sequences), and so padded with the default `q_split="auto"` (a step in two halves where
its longest request passes the split), and builds the work lists
on the host (`serving_worklist.host_work_list`): work items, tiles, programs, and the dot
products they compute against the useful ones. Prints one line per step and the totals.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cb_bench import TINY, prompts  # noqa: E402

from skattn.serving_launch import _pow2 as pow2  # noqa: E402
from skattn.serving_mixed import decode_q_split, step_plan  # noqa: E402
from skattn.serving_plan import serving_plan  # noqa: E402
from skattn.serving_worklist import host_work_list  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 256


def record_steps(n: int, mean: int, new: int, *, blocks: int = 512,
                 step_tokens: int = 8192) -> list[dict]:
    import transformers
    from transformers import AttentionInterface

    steps: list[dict] = []

    def stand_in(module, query, key, value, attention_mask, **kw):
        if module.layer_idx == 0:
            steps.append(dict(cu_q=kw["cu_seq_lens_q"].tolist(), cu_k=kw["cu_seq_lens_k"].tolist(),
                              max_q=int(kw["max_seqlen_q"]), max_k=int(kw["max_seqlen_k"])))
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1],
                               value.shape[-1]), None

    AttentionInterface.register("paged|stepprobe", stand_in)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**dict(TINY, vocab_size=1024)),
        attn_implementation="paged|stepprobe").eval()
    cfg = transformers.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1,
                                        pad_token_id=0)
    cb = transformers.ContinuousBatchingConfig(use_cuda_graph=False, block_size=PAGE,
                                               num_blocks=blocks, max_batch_tokens=step_tokens)
    with torch.no_grad():
        model.generate_batch(prompts(n, mean, 1024), generation_config=cfg,
                             continuous_batching_config=cb)
    return steps


def planned(cu_q: list, cu_k: list, max_q: int, max_k: int, q_split=None) -> dict:
    """skattn's plan and host work list for one call, as transformers_paged plans it
    (q_split: as registered with it; a MixedPlan's halves summed)."""
    B, total_q = len(cu_q) - 1, cu_q[-1]
    mq, mk = pow2(max_q), pow2(max(16, max_k))
    args = dict(batch=B, q_len=None, max_q_len=mq, total_q=total_q, max_kv_len=mk, q_heads=HQ,
                kv_heads=HKV, head_dim=D, page_size=PAGE, max_pages=-(-mk // PAGE), sms=132,
                occupancy=2, smem_limit=232448)
    split = None if q_split is None else (
        decode_q_split(HQ, HKV) if q_split == "auto" else int(q_split))
    plan = (step_plan(split, args) if split is not None and max_q > split
            else serving_plan(**{k: v for k, v in args.items() if k != "q_len"}, q_split=None))
    work = done = programs = tiles = 0
    tokens = []
    for half in getattr(plan, "halves", (plan,)):
        wl = host_work_list(half, cu_k=cu_k, cu_q=cu_q)
        g = half.geometry
        # dot-product work: items x (BLOCK_M x BLOCK_N) against the visible (query, key) pairs
        work, done = work + wl.work, done + wl.work * g.block_m * g.block_n
        programs, tiles = max(programs, wl.programs), tiles + len(wl.rb_count) * half.hz
        tokens.append(str(g.tokens_per_tile))
    lq = [cu_q[i + 1] - cu_q[i] for i in range(B)]
    lk = [cu_k[i + 1] - cu_k[i] for i in range(B)]
    useful = HQ // HKV * HKV * sum(q * k - q * (q - 1) // 2 for q, k in zip(lq, lk))
    return dict(B=B, total_q=total_q, max_q=mq, tokens="/".join(tokens), work=work,
                programs=programs, tiles=tiles, pairs=done, useful=useful)


def padded(step: dict, max_requests: int = 32) -> dict:
    """The call as transformers makes it under CUDA graphs (query tokens and sequences
    padded with empty sequences; max_seqlen_q = the padded token count)."""
    cu_q, cu_k = list(step["cu_q"]), list(step["cu_k"])
    total = -(-cu_q[-1] // 64) * 64
    b = min(total, max_requests)
    cu_q += [cu_q[-1]] * (b + 1 - len(cu_q))
    cu_k += [cu_k[-1]] * (b + 1 - len(cu_k))
    return dict(cu_q=cu_q, cu_k=cu_k, max_q=total, max_k=step["max_k"], total=total)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    steps = record_steps(args.requests, args.prompt, args.new)
    cols = ("eager, one plan", "graphs, one plan", "graphs, q_split=auto")
    print(f"{len(steps)} steps; per step, tokens a tile (short/long half), work items and the "
          f"share of useful dot products: " + " | ".join(cols))
    tot = {c: dict(items=0, pairs=0) for c in cols}
    useful = 0
    for i, s in enumerate(steps):
        p = padded(s)
        runs = dict(zip(cols, (planned(s["cu_q"], s["cu_k"], s["max_q"], s["max_k"]),
                               planned(p["cu_q"], p["cu_k"], p["max_q"], p["max_k"]),
                               planned(p["cu_q"], p["cu_k"], p["max_q"], p["max_k"], "auto"))))
        useful += runs["eager"]["useful"]
        line = f"{i:4d} B={runs['eager']['B']:3d} q={runs['eager']['total_q']:5d} " \
               f"max_q={s['max_q']:5d}"
        for c, r in runs.items():
            tot[c]["items"] += r["work"]
            tot[c]["pairs"] += r["pairs"]
            line += f" | {r['tokens']:>5} {r['work']:7d} {r['useful'] / max(1, r['pairs']):6.1%}"
        print(line)
    print(f"useful {useful * D * 4 / 1e12:.2f} TFLOP a layer; computed: " + "; ".join(
        f"{c} {t['items']} items, {t['pairs'] * D * 4 / 1e12:.2f} TFLOP "
        f"({useful / t['pairs']:.1%} useful)" for c, t in tot.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
