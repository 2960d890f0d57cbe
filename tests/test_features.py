"""The surrogate's forward pass on the CPU (issue 23): the bf16 gate on the CPU's
flags, channels-last weights for the pass only, precision in the cache key."""
import pytest
import torch
from torch import nn

from fastvote import features
from fastvote.features import autocast_dtype, collect, cpu_flags, iterate_outputs, precision
from fastvote.models import build_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def fake_flags(monkeypatch, *flags):
    monkeypatch.setattr(features, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(features, "_onednn_runs_bf16", lambda: True)


def test_cpu_flags_are_read_off_cpuinfo_and_empty_without_it(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
                    "bugs\t\t: none\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "absent")) == frozenset()


@pytest.mark.parametrize("flags, default", [
    (("avx2", "avx512f", "avx512_bf16"), torch.bfloat16),   # Zen 4/5, Cooper Lake
    (("avx2", "avx512f", "amx_bf16", "amx_tile"), torch.bfloat16),  # Sapphire Rapids
    (("avx2", "avx512f", "avx512_vnni"), None),            # Ice Lake: no bf16 units, bf16 emulated
    (("avx2", "fma"), None),                                # Zen 3
])
def test_bf16_is_the_cpu_default_only_with_bf16_units(monkeypatch, flags, default):
    fake_flags(monkeypatch, *flags)
    assert autocast_dtype(None, CPU) == default
    assert precision(None, CPU) == ("float32" if default is None else "bfloat16")
    # amp= stays an explicit switch on every CPU, and CUDA keeps float16
    assert autocast_dtype(True, CPU) == torch.bfloat16 and autocast_dtype(False, CPU) is None
    assert autocast_dtype(None, CUDA) == torch.float16 and autocast_dtype(False, CUDA) is None
    assert precision(False, CUDA) == "float32" and precision(None, CUDA) == "float16"


def test_an_isa_cap_below_bf16_makes_float32_the_default(monkeypatch):
    fake_flags(monkeypatch, "avx2", "avx512f", "amx_bf16")
    monkeypatch.setattr(features, "_onednn_runs_bf16", lambda: False)
    assert autocast_dtype(None, CPU) is None and autocast_dtype(True, CPU) == torch.bfloat16


def test_onednn_reads_its_isa_cap_from_the_environment():
    """The real check, in a fresh process (oneDNN reads the cap once): capped at AVX2,
    no CPU runs bf16 natively, so the default is float32 on every CPU."""
    import os
    import subprocess
    import sys

    code = "import torch; from fastvote import features; print(features.autocast_dtype(None, 'cpu'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}).stdout
    assert out.strip() == "None"


def test_amp_must_be_none_or_a_bool():
    with pytest.raises(ValueError, match="amp='yes'"):
        autocast_dtype("yes", CPU)


def _batches(n=2, size=4, px=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, px, px, generator=gen), torch.zeros(size, dtype=torch.int64)) for _ in range(n)]


def _nchw_reference(model, batches):
    """The pass before issue 23: float32, NCHW."""
    with torch.inference_mode():
        return torch.cat([model.features(x) for x, _ in batches])


@pytest.mark.parametrize("arch", ["small", "resnet18"])
def test_the_pass_matches_float32_nchw_and_leaves_the_callers_layout(arch):
    model = build_model(arch, 5, image_size=16, seed=0).eval()
    batches = _batches()
    expected = _nchw_reference(model, batches)
    weights = {name: p for name, p in model.named_parameters()}
    got = collect(model, batches, device="cpu", want=("features",), amp=False, progress=False)["features"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # only the summation order differs
    for name, p in model.named_parameters():
        assert p is weights[name]  # the same Parameters, back in the caller's layout
        assert p.is_contiguous(), name


@pytest.mark.parametrize("fold", [True, False])
def test_a_channels_last_model_stays_channels_last_and_a_closed_pass_restores(monkeypatch, fold):
    monkeypatch.setattr(features, "FOLD_MIN_BATCHES", 2)  # (_batches(): 2)
    if not fold:  # a model nothing folds in: the pass converts the caller's weights, then restores them
        monkeypatch.setattr(features, "_folded", lambda net, want: None)
    model = build_model("small", 5, image_size=16, seed=0).eval().to(memory_format=torch.channels_last)
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    list(iterate_outputs(model, _batches(), device="cpu", progress=False))
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)

    plain = build_model("small", 5, image_size=16, seed=0).eval()
    stream = iterate_outputs(plain, _batches(), device="cpu", progress=False)
    next(stream)
    # folded: the pass runs a copy, the caller's weights are never touched
    assert all(p.is_contiguous() for p in plain.parameters() if p.dim() == 4) == fold
    stream.close()
    assert all(p.is_contiguous() for p in plain.parameters())


@pytest.mark.parametrize("want", [("features",), ("logits",), ("features", "logits"), ("logits", "features")])
def test_the_folded_pass_gives_every_output_and_leaves_the_model_as_it_was(want):
    model = build_model("resnet18", 5, image_size=16, seed=0).eval()
    assert features._folded(model, want) is not None  # ResNet-18 folds: its 20 BatchNorms follow convolutions
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches(features.FOLD_MIN_BATCHES)
    with torch.inference_mode():
        expected = {"logits": torch.cat([model(x) for x, _ in batches]),
                    "features": torch.cat([model.features(x) for x, _ in batches])}
    got = collect(model, batches, device="cpu", want=want, amp=False, progress=False)
    for name in want:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20


def test_a_short_pass_is_not_folded(monkeypatch):
    calls = []
    monkeypatch.setattr(features, "_folded", lambda net, want: calls.append(want))
    model = build_model("small", 5, image_size=16, seed=0).eval()
    collect(model, _batches(features.FOLD_MIN_BATCHES - 1), device="cpu", progress=False)
    assert calls == []  # (copying and tracing the model would cost more than it saves)
    collect(model, iter(_batches(1)), device="cpu", progress=False)  # unknown length: folded
    assert len(calls) == 1


def test_a_model_that_does_not_trace_runs_unfolded():
    class Branchy(nn.Module):  # data-dependent Python: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

        def features(self, x):
            x = self.bn(self.conv(x))
            return (x if float(x.sum()) > 0 else -x).mean((2, 3))

        def forward(self, x):
            return self.fc(self.features(x))

    model = Branchy().eval()
    assert features._folded(model, ("features",)) is None
    batches = _batches(features.FOLD_MIN_BATCHES)
    got = collect(model, batches, device="cpu", want=("features",), amp=False, progress=False)["features"]
    torch.testing.assert_close(got, _nchw_reference(model, batches), rtol=1e-5, atol=1e-5)


def test_a_4d_buffer_is_restored_too():
    class WithBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("scale", torch.rand(1, 4, 14, 14))  # a 16 px input: 14 x 14 maps
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc((self.conv(x) * self.scale).mean((2, 3)))

    model = WithBuffer()
    buffer = model.scale
    list(iterate_outputs(model, _batches(), device="cpu", want=("logits",), progress=False))
    assert model.scale is buffer


def test_bf16_autocast_on_request_and_the_callers_autocast_state_left_alone():
    model = build_model("small", 5, image_size=16, seed=0).eval()
    batches = _batches()
    expected = _nchw_reference(model, batches)
    got = collect(model, batches, device="cpu", want=("features",), amp=True, progress=False)["features"]
    assert got.dtype == torch.float32
    assert not torch.equal(got, expected)  # it did run in bf16 ...
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)  # ... to bf16's ~3 significant digits
    assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast: amp=False runs float32 inside it
        inside = collect(model, batches, device="cpu", want=("features",), amp=False, progress=False)["features"]
        assert torch.is_autocast_enabled("cpu")
    torch.testing.assert_close(inside, expected, rtol=1e-4, atol=1e-4)


def test_cached_outputs_are_keyed_by_precision():
    from fastvote.surrogate import Surrogate

    sur = Surrogate(kind="module", fingerprint="weights", prep={"resolution": 16, "mean": [0.5] * 3,
                                                                "std": [0.25] * 3}, num_classes=5, entry={})
    keys = {p: sur.outputs_key(p) for p in ("float32", "bfloat16", "float16")}
    assert len(set(keys.values())) == 3 and sur.outputs_key("float32") == keys["float32"]


def test_a_surrogates_cache_key_names_its_training_precision(monkeypatch):
    """amp=None trains in bfloat16 on a CPU with bf16 units and in float32 on
    another: two different surrogates, two cache entries; amp=False is one
    everywhere; float16 on CUDA is another."""
    from fastvote.surrogate import Recipe
    from fastvote.train import TrainConfig

    def key(amp, bf16_units, device="cpu"):
        monkeypatch.setattr(features, "cpu_has_bf16_units", lambda: bf16_units)
        recipe = Recipe.default("tiny", 8, (0.5,) * 3, (0.25,) * 3, TrainConfig(amp=amp), seed=0)
        return recipe.key("source-fingerprint", device)

    assert key(None, True) != key(None, False)
    assert key(False, True) == key(False, False)
    assert key(None, False, "cuda") == key(None, True, "cuda") != key(None, True)  # float16 on CUDA
