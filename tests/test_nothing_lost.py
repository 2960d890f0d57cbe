"""Issue 21: nothing lost, no silent traps. fastvote replaces an output folder
only when it is new, empty or its own output of the same kind; a label space
may hold classes the source lacks; the smaller things a new user met."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastvote
from fastvote import atomic, cli
from fastvote.data.shards import cluster_prune
from fastvote.experiment import Experiment, ExperimentConfig
from test_pipeline import outputs, target  # small precomputed source and target outputs

ROOT = Path(__file__).resolve().parents[1]
RESULT = ["classes.json", "indices.npy", "manifest.json", "votes.png"]


def users_folder(path: Path) -> dict:
    """A folder of a user's work; returns its files' contents to compare."""
    (path / "data").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "data" / "labels.csv").write_text("a,b\n1,2\n")
    return snapshot(path)


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def saved_npy(tmp_path):
    """Precomputed outputs as .npy files, for the command line."""
    folder = tmp_path / "outputs"
    folder.mkdir()
    src = outputs()
    for name in ("features", "logits", "labels"):
        np.save(folder / f"source_{name}.npy", src[name].numpy())
    np.save(folder / "target_logits.npy", target()["logits"].numpy())
    source = tmp_path / "src"
    source.mkdir()
    for name in ("features", "logits", "labels"):
        os.link(folder / f"source_{name}.npy", source / f"{name}.npy")
    tgt = tmp_path / "tgt"
    tgt.mkdir()
    os.link(folder / "target_logits.npy", tgt / "logits.npy")
    return source, tgt


def run_prune(source, tgt, out, *extra, cwd=None, capsys=None):
    args = ["prune", "--source", str(source), "--target", str(tgt), "--method", "lm", "--keep", "2",
            "--out", str(out), *extra]
    if cwd is None:
        return cli.main(args)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return cli.main(args)
    finally:
        os.chdir(old)


# ---------------------------------------------------------------- 1. data loss

def test_prune_out_refuses_a_users_folder_before_any_compute(saved_npy, tmp_path, capsys, monkeypatch):
    source, tgt = saved_npy
    out = tmp_path / "my project"
    before = users_folder(out)
    monkeypatch.setattr(fastvote, "prune", lambda *a, **k: pytest.fail("computed before refusing --out"))
    assert run_prune(source, tgt, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out=" in err[0] and "notes.txt" in err[0] and "data/" in err[0]
    assert "--overwrite" in err[0]
    assert snapshot(out) == before


def test_overwrite_writes_into_the_folder_and_keeps_the_users_files(saved_npy, tmp_path):
    source, tgt = saved_npy
    out = tmp_path / "my project"
    before = users_folder(out)
    assert run_prune(source, tgt, out, "--overwrite") == 0
    after = snapshot(out)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == set(RESULT)
    assert fastvote.PruneResult.load(out).indices.numel() > 0
    # A second --overwrite replaces fastvote's files only.
    assert run_prune(source, tgt, out, "--overwrite") == 0
    assert set(snapshot(out)) == set(after)


def test_an_earlier_result_or_an_empty_folder_is_replaced(saved_npy, tmp_path):
    source, tgt = saved_npy
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_prune(source, tgt, empty) == 0
    assert sorted(p.name for p in empty.iterdir()) == RESULT
    (empty / "votes.png").unlink()  # an earlier result, even one missing a file, is fastvote's
    assert run_prune(source, tgt, empty) == 0
    assert sorted(p.name for p in empty.iterdir()) == RESULT
    manifest = json.loads((empty / "manifest.json").read_text())
    assert manifest["written_by"] == "fastvote" and manifest["kind"] == "prune" and manifest["files"] == RESULT


def test_a_result_saved_before_the_mark_is_still_fastvotes(tmp_path):
    result = fastvote.prune(outputs(), target(), method="lm", keep=2, progress=False)
    out = result.save(tmp_path / "old")
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("written_by", "kind", "files"):
        del manifest[key]
    (out / "manifest.json").write_text(json.dumps(manifest))  # as fastvote 0.1.0 wrote it
    assert atomic.output_kind(out) == "prune"
    result.save(out)
    assert atomic.output_kind(out) == "prune"


def test_another_kind_of_fastvote_output_is_refused(tmp_path):
    run = tmp_path / "run"
    atomic.claim(run, "experiment")
    (run / "cells").mkdir()
    result = fastvote.prune(outputs(), target(), method="lm", keep=2, progress=False)
    with pytest.raises(FileExistsError, match="holds a fastvote experiment output, not a prune one"):
        result.save(run)
    assert (run / "cells").is_dir()


def test_out_dot(saved_npy, tmp_path, capsys):
    source, tgt = saved_npy
    work = tmp_path / "work"
    work.mkdir()
    assert run_prune(source, tgt, ".", cwd=work) == 0  # an empty working folder: written into, not renamed
    assert sorted(p.name for p in work.iterdir()) == RESULT
    assert run_prune(source, tgt, ".", cwd=work) == 0  # and again: its own result
    assert Path(os.getcwd()).exists()
    busy = tmp_path / "busy"
    before = users_folder(busy)
    assert run_prune(source, tgt, ".", cwd=busy) == 2
    err = capsys.readouterr().err
    assert "--out='.'" in err and str(busy) in err and "empty name" not in err
    assert snapshot(busy) == before


def test_a_linked_out_folder_keeps_its_link(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    result = fastvote.prune(outputs(), target(), method="lm", keep=2, progress=False)
    result.save(link)
    result.save(link)
    assert link.is_symlink() and sorted(p.name for p in real.iterdir()) == RESULT


def test_a_file_as_out_is_refused(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("mine")
    result = fastvote.prune(outputs(), target(), method="lm", keep=2, progress=False)
    with pytest.raises(NotADirectoryError, match="is a file; expected a folder"):
        result.save(path)
    assert path.read_text() == "mine"


def test_features_cluster_prune_and_experiment_refuse_a_users_folder(tmp_path, monkeypatch):
    out = tmp_path / "mine"
    before = users_folder(out)
    with pytest.raises(FileExistsError, match="notes.txt"):
        fastvote.export_outputs(outputs(), out, progress=False)
    pool = tmp_path / "pool"
    pool.mkdir()
    np.save(pool / "a.npy", np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32))
    with pytest.raises(FileExistsError, match="notes.txt"):
        cluster_prune(pool, pool / "a.npy", out, clusters=3, keep=10, device="cpu", progress=False)
    with pytest.raises(FileExistsError, match="notes.txt"):
        Experiment(ExperimentConfig(), out, progress=False)
    assert snapshot(out) == before
    # With overwrite, cluster-prune writes beside the user's files and marks the folder.
    result = cluster_prune(pool, pool / "a.npy", out, clusters=3, keep=10, device="cpu", progress=False,
                           overwrite=True)
    assert result.kept_rows == 10 and {k: snapshot(out)[k] for k in before} == before
    assert json.loads((out / "manifest.json").read_text())["complete"] is True


def test_a_killed_cluster_prune_folder_is_rerun_not_refused(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    np.save(pool / "a.npy", np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32))
    out = tmp_path / "out"
    atomic.claim(out, "cluster-prune")  # what a killed run leaves: the unfinished mark ...
    (out / "assignments").mkdir()
    (out / "assignments" / "a.npy").write_text("partial")  # ... and some of its files
    result = cluster_prune(pool, pool / "a.npy", out, clusters=3, keep=10, device="cpu", progress=False)
    assert result.kept_rows == 10
    assert np.load(out / "assignments" / "a.npy").shape == (40,)


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    from fastvote import plots

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plots, "plot_votes", full_disk)
    result = fastvote.prune(outputs(), target(), method="lm", keep=2, progress=False)
    with pytest.raises(OSError, match=r"No space left on device: '.*r'") as caught:
        result.save(tmp_path / "r")
    assert caught.value.errno == errno.ENOSPC
    from fastvote.data.npy import NpyWriter

    writer = NpyWriter(tmp_path / "cache" / "x.npy", (4, 2), np.float32)
    monkeypatch.setattr(writer, "_file", type("Full", (), {"write": full_disk, "close": lambda self: None})())
    with pytest.raises(OSError, match=r"No space left on device: '.*x\.npy'"):
        writer.write(np.zeros((4, 2)))
    writer.abort()


# ---------------------------------------------------------------- 3. classes without samples

def labels_only(k=12, n=600, absent=(3, 7, 11), seed=0):
    rng = np.random.default_rng(seed)
    present = np.setdiff1d(np.arange(k), absent)
    return {"labels": rng.choice(present, size=n), "class_names": [f"c{j}" for j in range(k)]}


def test_lm_over_a_label_space_with_absent_classes(tmp_path):
    src = labels_only()
    logits = torch.full((30, 12), -5.0)
    logits[:20, 7] = 5.0   # most of the target votes for an absent class
    logits[20:, 2] = 5.0
    with pytest.warns(UserWarning, match=r"3 of 12 source classes have no samples.*c7.*got target votes"):
        result = fastvote.prune(src, {"logits": logits}, method="lm", keep=2, progress=False)
    kept = result.kept_classes.tolist()
    assert kept[0] == 2 and 7 not in kept and len(kept) == 2
    assert np.isin(src["labels"][result.indices.numpy()], kept).all()
    assert len(result.indices) == np.isin(src["labels"], kept).sum()
    assert result.votes[7] == 20  # the votes say what the target wanted
    with pytest.raises(ValueError, match="keep=10 exceeds the 9 source classes that have samples"):
        fastvote.prune(src, {"logits": logits}, method="lm", keep=10, progress=False)
    with pytest.warns(UserWarning, match="cannot be kept"):
        everything = fastvote.prune(src, {"logits": logits}, method="lm", ratio=0.0, progress=False)
    assert len(everything.kept_classes) == 9 and len(everything.indices) == 600


def test_fm_and_random_over_a_label_space_with_absent_classes():
    src = outputs(n=60, k=6)
    keep_rows = src["labels"] != 4
    src = {"features": src["features"][keep_rows], "labels": src["labels"][keep_rows],
           "class_names": [f"c{j}" for j in range(6)]}
    with pytest.warns(UserWarning, match="c4"):
        fm = fastvote.prune(src, target(), method="fm", keep=5, progress=False)
    assert sorted(fm.kept_classes.tolist()) == [0, 1, 2, 3, 5] and fm.votes[4] == 0 and fm.votes.sum() == 12
    with pytest.warns(UserWarning, match="c4"):
        rnd = fastvote.prune({"labels": src["labels"], "class_names": src["class_names"]}, target(),
                             method="random", keep=5, progress=False)
    assert 4 not in rnd.kept_classes.tolist()
    with pytest.raises(ValueError, match="k=6 is more than the 5 source classes"):
        fastvote.prune(src, target(), method="fm", keep=2, k=6, progress=False)


def test_a_full_label_space_selects_as_before():
    src = labels_only(absent=())
    for seed in range(3):
        rnd = fastvote.prune(src, target(k=12), method="random", keep=4, seed=seed, progress=False)
        expected = np.random.default_rng(seed).choice(12, size=4, replace=False)
        assert rnd.kept_classes.tolist() == expected.tolist()


# ---------------------------------------------------------------- 6. smaller things

def test_version_flag():
    out = subprocess.run([sys.executable, "-m", "fastvote.cli", "--version"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"fastvote {fastvote.__version__}"


def test_public_submodules_are_attributes_without_importing_them_up_front():
    code = ("import sys, fastvote; eager = 'fastvote.experiment' in sys.modules; "
            "print(eager, fastvote.train.TrainConfig.__name__, fastvote.models.__name__, "
            "fastvote.cluster.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.split() == ["False", "TrainConfig", "fastvote.models", "fastvote.cluster"], out.stderr
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        fastvote.nonexistent


def _undocumented(fn) -> list:
    """Parameters its docstring does not name, nor the docstring of the call
    it refers the rest to ("Other arguments as for fastvote.prune")."""
    import importlib
    import inspect
    import re

    doc = inspect.getdoc(fn) or ""
    referred = re.search(r"Other arguments as (?:for )?(fastvote(?:\.\w+)+)", doc)
    if referred:
        module, _, name = referred.group(1).rpartition(".")
        doc += inspect.getdoc(getattr(importlib.import_module(module), name)) or ""
    return [name for name in inspect.signature(fn).parameters
            if name not in ("self", "cls", "kw", "kwargs") and not re.search(rf"\b{name}\b", doc)]


@pytest.mark.parametrize("fn", [fastvote.prune, fastvote.PruneResult.save, fastvote.PruneResult.loader,
                                fastvote.PruneResult.load, fastvote.export_outputs, cluster_prune],
                         ids=lambda f: f.__qualname__)
def test_every_argument_of_a_public_call_is_documented(fn):
    assert _undocumented(fn) == []


def test_the_tie_warning_names_the_rule():
    logits = torch.full((4, 12), -5.0)
    logits[:, 1] = 5.0
    with pytest.warns(UserWarning, match=r"picked by the tie score, the highest mean softmax probability.*SELECTION"):
        fastvote.prune(labels_only(absent=()), {"logits": logits}, method="lm", keep=8, progress=False)
    assert (ROOT / "docs" / "SELECTION.md").is_file()


def test_an_image_folder_is_a_source(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for c, name in enumerate(["cat", "dog", "owl"]):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(rng.normal(60 + 70 * c, 20, (20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    work = tmp_path / "w"
    result = fastvote.prune(str(root), str(root), method="random", keep=2, workdir=work, progress=False)
    assert result.class_names == ["cat", "dog", "owl"] and len(result.indices) == 8
    assert result.manifest["source"]["description"].endswith(f"image folder {root}")
    betons = list((work / "betons").glob("folder-*.beton"))
    assert len(betons) == 1
    written = betons[0].stat().st_mtime_ns
    fastvote.prune(str(root), str(root), method="random", keep=2, workdir=work, progress=False)
    assert betons[0].stat().st_mtime_ns == written  # read back, not written again
    (root / "emu").mkdir()  # a class folder without images: in the label space, with no samples
    with pytest.warns(UserWarning, match=r"1 of 4 source classes have no samples \(\['emu'\]\)"):
        again = fastvote.prune(str(root), str(root), method="random", keep=3, workdir=work, progress=False)
    assert again.class_names == ["cat", "dog", "emu", "owl"] and 2 not in again.kept_classes.tolist()
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class folders; expected precomputed surrogate outputs, or an image "
                                         "folder tree"):
        fastvote.prune(str(empty), target(), method="lm", keep=2, progress=False)


def test_data_write_and_surrogate_train_never_replace_a_users_file(tmp_path, capsys):
    notes = tmp_path / "notes.beton"
    notes.write_text("my notes, not a beton")
    assert cli.main(["data", "write", "digits", str(notes)]) == 2
    assert "exists and is not a beton" in capsys.readouterr().err
    assert notes.read_text() == "my notes, not a beton"
    checkpoint = tmp_path / "s.pt"
    checkpoint.write_text("my file")
    assert cli.main(["surrogate", "train", "--source", "digits", "--out", str(checkpoint), "--arch", "tiny"]) == 2
    assert "exists and is not a fastvote checkpoint" in capsys.readouterr().err
    assert checkpoint.read_text() == "my file"


def test_equal_weights_save_to_equal_bytes(tmp_path):
    from fastvote import models

    model = models.build_model("tiny", 3, image_size=8, seed=0)
    one = models.save_checkpoint(tmp_path / "a.pt", model, note="x").read_bytes()
    two = models.save_checkpoint(tmp_path / "b.pt", model, note="x").read_bytes()
    assert one == two  # a resumed surrogate's file is the uninterrupted one's


def test_prune_leaves_the_callers_random_generators(tmp_path):
    import random

    from fastvote import data as fvdata
    from fastvote.train import TrainConfig

    beton = fvdata.write_offline("digits", "train", tmp_path / "d.beton", progress=False)
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    fastvote.prune(beton, beton, method="fm", keep=3, arch="tiny", image_size=8, workdir=tmp_path / "w",
                   train_config=TrainConfig(epochs=1, batch_size=32), progress=False)
    assert torch.equal(torch.get_rng_state(), before[0])  # the surrogate's training seeded every epoch
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]
