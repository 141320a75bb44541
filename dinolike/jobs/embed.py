"""The embed job (`dinolike embed CKPT_OR_RUN --data folder:DIR --out FILE [--patches]`): embeddings of a set
of images.

One row per readable image, with its file name, in the order of the folder (sorted paths). The backbone
is any checkpoint, run folder or export `dinolike eval` accepts; the images get the run's own
preprocessing (its crop size and mean/std, what `dinolike export` writes).

FILE by its suffix:
  .npy      FILE: CLS embeddings [N, D] float32; FILE without .npy + .names.txt: one file name a line;
            with --patches also FILE without .npy + .patches.npy: pooled patch embeddings [N, D]
  .parquet  one table: name, label (first-level sub-folder index, -1 without one), cls, patches
            (fixed-size float32 lists); needs pyarrow (pip install pyarrow)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from dinolike.errors import DinolikeError
from dinolike.eval.embed import Embeddings

SUFFIXES = (".npy", ".parquet")


class EmbedError(DinolikeError):
    """Bad input for `dinolike embed` the user can fix: printed as one line, exit status 2."""


def sidecars(out: Path) -> dict[str, Path]:
    """The files a .npy output is made of, by content."""
    stem = out.with_suffix("")
    return {"cls": out, "names": Path(f"{stem}.names.txt"), "patches": Path(f"{stem}.patches.npy")}


def check_output(out: Path) -> None:
    """Before any image is read: a suffix we write, a folder we can write into, pyarrow for parquet."""
    if out.suffix not in SUFFIXES:
        raise EmbedError(f"--out {out}: unknown suffix {out.suffix or '(none)'!r}; use {' or '.join(SUFFIXES)}")
    if out.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise EmbedError("writing .parquet needs pyarrow (pip install pyarrow); or use --out FILE.npy") from None
    if out.is_dir():
        raise EmbedError(f"--out {out} is a folder; give a file name")
    check_writable_parent(out)


def check_writable_parent(out: Path) -> None:
    """The folder `out` goes into can be created and written, before minutes of work (a read-only target
    used to fail after the work with a traceback, a parent that is a file with FileExistsError)."""
    parent = out.absolute().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise EmbedError(f"--out {out}: {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as e:
        raise EmbedError(f"--out {out}: cannot write in {existing} ({e.strerror or e})") from None


def checkpoint_note(pretrained: Path, which: str) -> str | None:
    """What a run folder without its teacher export is embedded with (its newest checkpoint), said aloud: the
    run has not finished, or its end refused the export."""
    if which != "teacher" or not pretrained.is_dir() or (pretrained / "teacher_backbone.pth").is_file():
        return None
    newest = sorted((pretrained / "checkpoints").glob("ckpt_*.pt"))[-1:]
    if not newest or (pretrained / "backbone.pth").is_file():
        return None
    return (f"{pretrained} has no teacher_backbone.pth (the run has not finished, or its end refused the export): "
            f"embedding with the teacher of {newest[0].relative_to(pretrained)}")


def write(emb: Embeddings, out: Path, meta: dict) -> list[Path]:
    """Write `emb` as `out` says (see the module docstring); returns the files written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        if any("\n" in n for n in emb.names):
            raise EmbedError("a file name holds a line break and cannot be listed in .names.txt; use .parquet")
        files = sidecars(out)
        np.save(files["cls"], emb.cls)
        files["names"].write_text("".join(f"{n}\n" for n in emb.names))
        written = [files["cls"], files["names"]]
        if emb.patches is not None:
            np.save(files["patches"], emb.patches)
            written.append(files["patches"])
        return written
    import pyarrow as pa
    import pyarrow.parquet as pq

    def column(x: np.ndarray) -> pa.Array:  # [N, D] -> N fixed-size lists of D float32
        return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).reshape(-1)), x.shape[1])

    cols = {"name": pa.array(emb.names, pa.string()), "label": pa.array(emb.labels, pa.int64()), "cls": column(emb.cls)}
    if emb.patches is not None:
        cols["patches"] = column(emb.patches)
    table = pa.table(cols).replace_schema_metadata({"dinolike": json.dumps(meta)})
    pq.write_table(table, out)
    return [out]


def embed_to_file(pretrained: str | Path, data: str | Path, out: str | Path, *, patches: bool, which: str,
                  batch_size: int, num_workers: int, device: str | None, progress: bool,
                  allow_collapsed: bool) -> tuple[Embeddings, list[Path]]:
    """The embed job: load the backbone, embed every readable image of `data`, write `out` (the formats are
    in the module docstring); returns (embeddings, files written). Raises EmbedError / NotFoundError /
    DataError / CollapsedBackboneError on bad input, before any image is read where it can."""
    import torch

    from dinolike.data.datasets import as_spec, build_dataset
    from dinolike.eval.embed import embed_dataset, load_backbone, refuse_collapsed

    out = Path(out)
    check_output(out)
    if batch_size < 1:
        raise EmbedError(f"--batch-size must be >= 1, got {batch_size}")
    try:
        spec = as_spec(data)
    except ValueError as e:
        raise EmbedError(f"--data: {e}") from None
    model, prep = load_backbone(pretrained, which)
    if note := checkpoint_note(Path(pretrained), which):
        print(f"dinolike embed: note: {note}", file=sys.stderr)
    if not allow_collapsed:
        refuse_collapsed(model, prep, str(pretrained))
    dataset = build_dataset(spec, channels=prep.channels)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    emb = embed_dataset(model, dataset, prep, patches=patches, batch_size=batch_size, num_workers=num_workers,
                        device=device, progress=progress)
    n = prep.numbers
    meta = {"pretrained": str(pretrained), "data": spec, "which": which,
            "preprocessing": {"resize": n.resize, "crop": n.crop, "mean": list(n.mean), "std": list(n.std)}}
    try:
        return emb, write(emb, out, meta)
    except OSError as e:  # the disk filled up or went away during the work
        raise EmbedError(f"cannot write {out}: {e.strerror or e}") from None
