"""`launch._launch`: the first call of a key goes through the kernel's launcher and stores the
compiled kernel with its constant parameters in order; a repeat call of the key launches that
kernel directly with the same arguments (a parameter the caller's constants leave out at its
default). The kernel is a stand-in that records its launches; its parameters are the real
warp-specialised prompt kernel's, whose last two have defaults."""
from skattn import launch
from skattn.kernels import prefill_ws


class Compiled:
    packed_metadata = "meta"
    function = "fn"

    def __init__(self, log):
        self.log = log

    def run(self, *args):
        self.log.append(("direct", args))


class Kernel:
    params = prefill_ws.ws_prefill_kernel.params

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def call(*args, **const):
            self.log.append(("jit", grid, args, const))
            return Compiled(self.log)

        return call


def test_repeat_key_launches_the_compiled_kernel_with_every_parameter():
    kernel = Kernel()
    names = [p.name for p in kernel.params]
    first_const = names.index("HEAD_DIM")
    args = tuple(range(first_const))  # stand-ins for the runtime arguments
    const = {name: i for i, name in enumerate(names[first_const:]) if name not in
             ("PINGPONG", "SUM_MMA")}
    key = ("test key",)
    try:
        for _ in range(2):
            launch._launch(kernel, key, args, const, (3, 1, 1), "stream")
    finally:
        launch._COMPILED.pop(key, None)
    (how, grid, jit_args, jit_const), (how2, run_args) = kernel.log
    assert (how, grid, jit_args, jit_const) == ("jit", (3, 1, 1), args, const)
    tail = tuple(const.get(name, False) for name in names[first_const:])  # defaults: False
    assert how2 == "direct"
    assert run_args == (3, 1, 1, "stream", "fn", "meta", None, None, None, *args, *tail)
    assert len(run_args) - 9 == len(names)


def test_no_key_always_goes_through_the_launcher():
    kernel = Kernel()
    for _ in range(2):
        launch._launch(kernel, None, (1,), {}, (1, 1, 1), None)
    assert [entry[0] for entry in kernel.log] == ["jit", "jit"]
