"""CUDA faked onto the CPU, for `bash benchmarks/gpu_check.sh --rehearse`.

Runs a script or a module with torch.cuda reporting one device ("fake CUDA
(CPU rehearsal)") and every tensor asked for on "cuda" made on the CPU, so the
GPU steps' own logic -- test parametrisation, argument checks, the benchmark's
sizing and bookkeeping, the files it writes -- runs on a machine without a
GPU. The kernels that run are the CPU's: nothing this prints is a GPU figure.

    python benchmarks/fake_cuda.py -m pytest -q tests/test_cuda.py
    python benchmarks/fake_cuda.py benchmarks/bench_vote.py --device cuda --quick
    python benchmarks/fake_cuda.py -c "import torch; print(torch.ones(2, device='cuda'))"

It sets FASTVOTE_FAKE_CUDA=1; tests that only mean something on the real
device (memory statistics, dispatcher keys, device mismatches, 2^31-element
inputs) skip themselves under it. Child processes are not faked.
"""
from __future__ import annotations

import contextlib
import os
import runpy
import sys

import torch
from torch.overrides import TorchFunctionMode

DEVICE_NAME = "fake CUDA (CPU rehearsal)"


def _host(device):
    """"cuda", "cuda:1", torch.device("cuda") -> the CPU; anything else unchanged."""
    if isinstance(device, (str, torch.device)):
        try:
            if torch.device(device).type == "cuda":
                return torch.device("cpu")
        except RuntimeError:  # a string that is no device, e.g. a dtype name
            pass
    return device


class _CudaOnCpu(TorchFunctionMode):
    """Rewrites every device argument that names CUDA to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _host(kwargs["device"])
        if func is torch.Tensor.to:
            args = tuple(_host(a) for a in args)
        return func(*args, **kwargs)


class _Generator(torch.Generator):
    """torch.Generator("cuda") -> a CPU generator (still a torch.Generator)."""

    def __new__(cls, device="cpu"):
        return super().__new__(cls, _host(device))

    def __init__(self, device="cpu"):
        pass


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


def _host_memory():
    """(available, total) bytes of host memory, standing in for mem_get_info."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return info.get("MemAvailable", info["MemFree"]), info["MemTotal"]


def install() -> None:
    """Fakes torch.cuda for the rest of this process."""
    os.environ["FASTVOTE_FAKE_CUDA"] = "1"
    cuda = torch.cuda
    cuda.is_available = lambda: True
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: 0
    cuda.get_device_name = lambda device=None: DEVICE_NAME
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.mem_get_info = lambda device=None: _host_memory()
    cuda.Stream = _Stream
    cuda.current_stream = lambda device=None: _Stream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.device = lambda device=None: contextlib.nullcontext()
    torch.Generator = _Generator
    _CudaOnCpu().__enter__()  # for the life of the process


def main(argv) -> None:
    if not argv or argv[0] in ("-h", "--help") or (argv[0] in ("-m", "-c") and len(argv) < 2):
        raise SystemExit("usage: python benchmarks/fake_cuda.py (-m MODULE | -c CODE | SCRIPT) [ARGS...]")
    install()
    if argv[0] == "-m":
        sys.argv = [argv[1]] + argv[2:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c"] + argv[2:]
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
