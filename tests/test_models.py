"""Architectures, checkpoints, user-module views (fastvote.models) and running a
model over a loader (fastvote.features)."""
import sys

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastvote.features import collect, iterate_outputs
from torchvision.models.vision_transformer import VisionTransformer

from fastvote.models import (ARCHS, IMAGENET_MEAN, IMAGENET_STD, as_classifier, build_model,
                             load_checkpoint, load_model, load_state_dict_flexible,
                             load_surrogate, preprocessing_of, save_checkpoint, vit_patch_size)

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048,
                "tiny": 64, "small": 256, "vit_b_16": 768, "vit_s_16": 384, "vit_t_16": 192}
VITS = ("vit_b_16", "vit_s_16", "vit_t_16")


pytestmark = pytest.mark.usefixtures("one_thread")


def equal_states(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_gives_logits_and_pooled_features(arch):
    side = 8 if arch in ("resnet50", "resnet101") else 16  # the deep ones: a tiny input
    model = build_model(arch, 7, image_size=side, seed=0).eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        logits, features = model.forward_both(x)
        assert torch.equal(logits, model(x))
        assert torch.equal(features, model.features(x))
    assert logits.shape == (2, 7) and features.shape == (2, FEATURE_DIMS[arch])
    assert model.feature_dim == FEATURE_DIMS[arch] and model.num_classes == 7
    assert model.arch == arch and model.image_size == side


@pytest.mark.parametrize("image_size, small_images, expect_small", [
    (16, None, True), (32, None, True), (64, None, True), (96, None, False),
    (224, None, False), (None, None, False), (224, True, True), (32, False, False)])
def test_small_image_stem_is_chosen_from_the_image_size(image_size, small_images, expect_small):
    model = build_model("resnet18", 10, image_size=image_size, small_images=small_images)
    conv1 = model.backbone.conv1
    if expect_small:
        assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
        assert isinstance(model.backbone.maxpool, nn.Identity)
    else:
        assert conv1.kernel_size == (7, 7) and conv1.stride == (2, 2)
        assert isinstance(model.backbone.maxpool, nn.MaxPool2d)
    assert model.small_images is expect_small


def test_tiny_is_about_25k_parameters_and_takes_any_size():
    model = build_model("tiny", 10)
    assert 20_000 <= sum(p.numel() for p in model.parameters()) <= 30_000
    model.eval()
    for side in (8, 16, 32):
        assert model(torch.randn(2, 3, side, side)).shape == (2, 10)


def test_seeded_build_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = build_model("tiny", 5, seed=3), build_model("tiny", 5, seed=3)
    assert equal_states(a, b)
    assert torch.equal(torch.get_rng_state(), before)
    assert not equal_states(a, build_model("tiny", 5, seed=4))


@pytest.mark.parametrize("kwargs, match", [
    ({"arch": "resnet9", "num_classes": 10}, "arch='resnet9'"),
    ({"arch": "tiny", "num_classes": 0}, "num_classes=0"),
    ({"arch": "tiny", "num_classes": 10, "image_size": -3}, "image_size=-3"),
])
def test_build_model_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------

def test_checkpoint_round_trip_rebuilds_without_arguments(tmp_path):
    model = build_model("resnet18", 4, image_size=32, seed=0).eval()
    path = save_checkpoint(tmp_path / "sub" / "surrogate.pt", model, classes=["a", "b", "c", "d"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["surrogate.pt"]  # no temp left
    loaded = load_model(path).eval()
    assert loaded.arch == "resnet18" and loaded.small_images and loaded.image_size == 32
    assert equal_states(model, loaded)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert load_checkpoint(path)["extra"] == {"classes": ["a", "b", "c", "d"]}
    again, extra = load_model(path, with_extra=True)
    assert extra == {"classes": ["a", "b", "c", "d"]} and equal_states(again, model)


def test_checkpoint_of_a_wrapped_model_has_plain_keys(tmp_path):
    model = build_model("tiny", 3, seed=0)
    save_checkpoint(tmp_path / "m.pt", nn.DataParallel(model))
    keys = load_checkpoint(tmp_path / "m.pt")["state_dict"]
    assert not any(k.startswith("module.") for k in keys)
    assert equal_states(load_model(tmp_path / "m.pt"), model)


@pytest.mark.parametrize("wrap", [
    lambda s: {"module." + k: v for k, v in s.items()},
    lambda s: {"_orig_mod." + k: v for k, v in s.items()},
    lambda s: {"module._orig_mod." + k: v for k, v in s.items()},
    lambda s: {"state_dicts": {"network": {"module." + k: v for k, v in s.items()}}},
    lambda s: {"state_dict": s, "epoch": 3},
])
def test_flexible_load_tolerates_prefixes_and_wrappers(wrap):
    source = build_model("tiny", 3, seed=0)
    target = build_model("tiny", 3, seed=1)
    load_state_dict_flexible(target, wrap(source.state_dict()))
    assert equal_states(source, target)


def test_flexible_load_into_a_wrapped_model():
    source, target = build_model("tiny", 3, seed=0), build_model("tiny", 3, seed=1)
    load_state_dict_flexible(nn.DataParallel(target), source.state_dict())
    assert equal_states(source, target)


def test_flexible_load_reads_torchvision_resnet_layout():
    reference = torchvision.models.resnet18(num_classes=6).eval()
    model = build_model("resnet18", 6).eval()
    load_state_dict_flexible(model, {"module." + k: v for k, v in reference.state_dict().items()})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_flexible_load_names_missing_unexpected_and_mismatched_keys():
    with pytest.raises(ValueError, match=r"missing keys \d+ \(backbone\.0\.weight"):
        load_state_dict_flexible(build_model("tiny", 3), build_model("resnet18", 3).state_dict())
    with pytest.raises(ValueError, match=r"head\.weight: \(5, 64\) in the state, \(3, 64\)"):
        load_state_dict_flexible(build_model("tiny", 3), build_model("tiny", 5).state_dict())


def test_load_model_refuses_what_it_cannot_rebuild(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_model(tmp_path / "nothing.pt")
    torch.save(build_model("tiny", 3).state_dict(), tmp_path / "raw.pt")
    with pytest.raises(ValueError, match="not a fastvote model checkpoint"):
        load_model(tmp_path / "raw.pt")
    save_checkpoint(tmp_path / "user.pt", as_classifier(nn.Sequential(nn.Flatten(),
                                                                      nn.Linear(12, 2))))
    with pytest.raises(ValueError, match="arch=None"):
        load_model(tmp_path / "user.pt")


# --------------------------------------------------------------------------
# User modules
# --------------------------------------------------------------------------

def test_as_classifier_views_a_torchvision_net_without_changing_it():
    net = torchvision.models.resnet18(num_classes=5).eval()
    view = as_classifier(net, example=torch.randn(2, 3, 32, 32))
    assert isinstance(net.fc, nn.Linear)  # untouched
    assert view.head is net.fc and view.feature_dim == 512 and view.num_classes == 5
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, features = view.forward_both(x)
        assert torch.allclose(logits, net(x)) and features.shape == (3, 512)
    assert view.backbone.conv1 is net.conv1  # parameters shared, not copied


def test_as_classifier_uses_the_last_linear_of_any_net():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 4))).eval()
    view = as_classifier(net, example=torch.randn(2, 3, 8, 8))
    assert view.head is net[4][1] and isinstance(net[4][1], nn.Linear)
    assert view.features(torch.randn(2, 3, 8, 8)).shape == (2, 8)
    assert as_classifier(view) is view
    assert as_classifier(nn.DataParallel(view)) is view


def test_as_classifier_errors_name_the_problem():
    with pytest.raises(TypeError, match="has no nn.Linear"):
        as_classifier(nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1)))
    with pytest.raises(TypeError, match="expected an nn.Module"):
        as_classifier(lambda x: x)
    softmaxed = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Softmax(dim=1))
    with pytest.raises(ValueError, match="differs from its head '1'"):
        as_classifier(softmaxed, example=torch.randn(2, 3, 2, 2))


# --------------------------------------------------------------------------
# fastvote.features
# --------------------------------------------------------------------------

def _loader(n=37, side=16, batch_size=8, identifiers=True):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, 3, side, side, generator=g), torch.randint(0, 4, (n,), generator=g)]
    if identifiers:
        tensors.append(torch.arange(100, 100 + n))
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


def test_iterate_outputs_streams_batches_with_labels_and_identifiers():
    model = build_model("tiny", 4, seed=0)
    loader = _loader()
    batches = list(iterate_outputs(model, loader, device="cpu", progress=False))
    assert len(batches) == len(loader) and model.training  # mode restored
    first = batches[0]
    assert set(first) == {"logits", "features", "labels", "identifiers"}
    assert first["logits"].dtype == torch.float32 and first["logits"].shape == (8, 4)
    assert first["features"].shape == (8, 64) and first["labels"].dtype == torch.int64
    images = loader.dataset.tensors[0]
    model.eval()
    with torch.no_grad():
        expected_logits, expected_features = model.forward_both(images)
    # amp=False: float32, as the reference (on a CPU with bf16 units the default is bfloat16)
    got = collect(model, loader, device="cpu", progress=False, amp=False)
    assert torch.allclose(got["logits"], expected_logits, atol=1e-6)
    assert torch.allclose(got["features"], expected_features, atol=1e-6)
    assert torch.equal(got["identifiers"], torch.arange(100, 137))
    assert not got["logits"].is_inference()


def test_iterate_outputs_gives_only_what_is_wanted():
    loader = _loader(identifiers=False)
    out = collect(build_model("tiny", 4), loader, device="cpu", want=("features",),
                  progress=False)
    assert set(out) == {"features", "labels"} and out["features"].shape == (37, 64)
    # logits alone: any module giving logits
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    assert collect(plain, loader, device="cpu", want=("logits",), progress=False)[
        "logits"].shape == (37, 4)


def test_iterate_outputs_rejects_bad_arguments():
    model = build_model("tiny", 4)
    with pytest.raises(ValueError, match="want=\\('probs',\\)"):
        next(iterate_outputs(model, _loader(), device="cpu", want=("probs",)))
    with pytest.raises(ValueError, match="amp='yes'"):
        next(iterate_outputs(model, _loader(), device="cpu", amp="yes"))
    with pytest.raises(ValueError, match="a batch was a Tensor"):
        next(iterate_outputs(model, [torch.randn(2, 3, 8, 8)], device="cpu", progress=False))
    with pytest.raises(ValueError, match="yielded no batch"):
        collect(model, [], device="cpu", progress=False)


# --------------------------------------------------------------------------
# Vision Transformers
# --------------------------------------------------------------------------

@pytest.mark.parametrize("arch, image_size, patch", [
    *[(arch, side, side // 8) for arch in VITS for side in (16, 32)],
    ("vit_t_16", None, 16),  # ImageNet stem at 224 px: only the smallest, to stay fast
])
def test_vits_give_class_token_features_at_their_size(arch, image_size, patch):
    model = build_model(arch, 7, image_size=image_size, seed=0).eval()
    side = image_size or 224
    assert model.backbone.patch_size == patch and model.backbone.image_size == side
    assert isinstance(model.backbone.heads, nn.Identity)
    assert model.image_size == side and model.small_images is (image_size is not None)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        logits, features = model.forward_both(x)
        assert torch.equal(logits, model(x))
    assert logits.shape == (2, 7) and features.shape == (2, FEATURE_DIMS[arch])
    assert model.feature_dim == FEATURE_DIMS[arch]


def test_vit_b_16_is_torchvisions_vit_b_16_without_its_head():
    with torch.device("meta"):  # shapes only: nothing allocated or initialised
        ours = build_model("vit_b_16", 1000)
        reference = torchvision.models.vit_b_16(weights=None)
    shapes = {k: v.shape for k, v in reference.state_dict().items()
              if not k.startswith("heads.")}
    assert {k: v.shape for k, v in ours.backbone.state_dict().items()} == shapes
    assert ours.image_size == 224 and ours.backbone.patch_size == 16
    assert sum(p.numel() for p in ours.parameters()) == \
        sum(p.numel() for p in reference.parameters())  # 86.6M
    # the "surrogate ~100x smaller" arithmetic of the module docstring
    with torch.device("meta"):
        sizes = {arch: sum(p.numel() for p in build_model(arch, 10).backbone.parameters())
                 for arch in ("tiny", "resnet18", "vit_t_16", "vit_s_16", "vit_b_16")}
    assert sizes["tiny"] * 3000 < sizes["vit_b_16"] < sizes["resnet18"] * 8
    assert 5.0e6 < sizes["vit_t_16"] < 6.0e6 and 21e6 < sizes["vit_s_16"] < 22e6


@pytest.mark.parametrize("image_size, small_images, patch", [
    (2, True, 2), (8, True, 2), (16, True, 2), (20, True, 2), (24, True, 3), (28, True, 2),
    (32, True, 4), (64, True, 8), (224, True, 28), (32, False, 16), (224, False, 16)])
def test_vit_patch_size_rule(image_size, small_images, patch):
    assert vit_patch_size(image_size, small_images) == patch
    assert image_size % patch == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"image_size": 100}, r"image_size=100: .*expected a multiple of 16"),
    ({"image_size": 40, "small_images": False}, r"image_size=40: .*multiple of 16"),
    ({"image_size": 15}, r"image_size=15: .*divisor of the side in \[2, 2\]"),
    ({"image_size": None, "small_images": True}, r"image_size=None with small_images=True"),
])
def test_vit_rejects_an_image_size_its_patch_does_not_divide(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model("vit_t_16", 10, **kwargs)


def test_seeded_vit_build_is_reproducible():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_model("vit_t_16", 5, image_size=16, seed=3)
    b = build_model("vit_t_16", 5, image_size=16, seed=3)
    assert equal_states(a, b) and torch.equal(torch.get_rng_state(), before)
    assert not equal_states(a, build_model("vit_t_16", 5, image_size=16, seed=4))


@pytest.mark.parametrize("image_size, small_images, patch", [(24, None, 3), (32, False, 16)])
def test_vit_checkpoint_round_trip_rebuilds_the_same_patch(tmp_path, image_size, small_images,
                                                            patch):
    model = build_model("vit_t_16", 4, image_size=image_size, small_images=small_images,
                        seed=0).eval()
    loaded = load_model(save_checkpoint(tmp_path / "vit.pt", model)).eval()
    assert loaded.arch == "vit_t_16" and loaded.image_size == image_size
    assert loaded.backbone.patch_size == patch and equal_states(model, loaded)
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def _small_torchvision_vit(num_classes=5, **kwargs):
    net = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                            hidden_dim=32, mlp_dim=64, num_classes=num_classes, **kwargs)
    nn.init.normal_(net.heads.head.weight)  # torchvision zeroes it: all logits would be 0
    return net.eval()


@pytest.mark.parametrize("representation_size, feature_dim", [(None, 32), (16, 16)])
def test_as_classifier_finds_a_torchvision_vit_head(representation_size, feature_dim):
    net = _small_torchvision_vit(representation_size=representation_size)
    view = as_classifier(net, example=torch.randn(2, 3, 32, 32))
    assert view.head is net.heads.head and isinstance(net.heads.head, nn.Linear)  # untouched
    assert view.feature_dim == feature_dim and view.num_classes == 5
    assert view.backbone.conv_proj is net.conv_proj  # parameters shared, not copied
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, features = view.forward_both(x)
        assert torch.allclose(logits, net(x)) and features.shape == (3, feature_dim)


def test_flexible_load_reads_torchvision_vit_layout():
    reference = VisionTransformer(image_size=32, patch_size=4, num_layers=12, num_heads=3,
                                  hidden_dim=192, mlp_dim=768, num_classes=6)  # vit_t_16's
    nn.init.normal_(reference.heads.head.weight)
    reference.eval()
    model = build_model("vit_t_16", 6, image_size=32).eval()
    load_state_dict_flexible(model, reference.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_vit_t_16_trains():
    model = build_model("vit_t_16", 4, image_size=16, seed=0).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)  # no warm-up: small
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.backbone.parameters())  # gradients reach the whole backbone


# --------------------------------------------------------------------------
# Surrogates users already have: torchvision / timm archs, load_surrogate,
# as_classifier(features=), preprocessing_of
# --------------------------------------------------------------------------

# a few of each family, small enough for 2 cores; timm's test_* models are ~0.1-0.4M
FOREIGN = {"efficientnet_b0": 64, "mobilenet_v3_small": 64, "timm:test_resnet": 64,
           "timm:test_vit": 160}  # arch -> input side (test_vit takes only 160)


def library_model(arch, num_classes, seed):
    """``arch`` built by its own library under ``seed``, as build_model should build it."""
    torch.manual_seed(seed)
    if arch.startswith("timm:"):
        return timm.create_model(arch[5:], pretrained=False, num_classes=num_classes)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


@pytest.mark.parametrize("arch", FOREIGN)
def test_build_model_builds_torchvision_and_timm_models_as_their_library(arch, tmp_path):
    side = FOREIGN[arch]
    model = build_model(arch, 7, image_size=side, seed=0).eval()
    reference = library_model(arch, 7, seed=0).eval()
    assert model.arch == arch and model.image_size == side and model.small_images is None
    assert model.num_classes == 7
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        logits, features = model.forward_both(x)
        assert torch.equal(logits, reference(x)) and torch.equal(logits, model(x))
    assert features.shape == (2, model.feature_dim)
    # the checkpoint rebuilds it from its arch alone
    loaded = load_model(save_checkpoint(tmp_path / "m.pt", model)).eval()
    assert loaded.arch == arch and equal_states(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x), logits)


def test_seeded_foreign_build_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = build_model("timm:test_resnet", 5, seed=3), build_model("timm:test_resnet", 5, seed=3)
    assert equal_states(a, b) and torch.equal(torch.get_rng_state(), before)
    assert not equal_states(a, build_model("timm:test_resnet", 5, seed=4))


def test_timm_view_uses_timms_own_features_and_classifier():
    net = timm.create_model("test_convnext", num_classes=4).eval()
    view = as_classifier(net, example=torch.randn(2, 3, 64, 64))
    assert view.head is net.get_classifier()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, features = view.forward_both(x)
        assert torch.equal(features, net.forward_head(net.forward_features(x), pre_logits=True))
        assert torch.equal(logits, net(x))


@pytest.mark.parametrize("arch, match", [
    ("resnet9", r"arch='resnet9': expected one of fastvote's .*torchvision.*'timm:<name>'"),
    ("timm:no_such_model", r"arch='timm:no_such_model': .*timm.list_models"),
    ("timm:", r"arch='timm:'"),
])
def test_unknown_archs_name_the_valid_families(arch, match):
    with pytest.raises(ValueError, match=match):
        build_model(arch, 10)


def test_timm_archs_without_timm_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ImportError, match="pip install timm"):
        build_model("timm:test_resnet", 10)
    assert build_model("efficientnet_b0", 3).arch == "efficientnet_b0"  # the rest still works


def test_foreign_archs_refuse_the_small_image_stem():
    with pytest.raises(ValueError, match="small_images=True: only fastvote's"):
        build_model("efficientnet_b0", 10, small_images=True)
    assert build_model("efficientnet_b0", 10, image_size=32).image_size == 32  # recorded only


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name, save", [
    ("resnet18-f37072fd.pth", lambda s, path: torch.save(s, path)),
    ("resnet18.safetensors", lambda s, path: safetensors.torch.save_file(s, path)),
    ("wrapped.pt", lambda s, path: torch.save(
        {"state_dict": {"module." + k: v for k, v in s.items()}, "epoch": 90}, path)),
])
def test_load_surrogate_reads_torchvision_weights_as_shipped(tmp_path, name, save):
    reference = torchvision.models.resnet18(num_classes=10).eval()
    save(reference.state_dict(), tmp_path / name)
    model, info = load_surrogate(tmp_path / name, arch="resnet18")
    assert model.num_classes == 10 and model.arch == "resnet18"  # read off fc.weight
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_logits(model, x), _logits(reference, x))
    assert info["format"] == "state_dict"
    # torchvision's file name says which weights: IMAGENET1K_V1's 256 -> 224
    assert (info["resolution"], info["resize"]) == (224, 256)


@pytest.mark.parametrize("arch", ["timm:resnet10t", "timm:test_vit", "mobilenet_v3_small"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_surrogate_reads_timm_and_other_torchvision_weights(tmp_path, arch, suffix):
    reference = library_model(arch, 10, seed=0).eval()
    state = reference.state_dict()
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:  # timm's training checkpoints: {"model": ...}, maybe compiled
        torch.save({"model": {"_orig_mod." + k: v for k, v in state.items()}}, path)
    model, info = load_surrogate(path, arch=arch)
    assert model.arch == arch and model.num_classes == 10
    side = 160 if arch == "timm:test_vit" else 64
    x = torch.randn(2, 3, side, side)
    assert torch.equal(_logits(model, x), _logits(reference, x))
    assert info == {"format": "state_dict", **preprocessing_of(arch=arch)}


def test_load_surrogate_reads_a_classifiers_own_state_dict(tmp_path):
    model = build_model("mobilenet_v3_small", 4, seed=0)
    torch.save(model.state_dict(), tmp_path / "s.pt")
    loaded, _ = load_surrogate(tmp_path / "s.pt", arch="mobilenet_v3_small")
    assert equal_states(loaded, model)


def test_load_surrogate_loads_strictly_and_names_what_is_missing(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"pass arch= \(--arch on the command line\)"):
        load_surrogate(tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"missing keys \d+ \(backbone\.layer1\.2\.conv1"):
        load_surrogate(tmp_path / "r18.pth", arch="resnet34")
    with pytest.raises(ValueError, match=r"missing keys \d+ \(conv1\.0\.weight.*unexpected "
                                         r"keys \d+ \(conv1\.weight"):
        load_surrogate(tmp_path / "r18.pth", arch="timm:resnet10t")
    with pytest.raises(ValueError, match=r"head\.weight: \(10, 512\) in the state, \(5, 512\)"):
        load_surrogate(tmp_path / "r18.pth", arch="resnet18", num_classes=5)
    with pytest.raises(ValueError, match=r"fc\.weight: \(10, 512\) in the state, \(3, 512\)"):
        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(),
                   tmp_path / "r18b.pth")
        load_surrogate(tmp_path / "r18b.pth", arch="timm:resnet18", num_classes=3)
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_surrogate(tmp_path / "nothing.pt", arch="resnet18")


def test_load_surrogate_reads_fastvote_checkpoints_with_their_extra(tmp_path):
    model = build_model("tiny", 3, seed=0)
    save_checkpoint(tmp_path / "c.pt", model, resolution=16, mean=[0.5] * 3, std=[0.25] * 3)
    loaded, info = load_surrogate(tmp_path / "c.pt", arch="resnet50")  # arch: state dicts only
    assert equal_states(loaded, model) and loaded.arch == "tiny"
    assert info == {"format": "fastvote", "resolution": 16, "mean": [0.5] * 3, "std": [0.25] * 3}
    with pytest.raises(ValueError, match="3 classes; expected num_classes=4"):
        load_surrogate(tmp_path / "c.pt", num_classes=4)


def test_load_surrogate_reads_torchscript(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    net = torchvision.models.resnet18(num_classes=6).eval()
    torch.jit.save(torch.jit.script(net), tmp_path / "tv.pt")
    view, info = load_surrogate(tmp_path / "tv.pt")
    assert info == {"format": "torchscript"} and view.num_classes == 6
    assert torch.equal(_logits(view, x), _logits(net, x))  # logits: calling it
    with pytest.raises(ValueError, match="gives logits only"):
        view.features(x)  # ... and an error only when features are asked for
    # a scripted Classifier keeps features and forward_both
    model = build_model("tiny", 4, seed=0).eval()
    torch.jit.save(torch.jit.script(model), tmp_path / "fv.pt")
    view, _ = load_surrogate(tmp_path / "fv.pt", num_classes=4)
    assert (view.num_classes, view.feature_dim) == (4, 64)
    view.eval()
    with torch.no_grad():
        logits, features = view.forward_both(x)
        assert torch.equal(logits, model(x)) and torch.equal(features, model.features(x))
        assert torch.equal(view.features(x), features)
    # a traced one keeps them too (they are @torch.jit.export)
    torch.jit.save(torch.jit.trace(as_classifier(net), x), tmp_path / "traced.pt")
    view, _ = load_surrogate(tmp_path / "traced.pt")
    with torch.no_grad():
        logits, features = view.eval().forward_both(x)
        assert torch.allclose(logits, net(x), atol=1e-5)
        assert torch.allclose(features, as_classifier(net).features(x), atol=1e-5)


def test_load_surrogate_unpickles_a_trusted_module(tmp_path):
    net = torchvision.models.resnet18(num_classes=3).eval()
    torch.save(net, tmp_path / "net.pt")
    view, info = load_surrogate(tmp_path / "net.pt")
    assert info == {"format": "pickle"} and view.num_classes == 3
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_logits(view, x), _logits(net, x))


def test_features_by_submodule_name():
    net = torchvision.models.resnet18(num_classes=5).eval()
    default = as_classifier(net)
    view = as_classifier(net, features="avgpool", example=torch.randn(2, 3, 32, 32))
    assert view.head is net.fc
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, features = view.forward_both(x)
        assert torch.equal(features, default.features(x)) and torch.equal(logits, net(x))
    assert not net.avgpool._forward_hooks  # the hook is gone after each call


class AuxNet(nn.Module):
    """Returns (logits, auxiliary): the default split cannot see its features."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.body(x)
        return self.fc(self.pool(x).flatten(1)), x


def test_features_for_a_network_returning_a_tuple():
    net = AuxNet().eval()
    with pytest.raises(ValueError, match="features on example have shape"):
        as_classifier(net, example=torch.randn(2, 3, 8, 8))
    view = as_classifier(net, features="pool", example=torch.randn(2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(view(x), net(x)[0]) and view.features(x).shape == (2, 8)


def test_features_by_callable():
    net = torchvision.models.resnet18(num_classes=5).eval()

    def pooled(module, x):
        return torch.flatten(module.avgpool(module.layer4(module.layer3(module.layer2(
            module.layer1(module.maxpool(module.relu(module.bn1(module.conv1(x))))))))), 1)

    view = as_classifier(net, features=pooled, example=torch.randn(2, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(view.features(x), as_classifier(net).features(x))
        assert torch.equal(view(x), net(x))


def test_features_errors_name_the_problem():
    net = torchvision.models.resnet18(num_classes=5).eval()
    with pytest.raises(ValueError, match="features='nope': ResNet has no such submodule"):
        as_classifier(net, features="nope")
    with pytest.raises(TypeError, match="features: expected None, a submodule name or a callable"):
        as_classifier(net, features=3)
    with pytest.raises(ValueError, match=r"shape \(2, 5\); expected pooled features \[B, 512\]"):
        as_classifier(net, features="fc", example=torch.randn(2, 3, 32, 32))  # logits, not features
    with pytest.raises(ValueError, match=r"shape \(2, 2048\); expected pooled features \[B, 512\]"):
        # 512 x 2 x 2, not pooled
        as_classifier(net, features="layer4", example=torch.randn(2, 3, 64, 64))


def test_preprocessing_of_torchvision_weights():
    imagenet = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    bilinear = {**imagenet, "interpolation": "bilinear"}
    assert preprocessing_of(arch="resnet50") == {"resolution": 224, "resize": 232, **bilinear}
    for weights in ("IMAGENET1K_V1", "resnet50-0676ba61.pth",
                    torchvision.models.ResNet50_Weights.IMAGENET1K_V1):
        assert preprocessing_of(arch="resnet50", weights=weights) == {
            "resolution": 224, "resize": 256, **bilinear}
    assert preprocessing_of(arch="efficientnet_b3")["resolution"] == 300
    assert preprocessing_of(build_model("convnext_tiny", 3)) == {
        "resolution": 224, "resize": 236, **bilinear}
    with pytest.raises(ValueError, match=r"weights='nope': expected one of resnet50's .*V2"):
        preprocessing_of(arch="resnet50", weights="nope")


def test_preprocessing_of_timm_models():
    # resnet10t.c3_in1k: 176 px, crop_pct 0.875, timm's default interpolation
    expected = {"resolution": 176, "resize": 201, "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD), "interpolation": "bicubic"}
    assert preprocessing_of(arch="timm:resnet10t") == expected
    assert preprocessing_of(arch="timm:resnet10t", weights="c3_in1k") == expected
    assert preprocessing_of(build_model("timm:resnet10t", 3)) == expected
    assert preprocessing_of(timm.create_model("test_resnet")) == {
        "resolution": 160, "resize": 168, "mean": [0.5] * 3, "std": [0.5] * 3,
        "interpolation": "bilinear"}
    with pytest.raises(ValueError, match="weights='nope'"):
        preprocessing_of(arch="timm:resnet10t", weights="nope")


def test_preprocessing_of_unknown_weights_is_none():
    assert preprocessing_of() is None
    assert preprocessing_of(arch="tiny") is None and preprocessing_of(arch="no_such") is None
    # fastvote trained ARCHS weights: their checkpoint holds the preprocessing
    assert preprocessing_of(build_model("resnet18", 3)) is None
    assert preprocessing_of(nn.Sequential(nn.Flatten(), nn.Linear(12, 2))) is None
