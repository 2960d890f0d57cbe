"""Issue 24: long passes killed with SIGKILL at random points, several times
in a row, then rerun: the same bytes as an uninterrupted run, at most one
chunk of work redone after each kill (measured from what the killed process
said it computed and what it had committed), and nothing left behind that
grows with the number of kills. Ctrl-C stops at a chunk boundary with one
line."""
import os
import random
import signal
import time
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


# A commit at every step: the killed runs have many commits whatever the machine's speed, so a kill after
# a few of them always lands with work left (with commits every 0.4 s a fast machine finished first).
EVERY_STEP = dict(ENV, FASTVOTE_CHUNK_SECONDS="1e-9")


def start(args, env=ENV) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "resume_worker.py"), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def committed(cache: Path) -> set:
    """The rows every column has committed in chunks, and the chunks' sizes."""
    rows, sizes = None, []
    for column in COLUMNS:
        mine = set()
        for part in (cache / "parts" / column).glob("[0-9]*-[0-9]*.npy"):  # (not a killed commit's temporary)
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
        proc = start(features_args(pass_inputs, work, out), EVERY_STEP)
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


# ---------------------------------------------------------------- k-means and cluster-prune

class Stop(Exception):
    pass


@pytest.mark.parametrize("cap,hierarchical", [(None, False), (16, False), (None, True)])
def test_kmeans_resumed_after_any_pass_gives_the_same_bits(tmp_path, monkeypatch, cap, hierarchical):
    import torch

    from fastvote import chunks, cluster

    g = np.random.default_rng(1)
    x = torch.from_numpy((g.normal(0, 3, (40, 8))[g.integers(0, 40, 3000)] + g.normal(0, 1, (3000, 8)))
                         .astype(np.float32))

    def run(folder):
        return cluster.fit(lambda: x.split(97), 40, rows=range(3000), num_rows=3000, iterations=6, tol=0,
                           max_rows_per_cluster=cap, progress=False, checkpoint=folder, hierarchical=hierarchical)

    whole = run(None)
    save = chunks.save_state
    monkeypatch.setenv("FASTVOTE_CHUNK_SECONDS", "1e-9")  # a save after every batch, within passes too
    for steps in (1, 2, 17, 34, 120):  # after the seeding, within and between passes
        folder, saved = tmp_path / f"stop{steps}", [0]

        def stop_after(*args):
            save(*args)
            saved[0] += 1
            if saved[0] == steps:
                raise Stop

        monkeypatch.setattr(chunks, "save_state", stop_after)
        with pytest.raises(Stop):
            run(folder)
        monkeypatch.setattr(chunks, "save_state", save)
        resumed = run(folder)
        assert torch.equal(resumed.centroids, whole.centroids) and torch.equal(resumed.counts, whole.counts)
        assert resumed.passes == whole.passes and resumed.restarts == whole.restarts


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Six shards of 20,000 rows x 32 around 100 centres, and a target near a quarter of them."""
    root = tmp_path_factory.mktemp("resume-pool")
    (root / "pool").mkdir()
    g = np.random.default_rng(0)
    centres = g.normal(0, 3, (100, 32)).astype(np.float32)
    for i in range(6):
        np.save(root / "pool" / f"s{i}.npy", (centres[g.integers(0, 100, 20000)] +
                                              g.normal(0, 1, (20000, 32))).astype(np.float32))
    np.save(root / "target.npy", (centres[g.integers(0, 25, 2000)] + g.normal(0, 1, (2000, 32))).astype(np.float32))
    return root


def cluster_args(pool, out):
    return ["cluster-prune", "--device", "cpu", "--source", str(pool / "pool"), "--target", str(pool / "target.npy"),
            "--out", str(out), "--clusters", "100", "--keep", "50000", "--iterations", "8",
            "--max-rows-per-cluster", "0"]


def outputs(out: Path) -> dict:
    """Every output file's bytes, the manifest without its timings and resumes."""
    import json

    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    for name in ("seeding_seconds", "pass_seconds", "assign_seconds", "vote_and_keep_seconds", "resumed"):
        manifest.pop(name)
    return dict(files, manifest=manifest)


def test_cluster_prune_killed_three_times_resumes_to_the_same_outputs(pool, tmp_path):
    whole = tmp_path / "whole"
    done = subprocess.run([sys.executable, str(HERE / "resume_worker.py"), *cluster_args(pool, whole)], env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    commits = [float(line.split()[-1]) for line in done.stdout.splitlines() if line.startswith(("started",
                                                                                                 "committed"))]
    longest = max(b - a for a, b in zip(commits[1:], commits[2:]))  # the longest step after the first commit
    out, g, lost = tmp_path / "out", random.Random(0), []
    for kill in range(3):
        proc = start(cluster_args(pool, out), EVERY_STEP)
        lines, wanted = [], g.randint(1, 6)  # die a random while after a random number of commits
        for line in proc.stdout:
            lines.append(line)
            if sum(x.startswith("committed") for x in lines) == wanted:
                break
        # within about one step of that commit: the whole run takes ~0.3 s, so a longer wait let a fast
        # machine finish before the kill
        time.sleep(g.uniform(0, longest))
        assert proc.poll() is None, "the run finished before the kill: the pool is too small for this machine"
        killed_at = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()
        proc.wait()
        stamps = [float(x.split()[-1]) for x in lines + rest.splitlines() if x.startswith("committed")]
        assert stamps, "the kill came after a commit"
        lost.append(killed_at - stamps[-1])
        # a kill leaves the work area and at most the shard files in flight: nothing that grows with kills
        assert len([p for p in out.rglob(".*") if p.is_file()]) <= 2
        # key, seeding, last pass, and at most the one save in flight (the next run removes it)
        assert len(list((out / "resume").iterdir())) <= 4
    done = subprocess.run([sys.executable, str(HERE / "resume_worker.py"), *cluster_args(pool, out)], env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stdout, done.stdout
    assert outputs(out) == outputs(whole)
    assert not (out / "resume").exists() and not [p for p in out.rglob(".*")]
    print(f"seconds lost to each kill: {[round(s, 2) for s in lost]}; the longest step: {longest:.2f} s")
    assert max(lost) <= longest + 0.5  # (+ the kill's own latency on a busy machine)


# ---------------------------------------------------------------- beton writing

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """120 noise PNGs of 200 x 260 px in three class folders (JPEG-encoded at <= 96 px when written)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("resume-images") / "images"
    g = np.random.default_rng(0)
    for i in range(120):
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 255, (200, 260, 3), dtype=np.uint8)).save(root / f"c{i % 3}" / f"{i}.png")
    return root


def test_a_beton_write_killed_three_times_resumes_to_the_same_bytes(image_folder, tmp_path):
    def args(path):
        return ["data", "write", str(path), "--image-folder", str(image_folder), "--workers", "1",
                "--max-resolution", "96"]

    assert cli.main(args(tmp_path / "whole.beton")) == 0
    path, g, kills = tmp_path / "out.beton", random.Random(1), 0
    while kills < 3:
        proc = start(args(path), EVERY_STEP)
        wanted, seen = g.randint(1, 3), 0
        for line in proc.stdout:
            seen += line.startswith("committed rows")
            if seen == wanted:
                break
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        assert not path.exists()
        assert len([p for p in tmp_path.rglob(".*") if p.is_file() and "partial" in p.name]) <= 2
    assert kills == 3
    done = subprocess.run([sys.executable, str(HERE / "resume_worker.py"), *args(path)], env=ENV, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[fastvote] resuming: " in done.stdout and "of out.beton is written" in done.stdout
    assert path.read_bytes() == (tmp_path / "whole.beton").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.beton", "out.beton.classes.json", "whole.beton",
                                                          "whole.beton.classes.json"]


def test_ctrl_c_stops_cluster_prune_after_a_saved_step(pool, tmp_path):
    out = tmp_path / "out"
    proc = start(cluster_args(pool, out))
    for line in proc.stdout:
        if line.startswith("committed kmeans-seeded"):
            proc.send_signal(signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "fastvote cluster-prune: interrupted; rerun the same command to resume"
    assert (out / "resume" / "kmeans-seeded.pkl").is_file() and not (out / "centroids.npy").exists()


def test_ctrl_c_under_torchrun_stops_the_ranks_and_the_rerun_resumes(pool, tmp_path):
    """Ctrl-C in a terminal sends SIGINT to torchrun and to both ranks: each
    rank stops at its next save with the one line (torchrun then reports the
    signal itself), and the rerun resumes within the pass where the ranks
    stopped and writes what an uninterrupted two-rank run writes."""
    from test_distributed import free_port

    def torchrun(out):
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(HERE / "resume_worker.py"),
                *cluster_args(pool, out)]

    whole, out = tmp_path / "whole", tmp_path / "out"
    subprocess.run(torchrun(whole), env=EVERY_STEP, check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(torchrun(out), env=EVERY_STEP, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own process group: the terminal's, for the Ctrl-C
    for line in proc.stdout:
        if line.startswith("committed kmeans-pass"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "fastvote cluster-prune: interrupted; rerun the same command to resume" in err
    assert not (out / "centroids.npy").exists()
    rerun = subprocess.run(torchrun(out), env=EVERY_STEP, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "[fastvote] resuming k-means: the seeding" in rerun.stdout
    assert outputs(out) == outputs(whole)


def test_pace_commits_every_two_seconds_unless_commits_are_slow(monkeypatch):
    from fastvote import chunks

    now = [100.0]
    monkeypatch.setattr(chunks.time, "monotonic", lambda: now[0])
    monkeypatch.delenv("FASTVOTE_CHUNK_SECONDS", raising=False)
    pace = chunks.Pace()
    now[0] += 1.9
    assert not pace.due()
    now[0] += 0.1
    assert pace.due()
    with pace.committing():
        now[0] += 0.1  # a commit of 0.1 s: the next one waits 5 s, so commits stay at 2% of the pass
    now[0] += 4.9
    assert not pace.due()
    now[0] += 0.1
    assert pace.due()
    monkeypatch.setenv("FASTVOTE_CHUNK_SECONDS", "0.5")  # pinned: whatever a commit costs
    pinned = chunks.Pace()
    with pinned.committing():
        now[0] += 10
    now[0] += 0.5
    assert pinned.due()
    monkeypatch.setenv("FASTVOTE_CHUNK_SECONDS", "soon")
    with pytest.raises(ValueError, match="FASTVOTE_CHUNK_SECONDS='soon'; expected a positive number"):
        chunks.Pace()


def test_parts_are_read_back_from_one_listing_and_overlaps(tmp_path):
    """Reads find rows in parts committed by this process, listed before it
    started, written by another (a rank) after the listing, and overlapping."""
    from fastvote import chunks

    rows = np.arange(100, dtype=np.int64)[:, None] * 10 + np.arange(3)
    first = chunks.ChunkedColumns(tmp_path, {"k": 1})
    first.commit(0, {"x": rows[0:30]})
    first.commit(30, {"x": rows[30:50]})
    again = chunks.ChunkedColumns(tmp_path, {"k": 1})  # a rerun lists them
    assert again.covered(["x"], range(100)) == [(0, 50)]
    first.commit(50, {"x": rows[50:80]})  # another writer, after the rerun's listing
    again.commit(40, {"x": rows[40:55]})  # overlapping, as after a resume with another world size
    again.commit(80, {"x": rows[80:90]})
    for a, b in [(0, 1), (29, 31), (45, 85), (79, 90), (89, 90)]:
        np.testing.assert_array_equal(again.read("x", a, b), rows[a:b])
    with pytest.raises(FileNotFoundError, match="row 90 is not in any committed chunk"):
        again.read("x", 85, 95)
    assert again.covered(["x"], range(100)) == [(0, 90)]
    again.remove(range(0, 90))
    assert not (tmp_path / "parts").exists()


def test_shared_parts_leave_the_folders_to_the_other_ranks(tmp_path):
    """Under torchrun each rank commits its own rows into one folder: a rank
    done with its rows removes its parts only, so another rank's commit never
    finds its folder or key.json gone."""
    from fastvote import chunks

    key = {"k": 1}
    first, second = (chunks.ChunkedColumns(tmp_path, key, shared=True) for _ in range(2))
    first.commit(0, {"x": np.zeros((10, 2))})
    first.remove(range(0, 10))  # its rows done: the column folder is empty now, and stays
    assert (tmp_path / "parts" / "x").is_dir() and (tmp_path / "parts" / "key.json").is_file()
    second.commit(10, {"x": np.ones((5, 2))})
    np.testing.assert_array_equal(chunks.ChunkedColumns(tmp_path, key).read("x", 10, 15), np.ones((5, 2)))
