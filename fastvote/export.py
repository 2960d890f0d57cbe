"""``fastvote.export_outputs`` (CLI: ``fastvote features``): a surrogate's
logits and pooled features over a dataset, written as a folder that
``fastvote.prune`` takes back as precomputed outputs:

    features.npy [N, D] float32, logits.npy [N, K] float32, labels.npy [N]
    int64 (labelled inputs), classes.json (the source's class names),
    surrogate.json (the surrogate's fingerprint, entry and preprocessing),
    manifest.json (fastvote's mark and the files written).

surrogate.json's fingerprint lets the folder be mixed with inputs the same
surrogate runs over (fastvote.prune refuses outputs of another surrogate).
The pass goes through the same feature cache prune() uses, so exporting after
a prune (or pruning after an export) does not run the surrogate again.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

from fastvote import distributed, inputs
from fastvote import surrogate as surrogates
from fastvote.atomic import atomic_dir, check_output_folder
from fastvote.rng import keeps_rng

OUTPUTS = ("features", "logits")


@keeps_rng
def export_outputs(data, out: Union[str, os.PathLike], *, source=None, surrogate=None,
                   arch: str = surrogates.DEFAULT_ARCH, train_config=None, image_size: Optional[int] = None,
                   mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                   device=None, batch_size: int = 256, seed: int = 0,
                   workdir: Union[str, os.PathLike, None] = None, image_key: str = "image",
                   label_key: str = "label", progress: bool = True, overwrite: bool = False) -> Path:
    """Runs the surrogate over `data` and writes the folder `out` (whole or not at all).

    data: any input fastvote.prune takes as a dataset (beton, registry name, Dataset).
    source: the source the surrogate belongs to (default: `data` itself);
        with surrogate=None the surrogate is trained on it, as prune() would.
    out: the folder to write; a new or empty one, or an earlier features
        output (replaced whole). A folder holding anything else is refused
        before any compute, unless overwrite=True: then the files are written
        into it and its other files are kept (fastvote.atomic).
    Other arguments as for fastvote.prune. Returns `out` (absolute).
    """
    from fastvote.prune import open_view

    out = check_output_folder(out, "features", overwrite=overwrite)
    device = distributed.resolve_device(device)
    surrogates.check_arguments(surrogate, arch, image_size, mean, std)  # before writing any beton
    workdir = inputs.workdir_path(workdir)
    progress = progress and distributed.is_main()
    with distributed.main_first():
        keys = dict(image_key=image_key, label_key=label_key)
        target = inputs.resolve(data, "data", workdir, progress, **keys)
        src = target if source is None else inputs.resolve(source, "source", workdir, progress, **keys)
    if target.outputs is not None:
        raise ValueError(f"{target.description}: already precomputed outputs; expected images (a .beton, a "
                         "registry name or a Dataset)")
    sur = surrogates.resolve(surrogate, src, arch=arch, train_config=train_config, image_size=image_size, mean=mean,
                             std=std, seed=seed, workdir=workdir, device=device)
    model = sur.model(device, progress)
    view = open_view(target, src, sur, model, batch_size=batch_size, device=device, workdir=workdir,
                     progress=progress)
    want = OUTPUTS + (("labels",) if target.labels is not None else ())
    for _ in view.batches(want):  # one pass fills the cache (or reads it back)
        pass
    if distributed.is_main():
        with atomic_dir(out, "features", overwrite=overwrite) as staging:
            for name in want:
                try:  # a hard link costs nothing; across file systems, a copy
                    os.link(view.cache / f"{name}.npy", staging / f"{name}.npy")
                except OSError:
                    shutil.copyfile(view.cache / f"{name}.npy", staging / f"{name}.npy")
            if src.class_names is not None:
                (staging / "classes.json").write_text(json.dumps(src.class_names, indent=1))
            (staging / "surrogate.json").write_text(json.dumps(
                {"fingerprint": sur.fingerprint, "surrogate": sur.entry, "preprocessing": sur.prep,
                 "data": {"description": target.description, "fingerprint": target.fingerprint,
                          "num_samples": target.num_rows}}, indent=1, default=str))
    distributed.barrier()
    return out

