"""One rank of the tensor-parallel check (tests/test_tensor_parallel.py), run by torchrun:
loads a checkpoint with transformers' own TP plan (`DistributedConfig(tp_plan="auto")`) and
attn_implementation="skattn", decodes greedily, and rank 0 writes the tokens, the first
step's logits and the head counts skattn saw to a JSON file.

    torchrun --standalone --nproc_per_node 2 tests/tp_worker.py CHECKPOINT OUT.json
"""
import json
import os
import sys

import torch

PROMPT = [[1, 5, 9, 17, 33, 2, 7, 11]]
NEW_TOKENS = 4


def greedy(model, device):
    """(tokens, logits of the prompt's last position, [(q heads, kv heads)] of skattn's calls)."""
    import skattn

    heads, attention = [], skattn.attention

    def counting(q, k, v, **kw):
        heads.append((q.shape[2], k.shape[2]))
        return attention(q, k, v, **kw)

    ids = torch.tensor(PROMPT, device=device)
    skattn.attention = counting
    try:
        with torch.no_grad():
            logits = model(ids).logits[0, -1].float().cpu()
            tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    finally:
        skattn.attention = attention
    return tokens[0].tolist(), logits.tolist(), heads


def load(path, *, tensor_parallel: bool, device=None):
    import transformers

    import skattn.transformers as skt

    skt.register()
    kw = dict(attn_implementation="skattn", dtype=torch.float16)
    if tensor_parallel:
        kw["distributed_config"] = transformers.DistributedConfig(tp_plan="auto")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
    if device is not None:
        model = model.to(device)
    return model.eval()


def main(path, out_path):
    model = load(path, tensor_parallel=True)
    device = next(model.parameters()).device
    tokens, logits, heads = greedy(model, device)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out_path, "w") as f:
            json.dump(dict(tokens=tokens, logits=logits, heads=heads,
                           world=int(os.environ["WORLD_SIZE"]), device=str(device)), f)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    main(sys.argv[1], sys.argv[2])
