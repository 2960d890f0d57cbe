import os

import pytest
import torch

import fastvote.ops as ops

# The compiled ops are what these tests are about: a missing extension is a
# failure, not a reason to test the reference against itself. Only the
# fallback test (run in a subprocess) sees the reference ops on purpose.
if not ops.HAS_EXTENSION and os.environ.get("FASTVOTE_DISABLE_EXTENSION") != "1":
    raise RuntimeError("fastvote._C did not build or import; the op tests need the compiled ops")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def cpu_kernels():
    """The CPU micro-kernel variants this machine can run (each is tested),
    the certified bf16 ones included (bf16emu runs everywhere)."""
    from fastvote import _C

    names = []
    for name in ("amxbf16", "avx512bf16", "avx512", "avx2", "portable", "bf16emu"):
        os.environ["FASTVOTE_CPU_KERNEL"] = name
        try:
            _C.cpu_kernel()
            names.append(name)
        except (RuntimeError, ValueError):
            pass
        finally:
            del os.environ["FASTVOTE_CPU_KERNEL"]
    return names


@pytest.fixture(autouse=True)
def _collect_ffcv_garbage():
    """FFCV loaders leave numba finalizers behind; collecting them between tests
    keeps them from firing inside a later ast.parse (a CPython 3.11.7 bug that
    fails the session with 'AST constructor recursion depth mismatch')."""
    yield
    import gc

    gc.collect()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine
    OpenMP's barriers make two threads 10x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Killed(Exception):
    """A training run "killed" after an epoch (see kill_after)."""


def kill_after(epoch_to_die):
    """An on_epoch_end hook that raises Killed after epoch `epoch_to_die` (its checkpoint is written)."""
    def on_epoch_end(epoch, history):
        if epoch == epoch_to_die:
            raise Killed
    return on_epoch_end
