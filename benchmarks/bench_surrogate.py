"""The surrogate's feature pass on the CPU: layout and precision, side by side in one process.

Per model, the same batches through (interleaved, `--rounds` times, the median reported, as a
shared machine's load moves):
  fp32 NCHW            the CPU pass before issue 23 (eval, inference_mode)
  fp32 channels_last   weights and images channels-last
  bf16 channels_last   + bfloat16 autocast (native on avx512_bf16 / AMX, emulated and slow without)
  fastvote default     fastvote.features.iterate_outputs with its defaults on this CPU (from 8
                       batches BatchNorms folded into the convolutions, its copy and trace timed too)
Models: ResNet-18 at 224 px (the paper's surrogate, batch 64), the demo's "small" CNN at 16 px
(batch 256) and EfficientNet-Lite0 at 224 px (the photo example's surrogate, where installed).

With --train: a training step instead (forward, cross-entropy, backward, SGD with momentum; 30
classes; ResNet-18 at batch 32, the small CNN at 256), in fp32 NCHW, fp32 channels_last, bf16
channels_last.

    python benchmarks/bench_surrogate.py --threads 2 --rounds 5
    python benchmarks/bench_surrogate.py --train --models resnet18,small --rounds 3

With --isa avx2 the process reruns itself with torch's own kernels, oneDNN and MKL capped at AVX2
(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS): the code paths of an AVX2-only
CPU on this one, a stand-in until such a CPU measures it (its caches and clocks are this CPU's).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}
    return f"{fields.get('Model name', '?')} (family {fields.get('CPU family', '?')} model {fields.get('Model', '?')})"


def models(which):
    from fastvote import models as fvmodels

    if "resnet18" in which:
        yield "resnet18", fvmodels.build_model("resnet18", 1000, image_size=224, seed=0), 224, 64
    if "small" in which:
        yield "small (demo)", fvmodels.build_model("small", 30, image_size=16, seed=0), 16, 256
    if "efficientnet_lite0" in which:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            print("efficientnet-lite-pytorch not installed: EfficientNet-Lite0 skipped", file=sys.stderr)
            return
        yield "efficientnet_lite0", fvmodels.as_classifier(EfficientNet.from_name("efficientnet-lite0")), 224, 64


def raw_pass(model, images, channels_last: bool, bf16: bool) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for x in images:
            model.features(x.contiguous(memory_format=fmt)).float()
    model.to(memory_format=torch.contiguous_format)


def default_pass(model, images) -> None:
    from fastvote.features import iterate_outputs

    batches = [(x, torch.zeros(len(x), dtype=torch.int64)) for x in images]
    for _ in iterate_outputs(model, batches, device="cpu", want=("features",), progress=False):
        pass


def train_steps(model, images, channels_last: bool, bf16: bool, steps: int = 1) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = images[0].contiguous(memory_format=fmt)
    y = torch.arange(len(x)) % 30
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    model.to(memory_format=torch.contiguous_format).eval()


def main(argv=None) -> int:
    from fastvote import models as fvmodels
    from fastvote.features import autocast_dtype, cpu_flags

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", type=int, default=8,
                   help="batches a timed pass (fastvote's default folds BatchNorms from 8: FOLD_MIN_BATCHES)")
    p.add_argument("--models", default="resnet18,small,efficientnet_lite0")
    p.add_argument("--skip-bf16", action="store_true", help="leave out bf16 (slow where emulated)")
    p.add_argument("--train", action="store_true", help="time training steps instead of the feature pass")
    p.add_argument("--isa", choices=("native", "avx2"), default="native",
                   help="avx2: run with torch's kernels, oneDNN and MKL capped at AVX2")
    args = p.parse_args(argv)
    if args.isa == "avx2" and os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2":
        # (the caps are read when torch first dispatches: set them for a fresh process)
        args_again = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *args_again], {**os.environ, **AVX2_CAPS})
    torch.set_num_threads(args.threads)
    flags = cpu_flags()
    units = sorted(flags & {"avx512_bf16", "amx_bf16"}) or ["none"]
    default = autocast_dtype(None, torch.device("cpu"))
    capped = f" capped at {torch.backends.cpu.get_cpu_capability()}" if args.isa != "native" else ""
    print(f"{cpu_model()}{capped}; {args.threads} threads; torch {torch.__version__}; bf16 units: {', '.join(units)}; "
          f"fastvote's default here: {'bf16 autocast' if default else 'fp32'}, channels_last\n")
    modes = {"fp32 NCHW (before)": lambda m, x: raw_pass(m, x, False, False),
             "fp32 channels_last": lambda m, x: raw_pass(m, x, True, False),
             "bf16 channels_last": lambda m, x: raw_pass(m, x, True, True),
             "fastvote default": default_pass}
    if args.train:
        modes = {"fp32 NCHW (before)": lambda m, x: train_steps(m, x, False, False),
                 "fp32 channels_last": lambda m, x: train_steps(m, x, True, False),
                 "bf16 channels_last": lambda m, x: train_steps(m, x, True, True)}
    if args.skip_bf16:
        del modes["bf16 channels_last"]
    print("| model | px | batch | " + " | ".join(modes) + " |")
    print("|---|---|---|" + "---|" * len(modes))
    for name, model, px, batch in models(args.models.split(",")):
        model.eval()
        if args.train:
            if name.split()[0] not in fvmodels.ARCHS:
                continue
            model = fvmodels.build_model(name.split()[0], 30, image_size=px, seed=0)
            batch, args.batches = (32 if px > 64 else batch), 1
        gen = torch.Generator().manual_seed(0)
        images = [torch.randn(batch, 3, px, px, generator=gen) for _ in range(args.batches)]
        for run in modes.values():  # warm-up: oneDNN's primitive caches, first-touch allocations
            run(model, images[:1])
        times = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode, run in modes.items():
                started = time.perf_counter()
                run(model, images)
                times[mode].append(time.perf_counter() - started)
        rates = {mode: batch * args.batches / statistics.median(t) for mode, t in times.items()}
        base = rates["fp32 NCHW (before)"]
        cells = [f"{r:.1f} ({r / base:.2f}x)" for r in rates.values()]
        print(f"| {name} | {px} | {batch} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{'training' if args.train else 'feature-pass'} images/s, median of the rounds (ratio to fp32 NCHW)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
