"""Issue 24: long passes killed with SIGKILL at random points, several times
in a row, then rerun: the same bytes as an uninterrupted run, at most one
chunk of work redone after each kill (measured from what the killed process
said it computed and what it had committed), and nothing left behind that
grows with the number of kills. Ctrl-C stops at a chunk boundary with one
line."""
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastvote import cli, models
from fastvote import data as fvdata

pytestmark = [pytest.mark.skipif(bool(fvdata.missing("haystack")), reason="offline datasets missing"),
              pytest.mark.filterwarnings("ignore:FASTVOTE_LOADER=torch")]
HERE = Path(__file__).parent
COLUMNS = ("features", "labels", "logits")
ENV = dict(os.environ, FASTVOTE_LOADER="torch", FASTVOTE_CHUNK_SECONDS="0.4", OMP_NUM_THREADS="1",
           PYTHONPATH=str(HERE.parent))


@pytest.fixture(scope="module")
def pass_inputs(tmp_path_factory):
    """360 images and a resnet18 at 16 px: a pass of a few seconds on one thread."""
    root = tmp_path_factory.mktemp("resume")
    beton = fvdata.write_offline("haystack", "train", root / "h.beton", per_class=12, progress=False)
    model = models.build_model("resnet18", 30, image_size=16, seed=0)
    checkpoint = models.save_checkpoint(root / "s.pt", model, resolution=16, mean=[0.5] * 3, std=[0.25] * 3)
    return beton, checkpoint


def features_args(pass_inputs, work: Path, out: Path) -> list:
    beton, checkpoint = pass_inputs
    return ["--device", "cpu", "features", str(beton), "--surrogate", str(checkpoint), "--arch", "resnet18",
            "--out", str(out), "--workdir", str(work), "--batch-size", "16"]


def start(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "resume_worker.py"), *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def committed(cache: Path) -> set:
    """The rows every column has committed in chunks, and the chunks' sizes."""
    rows, sizes = None, []
    for column in COLUMNS:
        mine = set()
        for part in (cache / "parts" / column).glob("*-*.npy"):
            a, b = map(int, part.stem.split("-"))
            mine |= set(range(a, b))
            sizes.append(b - a)
        rows = mine if rows is None else rows & mine
    return rows, sizes


@pytest.fixture(autouse=True)
def _quick_loader(monkeypatch):
    monkeypatch.setenv("FASTVOTE_LOADER", "torch")  # starts in a second where FFCV compiles for twenty


def test_a_feature_pass_killed_three_times_resumes_to_the_same_bytes(pass_inputs, tmp_path, one_thread):
    whole = tmp_path / "whole"
    assert cli.main(features_args(pass_inputs, tmp_path / "w0", whole)) == 0
    work, out = tmp_path / "w", tmp_path / "out"
    g = random.Random(0)
    redone, chunk_rows, kills = [], [], 0
    while kills < 3:
        proc = start(features_args(pass_inputs, work, out))
        before = set()
        cache = next((work / "features").glob("*"), None)
        if cache is not None:
            before, _ = committed(cache)
        computed, lines = set(), g.randint(2, 6)  # die after a random number of batches
        for line in proc.stdout:
            if line.startswith("computed"):
                a, b = map(int, line.split()[1:])
                computed |= set(range(a, b))
                lines -= 1
                if lines == 0:
                    break
        if proc.poll() is not None:  # finished before the kill: the pass is shorter than planned
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        cache = next((work / "features").glob("*"))
        after, sizes = committed(cache)
        assert not computed & before, "a committed row was computed again"
        redone.append(len(computed - after))
        chunk_rows += sizes
        # what a kill leaves: at most one half-written file a column, cleaned by the next run
        assert len([p for p in cache.rglob(".*") if p.is_file()]) <= len(COLUMNS)
    assert kills == 3
    done = subprocess.run([sys.executable, str(HERE / "resume_worker.py"), *features_args(pass_inputs, work, out)],
                          env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[fastvote] resuming: " in done.stdout and "of the data pass is cached" in done.stdout
    for column in COLUMNS:
        assert (out / f"{column}.npy").read_bytes() == (whole / f"{column}.npy").read_bytes()
    # at most one chunk of work lost a kill; the finished cache is the three files, no parts left
    print(f"rows redone after each kill: {redone}; chunk sizes (rows): {sorted(set(chunk_rows))}")
    assert max(redone) <= max(chunk_rows)
    assert sorted(p.name for p in next((work / "features").glob("*")).iterdir()) == [f"{c}.npy" for c in COLUMNS]


def test_ctrl_c_stops_at_a_chunk_boundary_with_one_line_and_the_rerun_finishes(pass_inputs, tmp_path, one_thread):
    work, out = tmp_path / "w", tmp_path / "out"
    proc = start(features_args(pass_inputs, work, out))
    for line in proc.stdout:
        if line.startswith("computed"):
            proc.send_signal(signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "fastvote features: interrupted; rerun the same command to resume"
    assert not out.exists()
    cache = next((work / "features").glob("*"))
    assert committed(cache)[0], "the chunk in flight was committed"
    assert cli.main(features_args(pass_inputs, work, out)) == 0
    assert np.load(out / "features.npy").shape[0] == 360
