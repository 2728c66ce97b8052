"""Recipes of launches that take TMA descriptors (the warp-specialised prompt kernel's K and
V): the argument tuple a recipe builds for Triton's C launch function equals what Triton's
own descriptor wrapper (`wrap_handle_tensordesc`) builds from the descriptor objects, with
and without the kernel's descriptor metadata; tensor maps are made once per address. The
driver's `fill_tma_descriptor` is a stand-in that returns its arguments."""
from types import SimpleNamespace

import pytest
import torch
import triton
from triton.backends.nvidia.driver import wrap_handle_tensordesc

from skattn import prefill_launch, recipe

BLOCK = (1, 64, 1, 128)
# elem_type 9: a device code whose host code differs (8), as Triton's launcher converts it
META = {"swizzle": 3, "elem_size": 2, "elem_type": 9, "block_size": [1, 64, 1, 64],
        "fp4_padded": False}


class FakeDriver:
    def __init__(self):
        self.made = []
        self.utils = SimpleNamespace(fill_tma_descriptor=self.fill)

    def fill(self, *args):
        self.made.append(args)
        return ("map", *(tuple(a) if isinstance(a, list) else a for a in args))


@pytest.fixture
def driver(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(triton.runtime.driver, "_active", fake)
    return fake


def compiled(meta):
    """A compiled kernel of signature (Q, K_DESC, V_DESC, n, C: constexpr) whose launcher is
    Triton's descriptor wrapper around a function that logs what it gets."""
    log = []
    sig = {"Q": "*fp16", "K_DESC": "tensordesc<fp16[1, 64, 1, 128]>",
           "V_DESC": "tensordesc<fp16[1, 64, 1, 128]>", "n": "i32", "C": "constexpr"}
    raw = lambda *args: log.append(args)  # noqa: E731
    run = SimpleNamespace(launch=wrap_handle_tensordesc(raw, sig, meta), global_scratch_size=0,
                          profile_scratch_size=0, launch_cooperative_grid=False,
                          launch_pdl=True)
    ck = SimpleNamespace(run=run, function=77, packed_metadata=(4, 1, 0),
                         metadata=SimpleNamespace(tensordesc_meta=meta))
    return ck, raw, log


def kv_descriptors(k, v):
    pb = prefill_launch.PrefillBound({}, BLOCK, False, "ws")
    return prefill_launch.descriptors(pb, k, v)


def triton_args(args, tail, grid, stream, ck):
    """What Triton's launch path passes its wrapper: tensors as they are."""
    r = ck.run
    return (*grid, stream, ck.function, r.launch_cooperative_grid, r.launch_pdl, None, None,
            ck.packed_metadata, None, None, None, *args, *tail)


def addresses(entry):
    return tuple(x.data_ptr() if isinstance(x, torch.Tensor) else x for x in entry)


@pytest.mark.parametrize("meta", [[META, META], None])
def test_recipe_builds_what_triton_builds(driver, meta):
    q = torch.zeros(1, 8, 4, 128, dtype=torch.float16)
    k, v = (torch.zeros(1, 256, 2, 128, dtype=torch.float16) for _ in range(2))
    kd, vd = kv_descriptors(k, v)
    args, tail, grid = (q, kd, vd, 8), (1,), (3, 1, 1)
    ck, raw, log = compiled(meta)
    launches = recipe.learn_launches([("key", args, grid)], [q, k, v], {},
                                     {"key": (ck, tail)})
    assert launches is not None and len(launches) == 1
    fn, make = launches[0]
    assert fn is raw  # past Triton's wrapper
    fills = []
    for q2, k2, v2 in [(q, k, v), (q.clone(), k.clone(), v.clone()), (q, k, v)]:
        vals = [5, q2.data_ptr(), k2.data_ptr(), v2.data_ptr()]
        before = len(driver.made)
        fn(*make(vals))
        fills.append([a[0] for a in driver.made[before:]])
        mine = log.pop()
        ck.run.launch(*triton_args((q2, *kv_descriptors(k2, v2), 8), tail, grid, 5, ck))
        assert addresses(mine) == addresses(log.pop())
    # with metadata a map a descriptor and address, made once (the last call reuses k's, v's)
    assert fills == ([[k.data_ptr(), v.data_ptr()], fills[1], []] if meta else [[], [], []])
    if meta:
        assert len(fills[1]) == 2 and k.data_ptr() not in fills[1]


def test_a_descriptor_over_an_unknown_tensor_is_not_replayed(driver):
    q = torch.zeros(1, 8, 4, 128, dtype=torch.float16)
    k = torch.zeros(1, 256, 2, 128, dtype=torch.float16)
    kd, vd = kv_descriptors(k, k.clone())  # v's descriptor over a tensor not a source
    ck, _, _ = compiled([META, META])
    assert recipe.learn_launches([("key", (q, kd, vd, 8), (1, 1, 1))], [q, k], {},
                                 {"key": (ck, (1,))}) is None


@pytest.mark.parametrize("meta", [[META, META], None])
def test_another_expansion_by_triton_is_not_replayed(driver, monkeypatch, meta):
    # a Triton whose launcher expands descriptors otherwise (here: no strides) leaves the
    # launch to launch.run rather than replaying a wrong layout
    import triton.backends.nvidia.driver as nvidia

    monkeypatch.setattr(nvidia, "make_tensordesc_arg",
                        lambda arg, m: [arg.base, *arg.shape])
    q = torch.zeros(1, 8, 4, 128, dtype=torch.float16)
    k, v = (torch.zeros(1, 256, 2, 128, dtype=torch.float16) for _ in range(2))
    ck, _, _ = compiled(meta)
    assert recipe.learn_launches([("key", (q, *kv_descriptors(k, v), 8), (1, 1, 1))],
                                 [q, k, v], {}, {"key": (ck, (1,))}) is None


def test_tensor_maps_are_made_once_per_address_and_bounded(driver, monkeypatch):
    monkeypatch.setattr(recipe.TensorMaps, "KEEP", 3)
    desc = SimpleNamespace(shape=(1, 256, 2, 128), strides=(65536, 256, 128, 1), padding="zero",
                           base=SimpleNamespace(data_ptr=lambda: 1024))
    maps = recipe.TensorMaps(2, recipe.Desc(2, desc), META)
    assert maps(4096) is maps(4096) and len(driver.made) == 1
    # Triton's arguments: the address, ..., the element type in the host's code, ..., padding
    assert driver.made[0][0] == 4096 and driver.made[0][3] == 8 and driver.made[0][-1] == 0
    for address in (8192, 12288, 16384):
        maps(address)
    assert len(maps.made) <= 3 and maps(16384)[1] == 16384
