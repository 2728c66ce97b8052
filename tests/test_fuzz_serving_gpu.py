"""The serving fuzz (tests/test_fuzz_serving.py) at serving sizes on a CUDA GPU: up to 16
sequences of up to ~2,100 keys, prompt chunks of up to 80 tokens among decode rows, head
sizes 64 and 128, pages of 16, 64 and 256, the GPU's own grid or small ones that cut every
tile, the Hopper whole-tile kernel among the plan knobs; the same inputs (NaN wherever no
sequence reads), checks and bounds (bf16 rounded to nearest, as the GPU converts).
SKATTN_SERVING_FUZZ_EXAMPLES cases in all (160 by default), in 4 shards from fixed seeds."""
import math
import os

import pytest
import torch

from test_fuzz_serving import Profile, _run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU = Profile(device="cuda", batch=16, len_hi=700, q_hi=80, kv_q_lens=(1, 2, 4, 8, 16),
              kv_heads=(2, 8), ratios=(1, 4, 8), dims=((64, 64), (128, 128)),
              block_dims=((64, 64), (128, 128)), page_sizes=(16, 64, 256),
              hardware=(None, None, (4, 2), (16, 2)), block_n=(None,))
SHARDS = 4


@pytest.mark.parametrize("shard", range(SHARDS))
def test_fuzz_serving_gpu(shard):
    total = int(os.environ.get("SKATTN_SERVING_FUZZ_EXAMPLES", "160"))
    examples = math.ceil(total / SHARDS)
    assert _run(examples, 100 + shard, GPU) >= examples
