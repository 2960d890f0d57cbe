"""Issue 12's regressions: the prune pipeline refuses what it used to get
silently wrong, checks every argument before anything expensive, and writes
results and caches that can be trusted. Real data where a surrogate is
involved (a small haystack beton), precomputed outputs elsewhere."""
import ast
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fastvote
from fastvote import cli, methods, models
from fastvote import data as fvdata
from fastvote.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def outputs(n=60, k=6, d=5, seed=0):
    """Precomputed source outputs: k classes of n // k rows, features near their class's centre."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    centers = torch.randn(k, d, generator=g) * 4
    return {"features": centers[labels] + 0.1 * torch.randn(n, d, generator=g),
            "logits": torch.randn(n, k, generator=g), "labels": labels}


def target(k=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"logits": torch.randn(12, k, generator=g), "features": torch.randn(12, 5, generator=g)}


# ---------------------------------------------------------------- A. silent wrong answers

@pytest.mark.parametrize("method", ["lm", "random", "fm"])
def test_column_vector_labels_are_refused(method):
    source = outputs()
    source["labels"] = source["labels"].reshape(-1, 1)
    with pytest.raises(ValueError, match=r"source labels have shape \[60, 1\]; expected 1-D.*reshape\(-1\)"):
        fastvote.prune(source, target(), method=method, keep=2, progress=False)


@pytest.mark.parametrize("labels,match", [
    (torch.arange(60) % 6 - 1, "class id -1; expected ids 0 <= id"),
    ((torch.arange(60) % 6).float(), "dtype float32; expected integer class ids"),
    (torch.tensor([100_000_000] + [j % 6 for j in range(59)]), "class id 100000000"),
])
def test_bad_label_values_are_refused_not_coerced(labels, match):
    source = dict(outputs(), labels=labels)
    source["logits"] = torch.randn(60, int(labels.max()) + 1 if labels.max() < 100 else 6)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        fastvote.prune(source, {"logits": torch.randn(3, source["logits"].shape[1])}, method="random", keep=2,
                       progress=False)
    assert time.perf_counter() - started < 2  # a label of 1e8 allocates nothing


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="lm", metric="cosine"), "lm does not use 'metric'"),
    (dict(method="random", k=0), "random does not use 'k'"),
    (dict(method="random", weight="bogus"), "random does not use 'weight'"),
    (dict(method="fm:iterations=2"), "iterations=2 is only used with centroids='kmeans'"),
    (dict(method="fm", num_clusters=7), "num_clusters=7 is only used with centroids='kmeans'"),
    (dict(method="fm", centroids="kmeans", num_clusters=0), "num_clusters=0 is invalid"),
    (dict(method="lm", reverse="no"), "reverse='no' is invalid; expected a bool"),
    (dict(method="lm", keep=True), "keep=True is invalid"),
    (dict(method="lm", ratio="0.5"), "ratio='0.5' is invalid"),
    (dict(method="lm", k=7), "k=7 is more than the 6 source classes"),
    (dict(method="lm", seed=1.5), "seed=1.5 is invalid"),
])
def test_options_the_method_does_not_use_or_bad_types_are_errors(kwargs, match):
    if "ratio" not in kwargs:
        kwargs.setdefault("keep", 2)
    with pytest.raises(ValueError, match=match):
        fastvote.prune(outputs(), target(), progress=False, **kwargs)


def test_the_manifest_records_exactly_the_options_used():
    result = fastvote.prune(outputs(), target(), method="fm", keep=2, metric="cosine", progress=False)
    arguments = result.manifest["arguments"]
    assert arguments["method"] == "fm:metric=cosine" and result.method == "fm:metric=cosine"
    assert arguments["options"] == dict(methods.parse("fm:metric=cosine").options)
    plain = fastvote.prune(outputs(), target(), method="random", keep=2, progress=False)
    assert plain.manifest["arguments"]["options"] == {} and "k" not in plain.manifest["arguments"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_an_error_not_a_cpu_run():
    with pytest.raises(ValueError, match="device='cuda': this machine has no usable CUDA GPU"):
        fastvote.prune(outputs(), target(), method="lm", keep=2, device="cuda", progress=False)
    with pytest.raises(ValueError, match="device='tpu' is invalid"):
        fastvote.prune(outputs(), target(), method="lm", keep=2, device="tpu", progress=False)


def test_precomputed_widths_are_checked_up_front():
    with pytest.raises(ValueError, match="different widths"):
        fastvote.prune(outputs(), {"features": torch.randn(3, 7)}, method="fm", keep=2, progress=False)
    with pytest.raises(ValueError, match="has 9 logits but the source has 6 classes"):
        fastvote.prune(outputs(), {"logits": torch.randn(3, 9)}, method="lm", keep=2, progress=False)
    with pytest.raises(ValueError, match=r"lacks \['logits'\], which method='lm' reads"):
        fastvote.prune(outputs(), {"features": torch.randn(3, 5)}, method="lm", keep=2, progress=False)


def test_keep_far_above_the_voted_classes_warns():
    source = outputs(n=600, k=60)
    one_class = {"logits": torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), 60).float()}
    with pytest.warns(UserWarning, match="only 1 of 60 classes got any vote"):
        fastvote.prune(source, one_class, method="lm", keep=20, progress=False)


# ---------------------------------------------------------------- real data: surrogate, caches, outputs

SIZE = 16


@pytest.fixture(scope="module")
def real(tmp_path_factory, one_thread):
    if fvdata.missing("haystack") or fvdata.missing("digits"):
        pytest.skip("offline datasets missing")
    pytest.importorskip("ffcv")
    root = tmp_path_factory.mktemp("pipeline")
    source = fvdata.write_offline("haystack", "train", root / "haystack.beton", per_class=40, progress=False)
    tgt = fvdata.write_offline("digits", "train", root / "digits.beton", progress=False)
    return {"root": root, "source": source, "target": tgt}


def quick(seed=0):
    return TrainConfig(epochs=1, batch_size=256, lr=0.2, seed=seed)


def test_seed_fixes_a_trained_surrogate_in_fresh_workdirs(real, tmp_path):
    results = [fastvote.prune(real["source"], real["target"], method="fm", centroids="kmeans", num_clusters=30,
                              keep=10, arch="tiny", train_config=quick(), seed=0, workdir=tmp_path / f"w{i}",
                              progress=False) for i in range(2)]
    weights = [models.load_model(r.manifest["surrogate"]["path"]).state_dict() for r in results]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert torch.equal(results[0].indices, results[1].indices)
    assert results[0].manifest["surrogate"]["fingerprint"] == results[1].manifest["surrogate"]["fingerprint"]


def test_a_beton_source_with_foreign_target_features_is_refused_before_training(real, tmp_path):
    started = time.perf_counter()
    with pytest.raises(ValueError, match="two unrelated feature spaces"):
        fastvote.prune(real["source"], {"features": torch.randn(5, 32)}, method="fm", keep=3, arch="tiny",
                       train_config=quick(), workdir=tmp_path, progress=False)
    assert time.perf_counter() - started < 2 and not (tmp_path / "surrogates").exists()


def test_precomputed_outputs_of_the_same_surrogate_mix_with_a_beton(real, tmp_path):
    model = models.build_model("tiny", 30, image_size=SIZE, seed=0)
    ckpt = models.save_checkpoint(tmp_path / "s.pt", model, resolution=SIZE, mean=[0.5] * 3, std=[0.25] * 3)
    whole = fastvote.prune(real["source"], real["target"], method="fm", keep=5, surrogate=ckpt,
                           workdir=tmp_path / "w", progress=False)
    from fastvote.features import collect

    tgt = collect(model, fvdata.eval_loader(real["target"], 256, resolution=SIZE, mean=[0.5] * 3, std=[0.25] * 3),
                  device="cpu", want=("features",), progress=False)
    mixed = fastvote.prune(real["source"], {"features": tgt["features"],
                                            "surrogate": whole.manifest["surrogate"]["fingerprint"]},
                           method="fm", keep=5, surrogate=ckpt, workdir=tmp_path / "w", progress=False)
    assert torch.equal(mixed.kept_classes, whole.kept_classes) and torch.equal(mixed.votes, whole.votes)


@pytest.mark.parametrize("kwargs,match", [
    (dict(ratio=60), "ratio=60 is invalid"),
    (dict(keep=99), "keep=99 is invalid"),
    (dict(keep=3, k=31), "k=31 is more than the 30"),
    (dict(keep=3, weight="votes"), "weight='votes' is invalid"),
    (dict(keep=3, method="fm", metric="manhattan"), "metric='manhattan' is invalid"),
    (dict(keep=3, method="lm:bogus=1"), "lm does not use 'bogus'"),
    (dict(keep=3, arch="resnet9000"), "arch='resnet9000': expected one of"),
    (dict(keep=3, image_size=0), "image_size=0 is invalid"),
])
def test_bad_arguments_fail_in_under_two_seconds_with_nothing_written(real, tmp_path, kwargs, match):
    kwargs.setdefault("method", "lm")
    started = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        fastvote.prune(real["source"], real["target"], arch=kwargs.pop("arch", "tiny"), train_config=quick(),
                       workdir=tmp_path, progress=False, **kwargs)
    assert time.perf_counter() - started < 2
    assert not (tmp_path / "surrogates").exists()


def test_a_checkpoints_recorded_image_size_is_used(real, tmp_path):
    model = models.build_model("tiny", 30, image_size=24, seed=0)
    ckpt = models.save_checkpoint(tmp_path / "s.pt", model)  # no resolution/mean/std extras
    with pytest.warns(UserWarning, match="records no mean"):
        result = fastvote.prune(real["source"], real["target"], method="lm", keep=3, surrogate=ckpt,
                                workdir=tmp_path / "w", progress=False)
    assert result.manifest["preprocessing"]["resolution"] == 24


def test_save_replaces_an_earlier_result_whole_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    result = fastvote.prune(outputs(), target(), method="lm", keep=2, progress=False)
    out = tmp_path / "r"
    result.save(out)
    (out / "features.png").write_text("a file of the earlier result's")  # listed in its manifest: fastvote's
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(dict(manifest, files=manifest["files"] + ["features.png"])))
    old_umask = os.umask(0o022)
    try:
        result.save(out)
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "indices.npy", "manifest.json", "votes.png"]
    assert out.stat().st_mode & 0o777 == 0o755

    from fastvote import plots

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "plot_votes", full_disk)
    with pytest.raises(OSError):
        result.save(tmp_path / "new")
    with pytest.raises(OSError):
        result.save(out)  # the earlier result stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    assert (out / "votes.png").is_file()


def test_a_saved_result_loads_from_another_directory(real, tmp_path, monkeypatch):
    monkeypatch.chdir(real["root"])
    result = fastvote.prune("haystack.beton", "digits.beton", method="random", keep=3, progress=False)
    result.save(tmp_path / "r")
    monkeypatch.chdir(tmp_path)
    loaded = fastvote.PruneResult.load(tmp_path / "r")
    assert Path(loaded.manifest["source"]["beton"]).is_absolute() and loaded.unit == "classes"
    loader = loaded.loader(batch_size=64, train=False, with_identifier=True, resolution=SIZE,
                           mean=[0.5] * 3, std=[0.25] * 3)
    seen = torch.cat([ids.clone() for _, _, ids in loader])
    assert torch.equal(torch.sort(seen).values, loaded.indices)


# ---------------------------------------------------------------- the CLI

def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fastvote.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True)


def test_cli_defaults_are_the_apis():
    """The same prune from both faces: every CLI default is prune()'s (or None = prune's own default)."""
    args = cli.build_parser().parse_args(["prune", "--source", "s", "--target", "t", "--keep", "2", "--out", "o"])
    import inspect

    defaults = {n: p.default for n, p in inspect.signature(fastvote.prune).parameters.items()}
    assert args.method == defaults["method"] and args.arch == defaults["arch"]
    assert args.batch_size == defaults["batch_size"] and args.seed == defaults["seed"]
    assert args.device == defaults["device"] and args.workdir == defaults["workdir"]
    assert cli._train_config(args) is None  # prune() then trains with TrainConfig(seed=seed)
    assert cli.method_options(args) == {}
    for name in ("k", "metric", "weight", "temperature", "reverse", "centroids", "num_clusters",
                 "normalize_targets"):
        assert defaults[name] is None and getattr(args, name) is None  # the method's own default
    # every option any method declares has a flag
    flags = {a.dest for a in cli.build_parser()._subparsers._group_actions[0].choices["prune"]._actions}
    assert {o.name for m in methods.METHODS.values() for o in m.OPTIONS} <= flags


@pytest.mark.parametrize("command", [["--help"], ["prune", "--help"], ["features", "--help"], ["surrogate", "train", "--help"],
                                     ["experiment", "--help"], ["demo", "--help"], ["data", "write", "--help"]])
def test_cli_help_works_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(command)
    assert done.value.code == 0 and "usage: fastvote" in capsys.readouterr().out


def test_cli_common_options_after_the_subcommand():
    args = cli.build_parser().parse_args(["--seed", "3", "prune", "--source", "s", "--target", "t", "--keep", "2",
                                          "--out", "o", "--device", "cpu", "--workdir", "w"])
    assert (args.seed, args.device, args.workdir) == (3, "cpu", "w")
    args = cli.build_parser().parse_args(["--seed", "3", "prune", "--source", "s", "--target", "t", "--keep", "2",
                                          "--out", "o", "--mean", "0.5", "0.4", "0.3", "--std", "1", "1", "1"])
    assert args.seed == 3 and args.mean == [0.5, 0.4, 0.3]


def test_cli_user_mistakes_are_one_line_and_bugs_keep_their_traceback(real, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    text_beton = tmp_path / "notes.beton"
    text_beton.write_text("not a beton\n")
    base = ["prune", "--source", real["source"], "--target", real["target"], "--keep", "3", "--arch", "tiny",
            "--epochs", "1", "--workdir", tmp_path / "w"]
    for argv, match in [(base + ["--out", a_file], "is a file"),
                        (base[:2] + [text_beton] + base[3:] + ["--out", tmp_path / "o"], "notes.beton"),
                        (base + ["--out", tmp_path / "o", "--metric", "cosine"], "lm does not use 'metric'")]:
        started = time.perf_counter()
        assert cli.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert time.perf_counter() - started < 5
    assert not (tmp_path / "o").exists() and not (tmp_path / "w" / "surrogates").exists()

    def bug(args):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(cli, "cmd_prune", bug)
    with pytest.raises(RuntimeError, match="an internal bug"):
        cli.main([str(a) for a in base + ["--out", tmp_path / "o"]])


def test_cli_prune_and_api_give_the_same_result(real, tmp_path):
    model = models.build_model("tiny", 30, image_size=SIZE, seed=0)
    ckpt = models.save_checkpoint(tmp_path / "s.pt", model, resolution=SIZE, mean=[0.5] * 3, std=[0.25] * 3)
    done = run_cli("prune", "--source", real["source"], "--target", real["target"], "--method", "fm", "--keep", "4",
                   "--surrogate", ckpt, "--metric", "cosine", "--out", tmp_path / "cli", "--workdir", tmp_path / "w",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    api = fastvote.prune(real["source"], real["target"], method="fm", keep=4, surrogate=ckpt, metric="cosine",
                         workdir=tmp_path / "w", progress=False)
    assert np.array_equal(np.load(tmp_path / "cli" / "indices.npy"), api.indices.numpy())
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["arguments"]["options"] == api.manifest["arguments"]["options"]


# ---------------------------------------------------------------- the design

def _imports(path: Path, package: str):
    """Every fastvote module a file imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_no_import_circle_inside_fastvote():
    modules = {}
    for path in (ROOT / "fastvote").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        # a package's __init__ re-exports its modules; edges into a package point at the package itself
        graph[name] = {m for m in _imports(path, package) if m in modules and m != name
                       and not (path.name == "__init__.py" and m.startswith(name + "."))
                       and m != "fastvote"}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                raise AssertionError(f"import circle: {' -> '.join(stack[stack.index(nxt):] + [nxt])}")
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_every_method_declares_typed_options_once():
    for name, module in methods.METHODS.items():
        spec = methods.parse(name)
        assert set(spec.options) == {o.name for o in module.OPTIONS}
        for option in module.OPTIONS:
            assert option.doc and option.type in (bool, int, float, str), (name, option)
        assert spec.unit == ("classes" if module.CLASS_WISE else "samples")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert methods.parse("lm", {"k": 3}, defaults={"metric": "cosine"}).options["k"] == 3
