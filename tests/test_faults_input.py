"""Fault injection into what users hand us: broken image files, bad configs, damaged curation shards.

Each test's claim is FAULTS[key] in tests/faultlog.py, the table of README's RELIABILITY section.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from faultlog import FAULTS, record, render
from PIL import Image

from dinolike.commands import submit
from dinolike.commands import train as cli
from dinolike.commands.curate import main as curate
from dinolike.config import load_config
from dinolike.data.datasets import FashionMNIST, ImageFolder, load_image, read_image
from dinolike.data.positions import SSLDataset
from dinolike.training.loop import train

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "fmnist_smoke.yaml"
DEMO = REPO / "configs" / "curation" / "fmnist_demo.yaml"
TINY = ["data.batch_size=8", "model.depth=1", "crops.local_number=1", "heads.hidden_dim=32", "heads.out_dim=64",
        "heads.ibot_out_dim=64", "heads.bottleneck_dim=16", "run.log_every=1", "run.checkpoint_every=3",
        "optim.warmup_epochs=0.3", "teacher.warmup_temp_epochs=0.3", "collapse.enabled=false"]


def _good_images(folder: Path, n: int) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    images = list(FashionMNIST(split="train", limit=n).images)
    for i, a in enumerate(images):
        Image.fromarray(a).save(folder / f"good{i:02d}.png")
    return images


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit gray) with one row of pixel data: a decompression
    bomb's header without the bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1)))
            + chunk(b"IEND", b""))


def _write_odd_images(folder: Path, sample: np.ndarray) -> tuple[dict[str, np.ndarray], list[str]]:
    """Files that must decode (name -> the expected 8-bit gray pixels) and files that must be skipped."""
    expected = {}
    Image.new("CMYK", (16, 16), (0, 255, 0, 0)).save(folder / "cmyk.jpg")  # magenta: RGB (255, 0, 255)
    expected["cmyk.jpg"] = np.full((16, 16), 105, np.uint8)  # its luma, 0.299 * 255 + 0.114 * 255
    deep = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")  # 16-bit gray: PIL's own convert would clip at 255
    expected["deep16.png"] = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(np.full((1, 1), 200, np.uint8)).save(folder / "one_px.png")
    expected["one_px.png"] = np.full((1, 1), 200, np.uint8)
    Image.fromarray(sample).save(folder / "png_named.jpg", format="PNG")  # the extension lies
    expected["png_named.jpg"] = sample
    bad = {
        "corrupt.png": bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8)),
        "truncated.png": (folder / "good00.png").read_bytes()[:200],
        "zero.jpg": b"",
        "huge.png": _png_claiming(20000, 20000),  # PIL itself refuses it ...
        "big.png": _png_claiming(10000, 10000),  # ... but only warns about this one (100 M pixels)
        "text.webp": b"this is a text file with an image extension\n",
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    return expected, list(bad)


def test_odd_images_are_decoded_correctly_or_skipped_and_counted_once_per_file(tmp_path):
    folder = tmp_path / "imgs"
    good = _good_images(folder, 20)
    expected, bad = _write_odd_images(folder, good[3])
    for name, pixels in expected.items():
        got = np.asarray(read_image(folder / name, channels=1))
        assert got.shape == pixels.shape and np.abs(got.astype(int) - pixels).max() <= 2, name  # JPEG: +-2
    for name in bad:
        with pytest.warns(UserWarning, match=re.escape(name)):
            assert load_image(folder / name, channels=1) is None
    with pytest.raises(Image.DecompressionBombError, match="10000x10000 pixels is above the limit"):
        read_image(folder / "big.png")  # refused from its header, before 100 MB of pixels are allocated

    out = tmp_path / "run"
    n_iter = 8  # 64 draws: every one of the 30 files at least twice
    cfg = load_config(SMOKE, [f"run.output_dir={out}", f"data.train=folder-nolabels:{folder}", *TINY,
                              f"optim.epochs={n_iter / 10}", "data.max_skipped_fraction=1.0"])
    assert train(cfg) == 0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    base = ImageFolder(folder, labels=False, channels=1)
    order = SSLDataset(base, transform=lambda x: x, seed=cfg.run.seed)  # the run's own draw order
    drawn = [order.locate(p)[1] for p in range(n_iter * 8)]
    bad_drawn = [i for i in drawn if Path(base.paths[i]).name in bad]
    assert last["iteration"] == n_iter and (out / "teacher_backbone.pth").is_file()
    assert last["skipped_files"] == len(set(bad_drawn)) == len(bad)  # each bad file once ...
    assert last["skipped_draws"] == len(bad_drawn) > len(bad)  # ... and every draw of one
    record("images-mixed", f"{len(bad)} bad of {len(base)} files, {n_iter * 8} draws: "
                           f"skipped_files {last['skipped_files']}, skipped_draws {last['skipped_draws']}")


def test_a_folder_without_one_readable_image_fails_before_training(tmp_path, capsys):
    folder = tmp_path / "imgs" / "all"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"bad{i}.png").write_bytes(b"definitely not a png")
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(SMOKE), f"run.output_dir={out}", f"data.train=folder:{folder.parent}",
                     *TINY]) == 2
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ": warning: " not in ln]  # 1-channel note
    err = "\n".join(lines)
    assert len(lines) == 1 and "none of its 3 image files can be read" in err and "bad0.png" in err
    assert not (out / "teacher_backbone.pth").exists() and not (out / "checkpoints").exists()
    assert not (out / "metrics.jsonl").exists()
    record("images-all-bad", err)


def test_too_many_unreadable_images_stop_the_run_naming_them(tmp_path, capsys):
    folder = tmp_path / "imgs"
    _good_images(folder, 20)
    for i in range(3):
        (folder / f"bad{i}.png").write_bytes(b"definitely not a png")
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(SMOKE), f"run.output_dir={out}", f"data.train=folder-nolabels:{folder}",
                     *TINY]) == 2  # default data.max_skipped_fraction 0.05
    out_err = capsys.readouterr().err.strip()
    err = out_err.splitlines()[-1]  # after one warning per bad file met
    assert "Traceback" not in out_err and "TooManySkipsError" in err and "data.max_skipped_fraction=0.05" in err
    assert "3 bad file(s), e.g." in err and "bad0.png" in err
    assert not (out / "teacher_backbone.pth").exists() and not (out / "checkpoints").exists()
    record("images-too-many-bad", err)


# --------------------------------------------------------------------------------------------- configs


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """An `sbatch` (and `srun`) that only note that they were called."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("sbatch", "srun"):
        exe = bindir / name
        exe.write_text(f"#!/bin/sh\necho called >> {tmp_path / 'slurm_called'}\necho 'Submitted batch job 1'\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "slurm_called"


@pytest.mark.parametrize("command, rest, message", [
    ("train", ["--config", str(SMOKE), "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    ("train", ["--config", str(SMOKE), "precision.cuda=fp16"], "precision.cuda must be one of"),
    ("curate", ["all", "--config", str(DEMO), "retrieve.methods=[nearest]"], "retrieve.methods must be made of"),
    ("eval", ["knn", "--pretrained", "run/teacher_backbone.pth", "eval.knn.temperature=hot"],
     "'eval.knn.temperature' in the command line must be float"),
])
def test_submit_checks_the_config_before_submitting(fake_sbatch, tmp_path, capsys, command, rest, message):
    jobs = tmp_path / "jobs"
    assert submit.main([command, "--job-dir", str(jobs), "--", *rest]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.endswith("nothing submitted")
    assert not fake_sbatch.exists() and not jobs.exists()
    record("submit-bad-config", f"{command}: {err}")


def test_curate_and_eval_check_their_config_before_any_work(tmp_path, capsys):
    work = tmp_path / "work"
    assert curate(["all", "--config", str(DEMO), f"work_dir={work}", "retrieve.methods=[nearest]"]) == 2
    curate_err = capsys.readouterr().err.strip()
    assert "retrieve.methods must be made of sample, cluster; got 'nearest'" in curate_err
    assert not work.exists()  # nothing embedded before the error

    from dinolike.commands.eval import main as evaluate

    cache = tmp_path / "cache"
    for bad, message in ((["--val-dataset", "fmnist:val"], "--val-dataset: dataset spec 'fmnist:val'"),
                         (["eval.batch_size=many"], "'eval.batch_size' in the command line must be int")):
        assert evaluate(["knn", "--pretrained", "random", "--config", "vit_pico", "--cache-dir", str(cache),
                         *bad]) == 2
        eval_err = capsys.readouterr().err.strip()
        assert len(eval_err.splitlines()) == 1 and message in eval_err
    assert not cache.exists()  # no feature was extracted
    record("command-bad-config", f"curate: {curate_err}; eval: {eval_err}")


# ------------------------------------------------------------------------------------ curation shards

SHARD = 20


def _embed_args(work: Path, pool: Path) -> list[str]:
    return ["--config", str(DEMO), f"work_dir={work}", f"pool=[folder-nolabels:{pool}]", "references=[]",
            "seeds=[]", f"embed.shard_size={SHARD}", "embed.progress=false", "build.sources=[dedup]"]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shards")
    _good_images(root / "pool", 3 * SHARD)
    assert curate(["embed", *_embed_args(root / "clean", root / "pool")]) == 0
    return root / "clean", root / "pool"


def _flip_middle_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2 + 64] ^= 0x01  # inside the float data, past the .npy header
    p.write_bytes(bytes(data))


SHARD_DAMAGE = {
    "truncated": lambda d: (d / "shard_00001.npy").write_bytes((d / "shard_00001.npy").read_bytes()[:500]),
    "zero-byte": lambda d: (d / "shard_00001.npy").write_bytes(b""),
    "byte-flipped": lambda d: _flip_middle_byte(d / "shard_00001.npy"),
    "paths-edited": lambda d: (d / "shard_00001.paths.txt").write_text("elsewhere.png\t-1\n" * SHARD),
}


@pytest.mark.parametrize("damage", list(SHARD_DAMAGE))
def test_a_damaged_shard_is_refused_then_recomputed(embedded, tmp_path, capsys, damage):
    clean, pool = embedded
    work = tmp_path / "work"
    shutil.copytree(clean, work)
    shards = work / "embeddings" / "pool"
    SHARD_DAMAGE[damage](shards)
    assert curate(["dedup", *_embed_args(work, pool)]) == 2  # never read as data
    err = capsys.readouterr().err.strip()
    assert "shard 1 of" in err and "is damaged" in err and "run `embed` again" in err
    assert not (work / "dedup").exists()
    kept = {i: (shards / f"shard_{i:05d}.npy").stat().st_mtime_ns for i in (0, 2)}
    assert curate(["embed", *_embed_args(work, pool)]) == 0
    for i, t in kept.items():  # intact shards are not recomputed
        assert (shards / f"shard_{i:05d}.npy").stat().st_mtime_ns == t
    for suffix in (".npy", ".paths.txt", ".done.json"):
        name = f"shard_00001{suffix}"
        assert (shards / name).read_bytes() == (clean / "embeddings" / "pool" / name).read_bytes(), name
    assert curate(["dedup", *_embed_args(work, pool)]) == 0
    record("shard-damaged", f"{damage}: {err.split('error: ', 1)[-1]}")


# ------------------------------------------------------------------------------------------ the table


def test_reliability_table_lists_every_fault_the_suite_asserts():
    """BENCHMARKS.md's table is rendered from FAULTS (benchmarks/reliability.py); its claims must be current."""
    text = (REPO / "BENCHMARKS.md").read_text()
    section = text.split("<!-- reliability:begin -->")[1].split("<!-- reliability:end -->")[0]
    rows = [line for line in section.strip().splitlines() if line.startswith("| ")][1:]
    expected = render({}).splitlines()[2:]
    claims = [" | ".join(r.split(" | ")[:2]) for r in rows]
    assert claims == [" | ".join(r.split(" | ")[:2]) for r in expected], "rerun `python benchmarks/reliability.py`"
    assert len(rows) == len(FAULTS)
