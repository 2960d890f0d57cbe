"""PGD adversarial examples and adversarial training (fastvote.adversarial), on the
benchmark target's real digits (16 px, 3 channels) with the ~25k-parameter tiny CNN."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fastvote.data as fvdata
from fastvote.adversarial import PGD, robust_accuracy
from fastvote.models import build_model
from fastvote.train import TrainConfig, evaluate, train_classifier

SIDE = 16
EPS = 3 / 255
TOL = 1e-6

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(bool(fvdata.missing("digits")),
                       reason=f"offline dataset missing: {fvdata.missing('digits')}"),
]


@pytest.fixture(scope="module")
def digits():
    """The digits' test split (1697 images; ink bright on black, so many pixels sit
    exactly at 0 or 1 and the pixel box binds): pixels float [N, 3, 16, 16] in [0, 1],
    labels int64 [N], and the data's own mean / std."""
    dataset = fvdata.get("digits", "test", size=SIDE)
    pixels = torch.from_numpy(dataset.images).float().div(255).unsqueeze(1).repeat(1, 3, 1, 1)
    mean, std = fvdata.channel_stats(dataset)
    return pixels, torch.from_numpy(dataset.targets), mean, std


def normalise(pixels, mean, std):
    shape = (1, -1, 1, 1)
    return (pixels - torch.tensor(mean, dtype=pixels.dtype).view(shape)) \
        / torch.tensor(std, dtype=pixels.dtype).view(shape)


def unnormalise(images, mean, std):
    shape = (1, -1, 1, 1)
    return images * torch.tensor(std, dtype=images.dtype).view(shape) \
        + torch.tensor(mean, dtype=images.dtype).view(shape)


def loader(pixels, labels, mean, std, batch_size=64, shuffle=False, ids=False):
    tensors = (normalise(pixels, mean, std), labels) + ((torch.arange(len(labels)),) if ids else ())
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle)


@pytest.fixture(scope="module")
def trained(digits):
    """The tiny CNN after 3 clean epochs on 960 digits (normalised with their stats)."""
    pixels, labels, mean, std = digits
    model = build_model("tiny", 10, image_size=SIDE, seed=0)
    train_classifier(model, loader(pixels[:960], labels[:960], mean, std, shuffle=True),
                     TrainConfig(epochs=3, batch_size=64, lr=0.4, seed=0), device="cpu",
                     progress=False)
    return model.eval()


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------
# The threat model: the eps-ball and the pixel box, in pixel space
# --------------------------------------------------------------------------

STATS = {
    "identity": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "skewed": ((0.9, 0.1, 0.5), (0.05, 2.0, 0.3)),
    "one-value": ((0.3,), (0.32,)),
}


@pytest.mark.parametrize("stats", list(STATS) + ["data"])
@pytest.mark.parametrize("norm, eps, step_size", [
    ("linf", EPS, None), ("linf", 0.1, 0.15), ("l2", 0.5, None), ("l2", 2.0, 3.0)])
def test_perturbation_stays_in_the_eps_ball_and_the_pixel_box(digits, stats, norm, eps,
                                                              step_size):
    pixels, labels, *data_stats = digits
    mean, std = data_stats if stats == "data" else STATS[stats]
    model = build_model("tiny", 10, image_size=SIDE, seed=1)
    attack = PGD(mean=mean, std=std, eps=eps, norm=norm, step_size=step_size,
                 generator=torch.Generator().manual_seed(0))
    x, y = pixels[:32], labels[:32]
    adversarial = attack(model, normalise(x, mean, std), y)
    assert adversarial.shape == x.shape and adversarial.dtype == torch.float32
    delta = unnormalise(adversarial, mean, std) - x
    assert (x + delta).min() >= -TOL and (x + delta).max() <= 1 + TOL
    if norm == "linf":
        assert delta.abs().max() <= eps + TOL
        assert delta.abs().max() >= eps - TOL  # the ball is used, not just respected
    else:
        norms = delta.flatten(1).norm(dim=1)
        assert norms.max() <= eps * (1 + 1e-5)
        assert norms.min() > 0.5 * eps


def test_zero_steps_without_random_start_returns_the_input(digits):
    pixels, labels, mean, std = digits
    images = normalise(pixels[:16], mean, std)
    model = build_model("tiny", 10, image_size=SIDE, seed=0)
    assert torch.equal(PGD(mean, std, steps=0, random_start=False)(model, images, labels[:16]),
                       images)
    start = PGD(mean, std, steps=0, generator=torch.Generator().manual_seed(0))(
        model, images, labels[:16])
    delta = unnormalise(start, mean, std) - pixels[:16]
    assert 0 < delta.abs().max() <= EPS + TOL


def test_a_generator_makes_the_attack_deterministic_and_spares_the_global_rng(digits):
    pixels, labels, mean, std = digits
    images, y = normalise(pixels[:16], mean, std), labels[:16]
    model = build_model("tiny", 10, image_size=SIDE, seed=0)

    def attack(seed):
        return PGD(mean, std, generator=torch.Generator().manual_seed(seed))(model, images, y)

    before = torch.get_rng_state()
    first = attack(0)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first, attack(0))
    assert not torch.equal(first, attack(1))
    # without a generator the global one decides: seeded, it repeats too
    torch.manual_seed(5)
    again = PGD(mean, std)(model, images, y)
    torch.manual_seed(5)
    assert torch.equal(again, PGD(mean, std)(model, images, y))


# --------------------------------------------------------------------------
# It is an attack
# --------------------------------------------------------------------------

def test_the_attack_raises_the_loss_above_clean_and_random_noise(digits, trained):
    pixels, labels, mean, std = digits
    x, y = pixels[1000:1256], labels[1000:1256]
    noise = torch.empty_like(x).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    noisy = (x + EPS * noise.sign()).clamp(0, 1)  # the ball's corners: as far as noise gets
    adversarial = PGD(mean, std, generator=torch.Generator().manual_seed(0))(
        trained, normalise(x, mean, std), y)
    with torch.no_grad():
        losses = {name: F.cross_entropy(trained(images), y).item() for name, images in (
            ("clean", normalise(x, mean, std)), ("noise", normalise(noisy, mean, std)),
            ("pgd", adversarial))}
    assert losses["pgd"] > 1.5 * losses["noise"] and losses["pgd"] > 1.5 * losses["clean"], losses
    # each step helps: 3 steps beat 1 step beat the random start alone
    by_steps = []
    for steps in (0, 1, 3):
        attack = PGD(mean, std, steps=steps, step_size=2 * EPS / 3,
                     generator=torch.Generator().manual_seed(0))
        images = attack(trained, normalise(x, mean, std), y)
        with torch.no_grad():
            by_steps.append(F.cross_entropy(trained(images), y).item())
    assert by_steps[0] < by_steps[1] < by_steps[2], by_steps


def test_the_attack_leaves_the_model_as_it_found_it(digits, trained):
    pixels, labels, mean, std = digits
    images, y = normalise(pixels[:32], mean, std), labels[:32]
    attack = PGD(mean, std, generator=torch.Generator().manual_seed(0))

    model = copy.deepcopy(trained).train()
    model.backbone[1].eval()  # one BatchNorm frozen: modes are restored module by module
    modes = [m.training for m in model.modules()]
    before = state(model)
    attack(model, images, y)
    assert same(state(model), before)  # weights and BN running stats / counters
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())  # None stays None

    F.cross_entropy(model(images), y).backward()  # gradients the attack must not touch
    grads = [p.grad.clone() for p in model.parameters()]
    after_backward = state(model)
    attack(model, images, y)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert same(state(model), after_backward)
    assert all(p.requires_grad for p in model.parameters())


def test_autocast_no_grad_and_inference_mode_do_not_change_the_attack(digits, trained):
    pixels, labels, mean, std = digits
    images, y = normalise(pixels[:16], mean, std), labels[:16]

    def attack():
        return PGD(mean, std, amp=False, generator=torch.Generator().manual_seed(0))(trained, images, y)

    reference = attack()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # amp off: float32 inside
        assert torch.equal(attack(), reference)
    with torch.no_grad():
        assert torch.equal(attack(), reference)
    with torch.inference_mode():
        images = images.clone()  # an inference tensor
        assert torch.equal(attack(), reference)
    # float16 images (an AMP loader's) are attacked in float32 and handed back in float16
    half = PGD(mean, std, generator=torch.Generator().manual_seed(0))(trained, images.half(), y)
    assert half.dtype == torch.float16
    delta = unnormalise(half.float(), mean, std) - pixels[:16]
    assert delta.abs().max() <= EPS + 1e-3  # float16's rounding of normalised values
    # amp=True on the CPU: the forward in bfloat16 (emulated without bf16 units); the
    # perturbation is kept in float32, so it stays in the ball and still moves the images
    bf16 = PGD(mean, std, amp=True, generator=torch.Generator().manual_seed(0))(trained, images, y)
    delta = unnormalise(bf16, mean, std) - pixels[:16]
    assert bf16.dtype == images.dtype and delta.abs().max() <= EPS + 1e-6 and delta.abs().max() > EPS / 2


# --------------------------------------------------------------------------
# A slow float64 reference: one step by hand
# --------------------------------------------------------------------------

@pytest.mark.parametrize("norm, eps, step_size", [
    ("linf", 0.03, 0.01), ("linf", 0.03, 0.05), ("l2", 0.5, 0.3), ("l2", 0.5, 0.8)])
def test_one_step_equals_the_hand_computed_step_in_float64(digits, trained, norm, eps,
                                                           step_size):
    pixels, labels, mean, std = digits
    model = copy.deepcopy(trained).double().train()
    x = pixels[:24].double()
    y = labels[:24]
    images = normalise(x, mean, std)
    model.eval()
    leaf = images.clone().requires_grad_(True)
    for i in range(len(y)):  # each sample's own loss: the attack must not mix samples
        F.cross_entropy(model(leaf[i:i + 1]), y[i:i + 1]).backward()
    # d loss / d pixel = d loss / d image / std: the same sign, the same direction
    grads = leaf.grad / torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    expected = []
    for xi, grad in zip(x, grads):  # sample by sample, straight from the definitions
        if norm == "linf":
            moved = xi + step_size * grad.sign()
            moved = torch.max(torch.min(moved, xi + eps), xi - eps)
        else:
            moved = xi + step_size * grad / grad.norm()
            change = moved - xi
            moved = xi + change * min(1.0, eps / change.norm().item())
        expected.append(moved.clamp(0, 1))
    model.train()
    got = PGD(mean, std, eps=eps, steps=1, step_size=step_size, norm=norm,
              random_start=False)(model, images, y)
    assert got.dtype == torch.float64 and model.training
    # L2: torch's renorm scales by eps / (norm + 1e-7), a 1e-7 relative shortfall
    torch.testing.assert_close(unnormalise(got, mean, std), torch.stack(expected),
                               rtol=0, atol=1e-12 if norm == "linf" else 1e-7)


# --------------------------------------------------------------------------
# Adversarial training and robust accuracy
# --------------------------------------------------------------------------

def test_adversarial_training_end_to_end(digits, trained):
    """The `trained` recipe with PGD examples: it runs, and buys robustness. eps 8/255:
    at 3/255 these 16 px digits barely trouble a standard model (robust 0.91)."""
    pixels, labels, mean, std = digits
    eps = 8 / 255
    model = build_model("tiny", 10, image_size=SIDE, seed=0)
    history = train_classifier(model, loader(pixels[:960], labels[:960], mean, std, shuffle=True),
                               TrainConfig(epochs=3, batch_size=64, lr=0.4, seed=0),
                               device="cpu", progress=False, perturb=PGD(mean, std, eps=eps))
    assert all(torch.isfinite(torch.tensor(history["train_loss"])))
    assert model.training  # the attack left train_classifier's mode alone
    test = loader(pixels[1200:1456], labels[1200:1456], mean, std, batch_size=128, ids=True)
    clean, robust = {}, {}
    for name, net in (("standard", trained), ("adversarial", model)):
        clean[name] = evaluate(net, test, "cpu")
        robust[name] = robust_accuracy(
            net, test, PGD(mean, std, eps=eps, generator=torch.Generator().manual_seed(0)), "cpu")
        assert 0 <= robust[name] <= clean[name]
    assert model.training  # robust_accuracy restores the mode
    # measured: standard 0.97 clean / 0.70 robust, adversarial 0.96 / 0.87
    assert clean["adversarial"] > 0.9 and robust["adversarial"] > robust["standard"] + 0.1, \
        (clean, robust)


def test_robust_accuracy_without_an_attack_is_clean_accuracy(digits, trained):
    pixels, labels, mean, std = digits
    test = loader(pixels[1000:1300], labels[1000:1300], mean, std, batch_size=100)
    identity = PGD(mean, std, steps=0, random_start=False)
    assert robust_accuracy(trained, test, identity, "cpu") == evaluate(trained, test, "cpu")
    assert robust_accuracy(trained, test, PGD(mean, std), "cpu") < evaluate(trained, test, "cpu")
    with pytest.raises(ValueError, match="no samples"):
        robust_accuracy(trained, [], identity, "cpu")


# --------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_the_defaults_are_the_papers_attack():
    attack = PGD(MEAN, STD)
    assert (attack.eps, attack.steps, attack.alpha, attack.random_start, attack.norm) == (
        3 / 255, 3, 2 * (3 / 255) / 3, True, "linf")
    assert PGD(MEAN, STD, steps=10).alpha == pytest.approx(2 * (3 / 255) / 10)
    assert PGD(MEAN, STD, step_size=0.5).alpha == 0.5


@pytest.mark.parametrize("kwargs, name", [
    ({"eps": 0}, "eps"), ({"eps": -0.1}, "eps"), ({"eps": 3}, "eps"),
    ({"eps": float("nan")}, "eps"), ({"eps": "3/255"}, "eps"), ({"eps": True}, "eps"),
    ({"eps": float("inf"), "norm": "l2"}, "eps"),
    ({"steps": -1}, "steps"), ({"steps": 1.5}, "steps"), ({"steps": True}, "steps"),
    ({"step_size": 0}, "step_size"), ({"step_size": float("inf")}, "step_size"),
    ({"norm": "l1"}, "norm"), ({"norm": "inf"}, "norm"),
    ({"random_start": 1}, "random_start"), ({"amp": "on"}, "amp"),
    ({"generator": 42}, "generator"),
    ({"mean": (0.5, 0.5)}, "mean"), ({"mean": "abc"}, "mean"), ({"mean": ()}, "mean"),
    ({"std": (0.25, 0.0, 0.25)}, "std"), ({"std": (0.25, -1, 0.25)}, "std"),
    ({"std": (0.25, float("nan"), 0.25)}, "std"),
])
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}="):
        PGD(**{"mean": MEAN, "std": STD, **kwargs})


def test_bad_batches_are_named():
    model = build_model("tiny", 10, image_size=SIDE, seed=0)
    attack = PGD(MEAN, STD)
    images = normalise(torch.rand(4, 3, SIDE, SIDE), MEAN, STD)
    labels = torch.arange(4)
    for bad_images, bad_labels, name in [
        (images[:, :2], labels, "images"),                  # 2 channels, 3 means
        (images[:0], labels[:0], "images"),                 # empty batch
        (images.long(), labels, "images"),                  # not float
        (images * 4, labels, "images"),                     # not the loader's normalisation
        (images, labels.float(), "labels"),
        (images, labels[:3], "labels"),
    ]:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            attack(model, bad_images, bad_labels)
