"""MoCo v2 pretraining (fastvote.ssl) on the CPU: the momentum update, the queue, the
InfoNCE loss, the batched augmentation against torchvision's per-image ops, and
end-to-end pretraining with its checkpoints; the tiny CNN on 16 px images."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from fastvote import distributed, ssl
from fastvote.models import build_model, load_model, unwrap_model
from fastvote.ssl import MODEL_FILE, STATE_FILE, MoCo, MocoConfig, pretrain_moco, two_crops

from conftest import Killed, kill_after

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 16
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)
NO_COLOUR = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def channel(values):
    return torch.tensor(values).view(1, 3, 1, 1)


def normalise(pixels):
    return (pixels - channel(MEAN)) / channel(STD)


def pixels_of(images):
    return images * channel(STD) + channel(MEAN)


def crops(images, config, seed=0):
    return two_crops(images, mean=MEAN, std=STD, config=config,
                     generator=torch.Generator().manual_seed(seed))


def tiny_moco(seed=0, **kw):
    torch.manual_seed(seed)
    model = build_model("tiny", 10, image_size=SIDE, seed=seed)
    return model, MoCo(model.backbone, model.feature_dim, **kw)


def random_images(n, seed=0):
    return normalise(torch.rand(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed)))


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------

BAD_CONFIG = [
    ("epochs", 0), ("batch_size", 2.5), ("lr", 0), ("sgd_momentum", 1.0),
    ("weight_decay", -1e-4), ("dim", 0), ("queue_size", 0), ("momentum", 1.5),
    ("temperature", 0.0), ("mlp", 1), ("bn_group_size", 1), ("crop_scale", (0.5, 0.2)),
    ("crop_scale", (0.0, 1.0)), ("crop_ratio", (1.0,)), ("flip", "yes"),
    ("jitter", (0.4, 0.4, 0.4, 0.6)), ("jitter", (0.4, -0.1, 0.4, 0.1)), ("jitter_p", 1.5),
    ("grayscale_p", -0.1), ("blur_p", 2), ("blur_sigma", (0.0, 2.0)), ("amp", "on"),
    ("log_every", 0), ("seed", 1.5),
]


def test_config_rejects_bad_values_naming_the_field():
    for field, value in BAD_CONFIG:  # one test, not one each: the teardown's gc is slow
        with pytest.raises(ValueError,
                           match=re.escape(f"MocoConfig.{field}={value!r}: expected")):
            MocoConfig(**{field: value})


def test_config_defaults_are_moco_v2_and_the_rate_is_a_cosine():
    config = MocoConfig(crop_scale=[0.2, 1])
    assert config.crop_scale == (0.2, 1.0)  # a list compares equal to a checkpoint's tuple
    assert (config.batch_size, config.lr, config.sgd_momentum, config.weight_decay) == \
        (256, 0.03, 0.9, 1e-4)
    assert (config.dim, config.queue_size, config.momentum, config.temperature, config.mlp) == \
        (128, 65536, 0.999, 0.2, True)
    assert config.lr_at(0) == 0.03
    assert config.lr_at(100) == pytest.approx(0.015)
    assert config.lr_at(200) == pytest.approx(0.0, abs=1e-12)


def test_moco_and_two_crops_reject_bad_arguments():
    backbone = build_model("tiny", 10).backbone
    for kw, match in [({"queue_size": 0}, "queue_size=0"), ({"momentum": 2.0}, "momentum=2.0"),
                      ({"temperature": 0}, "temperature=0"),
                      ({"bn_group_size": 1}, "bn_group_size=1")]:
        with pytest.raises(ValueError, match=re.escape(match)):
            MoCo(backbone, 64, **kw)
    images = random_images(2)
    with pytest.raises(ValueError, match=re.escape("mean=(0.5, 0.5): expected 3 values")):
        two_crops(images, mean=(0.5, 0.5), std=STD, config=MocoConfig(),
                  generator=torch.Generator())
    with pytest.raises(ValueError, match="std=.*all > 0"):
        two_crops(images, mean=MEAN, std=(0.2, 0.0, 0.2), config=MocoConfig(),
                  generator=torch.Generator())
    with pytest.raises(ValueError, match=re.escape("images: got (2, 1, 16, 16)")):
        crops(images[:, :1], MocoConfig())


# --------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------

def test_two_crops_gives_two_different_deterministic_views_in_pixel_range():
    images = random_images(32)
    config = MocoConfig()
    q, k = crops(images, config, seed=1)
    assert q.shape == k.shape == images.shape and q.dtype == torch.float32
    q2, k2 = crops(images, config, seed=1)
    assert torch.equal(q, q2) and torch.equal(k, k2)
    q3, _ = crops(images, config, seed=2)
    assert not torch.allclose(q, q3)
    assert (q - k).abs().amax((1, 2, 3)).min() > 0.05  # every pair differs
    for view in (q, k):
        pixels = pixels_of(view)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_everything_off_is_the_identity():
    images = random_images(8)
    q, k = crops(images, MocoConfig(crop_scale=(1.0, 1.0), flip=False, **NO_COLOUR))
    assert torch.allclose(q, images, atol=1e-5) and torch.allclose(k, images, atol=1e-5)


def test_crops_respect_the_scale_range_and_stay_inside_the_image():
    """On ramps (red = column, green = row) a view's values tell the crop box it
    came from: its width from the slope, its left edge from the values."""
    n, side = 256, 32
    ramp = torch.linspace(0, 1, side)
    pixels = torch.stack([ramp.expand(side, side), ramp[:, None].expand(side, side),
                          torch.full((side, side), 0.5)]).expand(n, 3, side, side)
    for scale in [(0.2, 1.0), (0.5, 0.5)]:
        q, _ = two_crops(normalise(pixels), mean=MEAN, std=STD, generator=torch.Generator(),
                         config=MocoConfig(crop_scale=scale, **NO_COLOUR))
        view = pixels_of(q) * (side - 1)  # values in input pixel coordinates
        mid = side // 2
        slope_x = view[:, 0, mid, mid + 1] - view[:, 0, mid, mid]
        flipped = slope_x < 0
        view[flipped] = view[flipped].flip(-1)
        width = slope_x.abs() * side  # the box's width, in input pixels
        height = (view[:, 1, mid + 1, mid] - view[:, 1, mid, mid]) * side
        left = view[:, 0, mid, mid] - (mid + 0.5) * width / side + 0.5
        top = view[:, 1, mid, mid] - (mid + 0.5) * height / side + 0.5
        for value in (width, height, left, top):  # whole pixels
            assert torch.allclose(value, value.round(), atol=2e-3)
        assert (left.round() >= 0).all() and (top.round() >= 0).all()
        assert (left + width).round().max() <= side and (top + height).round().max() <= side
        area = width * height / side ** 2
        # (width and height are rounded to pixels, so the area is within ~2 px each way)
        assert area.min() >= scale[0] * 0.85 and area.max() <= min(1.0, scale[1] * 1.15)
        ratio = width / height
        assert ratio.min() >= 3 / 4 * 0.9 and ratio.max() <= 4 / 3 * 1.1
        if scale == (0.2, 1.0):
            assert area.min() < 0.3 and area.max() > 0.9  # the range is covered
            assert 0.35 < flipped.float().mean() < 0.65


def test_batched_ops_equal_torchvision_per_image():
    n, height, width = 48, 24, 20
    x = torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(0))
    top, left, box_h, box_w, flip = ssl._crop_params(n, height, width, MocoConfig(),
                                                     torch.Generator().manual_seed(1))
    assert flip.any() and not flip.all()
    ours = ssl._resized_crop(x, top, left, box_h, box_w, flip)
    for i in range(n):
        ref = TF.resized_crop(x[i], int(top[i]), int(left[i]), int(box_h[i]), int(box_w[i]),
                              [height, width], antialias=True)
        assert torch.allclose(ours[i], TF.hflip(ref) if flip[i] else ref, atol=1e-5)
    factor = torch.linspace(0.6, 1.4, n)
    shift = torch.linspace(-0.1, 0.1, n)
    sigma = torch.linspace(0.1, 2.0, n)
    f4 = factor.view(-1, 1, 1, 1)
    batched = {
        "brightness": ssl._blend(x, 0.0, f4),
        "contrast": ssl._blend(x, ssl._gray(x).mean((1, 2, 3), keepdim=True), f4),
        "saturation": ssl._blend(x, ssl._gray(x), f4),
        "hue": ssl._rotate_hue(x, shift),
        "blur": ssl._gaussian_blur(x, sigma),
    }
    for i in range(n):
        f = float(factor[i])
        expected = {
            "brightness": TF.adjust_brightness(x[i], f),
            "contrast": TF.adjust_contrast(x[i], f),
            "saturation": TF.adjust_saturation(x[i], f),
            "hue": TF.adjust_hue(x[i], float(shift[i])),
            "blur": TF.gaussian_blur(x[i], [3, 3], [float(sigma[i])] * 2),
        }
        for name, value in expected.items():
            assert torch.allclose(batched[name][i], value, atol=1e-5), (name, i)
    assert torch.allclose(ssl._gray(x), TF.rgb_to_grayscale(x), atol=1e-6)


def test_blur_kernel_suits_the_image_size():
    assert [ssl._blur_kernel_size(s) for s in (16, 32, 64, 224)] == [3, 3, 7, 23]
    impulse = torch.zeros(4, 3, SIDE, SIDE)
    impulse[:, :, 8, 8] = 1.0
    q, _ = crops(normalise(impulse),
                 MocoConfig(crop_scale=(1.0, 1.0), flip=False, jitter_p=0.0, grayscale_p=0.0,
                            blur_p=1.0))
    out = pixels_of(q)
    spread = (out.abs() > 1e-5).nonzero()[:, 2:]
    assert spread.min() >= 7 and spread.max() <= 9  # a 3x3 kernel at 16 px
    assert torch.allclose(out.sum((2, 3)), torch.ones(4, 3), atol=1e-4)


def test_grayscale_and_jitter_apply_with_their_probabilities():
    images = random_images(200)
    gray, _ = crops(images, MocoConfig(crop_scale=(1.0, 1.0), flip=False, jitter_p=0.0,
                                       grayscale_p=0.5, blur_p=0.0))
    pixels = pixels_of(gray)
    is_gray = (pixels - pixels.mean(1, keepdim=True)).abs().amax((1, 2, 3)) < 1e-5
    assert 0.35 < is_gray.float().mean() < 0.65
    jittered, _ = crops(images, MocoConfig(crop_scale=(1.0, 1.0), flip=False, jitter_p=0.8,
                                           grayscale_p=0.0, blur_p=0.0))
    changed = (jittered - images).abs().amax((1, 2, 3)) > 1e-4
    assert 0.65 < changed.float().mean() < 0.95


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------

def sgd_step(net, optimizer, im_q, im_k):
    """One training step of a MoCo (or of a DDP-wrapped one)."""
    optimizer.zero_grad(set_to_none=True)
    loss, _, _ = net(im_q, im_k)
    loss.backward()
    optimizer.step()
    unwrap_model(net).momentum_update()
    return loss


def test_key_encoder_follows_the_query_encoder_by_momentum_only():
    model, moco = tiny_moco(queue_size=16, momentum=0.9, bn_group_size=4)
    assert moco.encoder_q.backbone is model.backbone  # trains the model in place
    assert all(not p.requires_grad for p in moco.encoder_k.parameters())
    optimizer = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.5, momentum=0.9)
    im_q, im_k = crops(random_images(8), MocoConfig())
    sgd_step(moco, optimizer, im_q, im_k)  # now keys and queries differ
    k_old = [p.detach().clone() for p in moco.encoder_k.parameters()]
    q_old = [p.detach().clone() for p in moco.encoder_q.parameters()]
    optimizer.zero_grad(set_to_none=True)
    moco(im_q, im_k)[0].backward()
    assert all(p.grad is None for p in moco.encoder_k.parameters())
    assert all(p.grad is not None for p in moco.encoder_q.parameters())
    optimizer.step()
    moco.momentum_update()
    q_new = list(moco.encoder_q.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(q_old, q_new))
    for k, old, q in zip(moco.encoder_k.parameters(), k_old, q_new):
        assert not torch.equal(k, old)
        assert torch.allclose(k, 0.9 * old + 0.1 * q, rtol=1e-6, atol=1e-7)


def test_queue_is_a_fifo_of_normalised_keys_that_wraps():
    _, moco = tiny_moco(dim=8, queue_size=10)
    moco.eval()  # BatchNorm on running statistics: a key does not depend on its batch
    batches = [random_images(4, seed=s) for s in range(3)]
    with torch.no_grad():
        keys = [F.normalize(moco.encoder_k(b), dim=1) for b in batches]
        for b in batches:
            moco(b, b)
    expected = {c: keys[0][c] for c in range(4)}
    expected.update({4 + c: keys[1][c] for c in range(4)})
    expected.update({8: keys[2][0], 9: keys[2][1], 0: keys[2][2], 1: keys[2][3]})
    for column, key in expected.items():
        assert torch.allclose(moco.queue[:, column], key, atol=1e-6), column
    assert moco.queue_ptr.item() == 2
    assert torch.allclose(moco.queue.norm(dim=0), torch.ones(10))

    _, small = tiny_moco(dim=8, queue_size=3)  # more keys than the queue holds
    small.eval()
    with torch.no_grad():
        key = F.normalize(small.encoder_k(batches[0]), dim=1)
        small(batches[0], batches[0])
    # as four writes in turn: column 0 gets key 0 then key 3
    assert torch.allclose(small.queue.T, key[[3, 1, 2]], atol=1e-6)
    assert small.queue_ptr.item() == 1


def test_infonce_equals_a_reference_computation():
    _, moco = tiny_moco(dim=16, queue_size=24, temperature=0.2, bn_group_size=None)
    moco.train()
    im_q, im_k = crops(random_images(6), MocoConfig())
    queue = moco.queue.clone()
    loss, logits, labels = moco(im_q, im_k)
    with torch.no_grad():
        q = F.normalize(moco.encoder_q(im_q), dim=1)
        k = F.normalize(moco.encoder_k(im_k), dim=1)  # one batch: the shuffle changes nothing
    total = 0.0
    for i in range(len(q)):
        row = [float(q[i] @ k[i])] + [float(q[i] @ queue[:, j]) for j in range(queue.shape[1])]
        row = np.array(row) / 0.2
        assert np.allclose(logits[i].detach().numpy(), row, atol=1e-5)
        total += -(row[0] - np.log(np.exp(row).sum()))
    assert loss.item() == pytest.approx(total / len(q), rel=1e-5)
    assert labels.tolist() == [0] * 6


def test_shuffled_bn_groups_keys_over_a_random_permutation():
    _, moco = tiny_moco(dim=16, queue_size=32, bn_group_size=4)
    moco.train()
    images = random_images(8)
    torch.manual_seed(3)
    local, everyone = moco._keys(images)
    assert torch.equal(local, everyone)  # one process
    torch.manual_seed(3)
    perm = torch.randperm(8)
    with torch.no_grad():
        grouped = torch.cat([moco.encoder_k.projection(moco.encoder_k.backbone(images[g]))
                             for g in perm.view(2, 4)])
        whole = F.normalize(moco.encoder_k.projection(moco.encoder_k.backbone(images)), dim=1)
        queries = moco.encoder_q(images)
        by_halves = moco.encoder_q.projection(torch.cat([moco.encoder_q.backbone(images[:4]),
                                                         moco.encoder_q.backbone(images[4:])]))
    expected = torch.empty_like(local)
    expected[perm] = F.normalize(grouped, dim=1)
    assert torch.allclose(local, expected, atol=1e-6)
    assert not torch.allclose(local, whole, atol=1e-3)  # the groups' statistics differ
    assert torch.allclose(queries, by_halves, atol=1e-6)  # queries: consecutive groups


# --------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic():
    images = random_images(32, seed=5)
    return TensorDataset(images, torch.zeros(32, dtype=torch.long))


CONFIG = dict(epochs=2, batch_size=8, lr=0.05, dim=16, queue_size=24, bn_group_size=4, seed=3)


def run(model, dataset, tmp, config=None, **kw):
    config = config or MocoConfig(**CONFIG)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True)
    return pretrain_moco(model, loader, config, mean=MEAN, std=STD, device="cpu",
                         checkpoint_dir=tmp, progress=False, **kw)


def test_pretraining_trains_the_backbone_and_resumes_bitwise(synthetic, tmp_path):
    whole = build_model("tiny", 10, image_size=SIDE, seed=1)
    before = snapshot(whole)
    history = run(whole, synthetic, tmp_path / "whole")
    assert history["epoch"] == [0, 1] and all(np.isfinite(history["loss"]))
    assert all(0 <= t <= 1 for t in history["top1"]) and history["lr"][1] < history["lr"][0]
    after = snapshot(whole)
    assert not all(torch.equal(after[k], before[k]) for k in before if k.startswith("backbone."))
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("head."))
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted([MODEL_FILE, STATE_FILE])
    assert same(snapshot(load_model(tmp_path / "whole" / MODEL_FILE)), after)

    killed = build_model("tiny", 10, image_size=SIDE, seed=1)
    with pytest.raises(Killed):
        run(killed, synthetic, tmp_path / "killed", on_epoch_end=kill_after(0))
    assert [p.name for p in (tmp_path / "killed").iterdir()] == [STATE_FILE]
    torch.manual_seed(999)  # whatever ran in between must not matter
    fresh = build_model("tiny", 10, image_size=SIDE, seed=1)  # a new process
    resumed = run(fresh, synthetic, tmp_path / "killed")
    assert same(snapshot(fresh), after)
    assert resumed["loss"] == history["loss"] and resumed["top1"] == history["top1"]


def test_pretraining_refuses_another_config_or_loader(synthetic, tmp_path):
    with pytest.raises(Killed):
        run(build_model("tiny", 10), synthetic, tmp_path, on_epoch_end=kill_after(0))
    with pytest.raises(ValueError, match=re.escape("lr: 0.05 there, 0.1 now")):
        run(build_model("tiny", 10), synthetic, tmp_path, MocoConfig(**{**CONFIG, "lr": 0.1}))
    with pytest.raises(ValueError, match=re.escape("loader.batch_size=8 but config.batch_size=4")):
        pretrain_moco(build_model("tiny", 10), DataLoader(synthetic, batch_size=8),
                      MocoConfig(**{**CONFIG, "batch_size": 4}), mean=MEAN, std=STD,
                      device="cpu", progress=False)


def test_pretraining_on_real_digits_learns_to_tell_instances_apart():
    """sklearn's digits at 16 px, mild crops: the InfoNCE loss falls, and on held-out
    digits two views of one image find each other (nearest neighbour by backbone
    features) far more often than before pretraining."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    images = F.interpolate(images, size=SIDE, mode="bilinear", align_corners=False)
    pixels = images.clamp(0, 1).repeat(1, 3, 1, 1)
    mean, std = (pixels.mean().item(),) * 3, (pixels.std().item(),) * 3
    normalised = (pixels - mean[0]) / std[0]
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(0))
    train, held_out = normalised[order[:1024]], normalised[order[1024:1324]]
    config = MocoConfig(epochs=6, batch_size=64, lr=0.06, momentum=0.99, dim=32,
                        queue_size=256, bn_group_size=32, crop_scale=(0.6, 1.0), **NO_COLOUR)

    def retrieval(model):
        a, b = two_crops(held_out, mean=mean, std=std, config=config,
                         generator=torch.Generator().manual_seed(1))
        model.eval()
        with torch.no_grad():
            fa, fb = F.normalize(model.backbone(a), dim=1), F.normalize(model.backbone(b), dim=1)
        return ((fa @ fb.T).argmax(1) == torch.arange(len(a))).float().mean().item()

    model = build_model("tiny", 10, image_size=SIDE, seed=0)
    start = retrieval(model)
    loader = DataLoader(TensorDataset(train, torch.zeros(len(train), dtype=torch.long)),
                        batch_size=64, shuffle=True)
    history = pretrain_moco(model, loader, config, mean=mean, std=std, device="cpu",
                            progress=False)
    assert history["loss"][-1] < history["loss"][0] - 0.5
    # model seeds 0-5 measured: 0.10-0.14 before, 0.25-0.33 after
    assert retrieval(model) > start + 0.08


# --------------------------------------------------------------------------
# Two processes (torchrun runs this file on each rank: see the end)
# --------------------------------------------------------------------------

def _steps(world: int, rank: int) -> dict:
    """Three MoCo steps on fixed views of 8 images: one process sees all 8 with
    BatchNorm groups of 4, each of two ranks sees its 4 (one group), DDP-wrapped."""
    images = random_images(16, seed=7)
    model = build_model("tiny", 10, image_size=SIDE, seed=0)
    torch.manual_seed(0)
    moco = MoCo(model.backbone, model.feature_dim, dim=8, queue_size=12, momentum=0.9,
                bn_group_size=4 if world == 1 else None)
    net = (torch.nn.parallel.DistributedDataParallel(moco, **ssl._no_forward_buffer_sync())
           if world > 1 else moco)
    optimizer = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for step in range(3):
        q, k = crops(images[8 * (step % 2):][:8], MocoConfig(), seed=step)
        rows = slice(8 // world * rank, 8 // world * (rank + 1))
        torch.manual_seed(100 + step)  # the key shuffle's permutation (rank 0's is used)
        losses.append(sgd_step(net, optimizer, q[rows], k[rows]).detach())
    return {"state": snapshot(moco), "losses": torch.stack(losses)}


def _rank_main(out: Path) -> None:
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    rank, world = distributed.rank(), distributed.world_size()
    result = _steps(world, rank)
    dataset = TensorDataset(random_images(16, seed=8), torch.zeros(16, dtype=torch.long))
    loader = DataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, seed=0))
    model = build_model("tiny", 10, image_size=SIDE, seed=1)
    result["history"] = pretrain_moco(
        model, loader, MocoConfig(epochs=2, batch_size=4, dim=8, queue_size=12,
                                  bn_group_size=None),
        mean=MEAN, std=STD, device="cpu", progress=False, checkpoint_dir=out / "checkpoint")
    result["model"] = snapshot(model)
    torch.save(result, out / f"rank{rank}.pt")
    distributed.shutdown()


def test_two_ranks_step_as_one_process_over_their_joint_batch(tmp_path):
    """DDP averages the query gradients, keys are gathered (and shuffled) over both
    ranks: two ranks of 4 images end where one process over the 8 does (BatchNorm
    groups of 4, the same permutation), apart from the BatchNorm running statistics
    (updated per group there, per rank here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = _steps(world=1, rank=0)
    assert torch.allclose((ranks[0]["losses"] + ranks[1]["losses"]) / 2, single["losses"],
                          atol=1e-6)
    for key, value in single["state"].items():
        if "running_" in key or "num_batches" in key:
            continue
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        assert torch.allclose(ranks[0]["state"][key], value, atol=1e-5), key
    # pretrain_moco: both ranks agree (buffers too), one checkpoint, the same history
    assert same(ranks[0]["model"], ranks[1]["model"])
    assert ranks[0]["history"]["loss"] == ranks[1]["history"]["loss"]
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == \
        sorted([MODEL_FILE, STATE_FILE])


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
