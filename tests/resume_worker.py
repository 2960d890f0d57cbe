"""`fastvote ARGS` in a process the resume tests kill: prints, flushed, the
rows of every batch the surrogate computes ("computed START STOP"), so a
test knows what a killed run had done."""
import sys

from fastvote import cli, views

_run = views.ModelView._run


def run(self, want, rows):
    at = rows.start
    for out in _run(self, want, rows):
        print(f"computed {at} {at + len(out[want[0]])}", flush=True)
        at += len(out[want[0]])
        yield out


views.ModelView._run = run
sys.exit(cli.main(sys.argv[1:]))
