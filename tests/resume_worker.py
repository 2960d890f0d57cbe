"""`fastvote ARGS` in a process the resume tests kill. Prints, flushed, the
rows of every batch the surrogate computes ("computed START STOP") and the
wall time of every commit of a k-means step, shard file or chunk of rows
("committed NAME ... TIME"), so a test knows what a killed run had done and when."""
import sys
import time

from fastvote import chunks, cli, views
from fastvote.data import npy

_run, _save, _close, _commit = views.ModelView._run, chunks.save_state, npy.NpyWriter.close, chunks.ChunkedColumns.commit


def run(self, want, rows):
    at = rows.start
    for out in _run(self, want, rows):
        print(f"computed {at} {at + len(out[want[0]])}", flush=True)
        at += len(out[want[0]])
        yield out


def save_state(path, key, state):
    _save(path, key, state)
    print(f"committed {path.name} {time.time()}", flush=True)


def close(self):
    path = _close(self)
    print(f"committed {path.parent.name}/{path.name} {time.time()}", flush=True)
    return path


def commit(self, start, arrays, stop=None):
    _commit(self, start, arrays, stop)
    print(f"committed rows {start} {start + len(next(iter(arrays.values()))) if stop is None else stop} {time.time()}",
          flush=True)


views.ModelView._run, chunks.save_state, npy.NpyWriter.close = run, save_state, close
chunks.ChunkedColumns.commit = commit
print(f"started {time.time()}", flush=True)
sys.exit(cli.main(sys.argv[1:]))
