"""The CUDA paths of the paper's other settings (run by benchmarks/gpu_check.sh on a
lent GPU; skipped elsewhere): PGD and MoCo under float16 autocast with channels-last
batches, a ViT under AMP, and K-means with the CUDA ops against the CPU result."""
import os

import pytest
import torch

from fastvote import models
from fastvote.adversarial import PGD
from fastvote.cluster import kmeans
from fastvote.ssl import MoCo, MocoConfig, two_crops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Under `gpu_check.sh --rehearse` CUDA is faked onto the CPU (benchmarks/fake_cuda.py).
device_only = pytest.mark.skipif(os.environ.get("FASTVOTE_FAKE_CUDA") == "1",
                                 reason="CUDA faked onto the CPU: AMP runs on the real device only")

MEAN, STD = (0.2, 0.3, 0.4), (0.25, 0.2, 0.3)


def batch(n=32, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, side, side, generator=g)
    images = (pixels - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return images.cuda().contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (n,), generator=g).cuda()


@device_only
def test_pgd_under_amp_stays_in_the_ball():
    model = models.build_model("tiny", 10, image_size=16, seed=0).cuda().to(memory_format=torch.channels_last)
    images, labels = batch()
    attack = PGD(mean=MEAN, std=STD, amp=True, generator=torch.Generator("cuda").manual_seed(0))
    adversarial = attack(model, images, labels)
    std, mean = torch.tensor(STD, device="cuda")[:, None, None], torch.tensor(MEAN, device="cuda")[:, None, None]
    delta = (adversarial * std + mean) - (images * std + mean)
    assert delta.abs().max() <= 3 / 255 + 1e-5 and (adversarial * std + mean).min() >= -1e-5
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(model(adversarial), labels) >= loss(model(images), labels)


def test_moco_step_under_amp_and_ema():
    model = models.build_model("tiny", 10, image_size=16, seed=0).cuda()
    moco = MoCo(model.backbone, model.feature_dim, queue_size=256, momentum=0.9).cuda()
    images, _ = batch()
    q, k = two_crops(images, mean=MEAN, std=STD, config=MocoConfig(), generator=torch.Generator("cuda").manual_seed(1))
    optimizer = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.1)
    before = [p.detach().clone() for p in moco.encoder_k.parameters()]
    with torch.autocast("cuda", dtype=torch.float16):
        loss, logits, _ = moco(q, k)
    loss.backward()
    optimizer.step()
    moco.momentum_update()
    assert torch.isfinite(loss) and logits.shape == (32, 257)
    for old, key, query in zip(before, moco.encoder_k.parameters(), moco.encoder_q.parameters()):
        torch.testing.assert_close(key, 0.9 * old + 0.1 * query, rtol=1e-5, atol=1e-6)


def test_vit_forward_under_amp():
    model = models.build_model("vit_t_16", 10, image_size=16, seed=0).cuda()
    images, _ = batch()
    with torch.autocast("cuda", dtype=torch.float16):
        out = model(images)
    assert out.shape == (32, 10) and torch.isfinite(out).all()


def test_kmeans_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 67, generator=g) * 6
    x = centers[torch.randint(0, 8, (4000,), generator=g)] + torch.randn(4000, 67, generator=g)
    cpu = kmeans(lambda: x.split(512), 8, num_rows=len(x), seed=1, progress=False)
    gpu = kmeans(lambda: x.split(512), 8, num_rows=len(x), seed=1, device="cuda", progress=False)
    assert (cpu[1] == gpu[1]).all()
    torch.testing.assert_close(cpu[0], gpu[0], rtol=0, atol=1e-4)
