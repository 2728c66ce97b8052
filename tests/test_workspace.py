"""The workspace: bounded by the largest plan per stream, shared by plans, caller-owned."""
import pytest
import torch

import skattn
from skattn import launch
from skattn import buffers as ws


def _plan(kv_len, fixup=None, **kw):
    return skattn.plan(batch=1, q_len=1, kv_len=kv_len, q_heads=32, kv_heads=8, head_dim=128,
                       causal=True, sms=132, occupancy=2, fixup=fixup, **kw)


def test_two_thousand_kv_lengths_hold_one_buffer():
    # decode makes a plan per KV length; the pool keeps one buffer per stream, sized by the
    # largest plan (programs x tile), however many plans ran
    ws.release()
    dev = torch.device("cpu")
    biggest = 0
    for kv_len in range(4096, 4096 + 2000):
        p = _plan(kv_len, fixup="fused" if kv_len % 2 else None)
        launch.bind(p, dev)
        ws.pooled(ws.layout(p), ws.nbytes(p), dev, 0)
        biggest = max(biggest, ws.nbytes(p))
    assert 0 < ws.held_bytes() <= biggest + 4 * 64
    assert biggest < 8 << 20  # a few MB for llama-8b decode, independent of the KV length


def test_streams_get_their_own_pools():
    ws.release()
    p = _plan(8192)
    dev = torch.device("cpu")
    a = ws.pooled(ws.layout(p), ws.nbytes(p), dev, 1)
    b = ws.pooled(ws.layout(p), ws.nbytes(p), dev, 2)
    assert a[0].data_ptr() != b[0].data_ptr() and a[3].data_ptr() != b[3].data_ptr()
    assert ws.pooled(ws.layout(p), ws.nbytes(p), dev, 1)[0].data_ptr() == a[0].data_ptr()


def test_a_graph_captured_after_a_warm_up_keeps_its_buffer(monkeypatch):
    # the captured call finds its views in the cache (an eager call made them): the pool must
    # still learn that a graph uses its buffer, and keep it when a bigger plan grows the pool
    ws.release()
    small, big = _plan(8192, programs=64), _plan(8192, programs=264)
    dev = torch.device("cpu")
    ws.pooled(ws.layout(small), ws.nbytes(small), dev, 0)  # the eager warm-up
    monkeypatch.setattr(ws, "capturing", lambda device: True)
    captured = ws.pooled(ws.layout(small), ws.nbytes(small), dev, 0)
    monkeypatch.setattr(ws, "capturing", lambda device: False)
    ws.pooled(ws.layout(big), ws.nbytes(big), dev, 0)  # a bigger plan grows the pool
    pool = ws._POOLS[(dev, 0)]
    assert pool.captured and pool.buf.data_ptr() != captured[0].data_ptr()
    assert any(b.data_ptr() == captured[0].data_ptr() for b in pool.retired)
    ws.release()


def test_counters_never_share_bytes_with_partials():
    # a fused plan's counters must stay zero between calls: no other plan may write there
    ws.release()
    dev = torch.device("cpu")
    fused, big = _plan(8192, fixup="fused"), _plan(8192, programs=264)
    c = ws.pooled(ws.layout(fused), ws.nbytes(fused), dev, 0)[3]
    o, m, l_, _ = ws.pooled(ws.layout(big), ws.nbytes(big), dev, 0)
    for t in (o, m, l_):
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * 4
        assert hi <= c.data_ptr() or lo >= c.data_ptr() + c.numel() * 4
    # a caller's buffer for both: the partials of each end before the counters begin
    buf = skattn.workspace(fused, big, device="cpu")
    for p in (fused, big):
        o, m, l_, c = ws.caller_views(buf, ws.layout(p), ws.nbytes(p), dev)
        assert l_.data_ptr() + l_.numel() * 4 <= c.data_ptr()
        assert c.data_ptr() + c.numel() * 4 == buf.data_ptr() + buf.numel()


def test_caller_workspace_too_small_is_refused():
    p = _plan(8192, programs=264)
    with pytest.raises(ValueError, match="workspace holds"):
        ws.caller_views(torch.zeros(64, dtype=torch.uint8), ws.layout(p), ws.nbytes(p),
                        torch.device("cpu"))
    assert p.workspace_bytes == ws.nbytes(p)


def test_pool_addresses_follow_the_views_they_came_from():
    # a recipe reads the pool's addresses, not its views; addresses kept from views that the
    # pool has since replaced (another thread grew it between the two steps) are not used
    ws.release()
    small, big = _plan(8192, programs=64), _plan(8192, programs=264)
    dev = torch.device("cpu")
    lay = ws.layout(small)
    first = ws.pooled_addresses(lay, ws.nbytes(small), dev, 0)
    assert first == tuple(x.data_ptr() for x in ws.pooled(lay, ws.nbytes(small), dev, 0))
    pool = ws._POOLS[(dev, 0)]
    stale_views = pool.get(lay, ws.nbytes(small), dev)
    ws.pooled(ws.layout(big), ws.nbytes(big), dev, 0)  # grows: new buffer, caches cleared
    pool.ptrs[lay] = (stale_views, first)  # what the other thread stored late
    now = ws.pooled_addresses(lay, ws.nbytes(small), dev, 0)
    assert now == tuple(x.data_ptr() for x in ws.pooled(lay, ws.nbytes(small), dev, 0))
    assert now[0] == pool.buf.data_ptr() != first[0]
    ws.release()
