"""What an export needs to know about the run behind a backbone: its preprocessing and its story.

Downstream tools preprocess images from what the export says (`preprocessor_config.json` for Hugging Face,
`pretrained_cfg` for timm), so an export that guesses ImageNet statistics and 518 px for a 28 px
grey-scale model silently feeds it the wrong inputs. The run's own config is the source: the one a
training checkpoint carries, else the `config.yaml` of the run folder the file lies in.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinolike.data.normalize import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class Preprocessing:
    """Eval-time preprocessing: resize the shorter side to `resize`, center-crop `crop`, normalise."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int
    crop: int

    @property
    def crop_pct(self) -> float:
        return self.crop / self.resize


def eval_resize(crop: int) -> int:
    """The shorter side before the center crop: the crop itself for tiny images (nothing to cut away),
    else the usual 256/224 ratio (the same rule as eval's transform)."""
    return crop if crop <= 64 else round(crop * 256 / 224)


def find_run_config(path: str | Path) -> tuple[dict[str, Any] | None, Path | None]:
    """(merged run config, run folder) of a checkpoint, a backbone file or a run folder; (None, None) when
    the file carries no config and lies in no run folder (an official hub file, a foreign export)."""
    from omegaconf import OmegaConf

    path = Path(path)
    if path.is_file() and path.suffix == ".pt":  # training checkpoint: the config travels inside
        import torch

        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - not ours to judge here; the strict load reports bad files
            ckpt = None
        if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), str):
            run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
            return json.loads(ckpt["config"]), run_dir
    start = path if path.is_dir() else path.parent
    for folder in (start, start.parent):
        if (folder / "config.yaml").is_file() and (folder / "metrics.jsonl").is_file():
            return OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"), resolve=True), folder
    return None, None


def preprocessing(run_cfg: dict[str, Any] | None, model_cfg: dict[str, Any]) -> Preprocessing:
    """The run's normalisation and global-crop size; without a run config, ImageNet statistics (0.5 for
    non-RGB inputs) at the size the position embedding was learned at."""
    channels = int(model_cfg.get("in_chans", 3))
    data = (run_cfg or {}).get("data") or {}
    crops = (run_cfg or {}).get("crops") or {}
    if data.get("mean") is not None and data.get("std") is not None:
        mean, std = tuple(map(float, data["mean"])), tuple(map(float, data["std"]))
        if len(mean) == 1 and channels > 1:
            mean, std = mean * channels, std * channels
    elif channels == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = (0.5,) * channels, (0.5,) * channels
    crop = int(crops.get("global_size") or model_cfg["img_size"])
    patch = int(model_cfg["patch_size"])
    crop = math.ceil(crop / patch) * patch  # the model sees whole patches only
    return Preprocessing(mean, std, eval_resize(crop), crop)


def run_knn(run_dir: Path | None) -> tuple[float, str] | None:
    """(top-1 %, where it comes from): the final kNN of the run, else its last periodic kNN."""
    if run_dir is None:
        return None
    final = run_dir / "eval_knn" / "results.json"
    if final.is_file():
        try:
            m = json.loads(final.read_text()).get("metrics") or {}
        except (json.JSONDecodeError, AttributeError):
            m = {}
        ks = sorted(int(k[1:-5]) for k in m if k.startswith("k") and k.endswith("_top1") and k[1:-5].isdigit())
        if ks:
            k = 20 if 20 in ks else ks[0]
            return float(m[f"k{k}_top1"]), f"final kNN, k={k}, eval_knn/results.json"
    metrics = run_dir / "metrics.jsonl"
    last = None
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row.get("knn_top1"), int | float):
                last = (float(row["knn_top1"]), f"periodic kNN at iteration {row.get('iteration')}")
    return last


def data_label(spec: str) -> str:
    """A training-data spec for a card that is shared: the dataset, never a path of the machine it was
    trained on (`folder:/home/me/photos` says who and where; `fmnist:train:/mnt/x` only where)."""
    scheme, _, rest = spec.partition(":")
    if scheme == "fmnist":
        return f"`fmnist:{rest.partition(':')[0]}` (Fashion-MNIST)"
    what = {"folder": "a folder of images, labels from its sub-folders (unused by pretraining)",
            "folder-nolabels": "a folder of images", "manifest": "a list of image files (e.g. a curated manifest)"}
    return f"`{scheme}`: {what.get(scheme, 'local images')}, not named here"


def model_card(
    fmt: str, model_cfg: dict[str, Any], prep: Preprocessing, run_cfg: dict[str, Any] | None,
    run_dir: Path | None, source: str, collapsed_cosine: float | None = None,
) -> str:
    """README.md for the export folder: what the model is, what it saw, how it was trained, how good
    its features were, and how to load it. `collapsed_cosine`: the backbone gives every input the same
    embedding (exported with --allow-collapsed): the card says so first."""
    library = {"hf": "transformers", "timm": "timm"}.get(fmt, "dinolike")
    c = model_cfg
    regs = int(c.get("n_registers") or 0)
    lines = [
        "---",
        f"library_name: {library}",
        "pipeline_tag: image-feature-extraction",
        "tags: [dinov2, self-supervised, vision-transformer, dinolike]",
        "---",
        "",
        f"# {run_dir.name if run_dir else Path(source).stem}: a DINOv2-style ViT backbone (dinolike)",
        "",
        "Self-supervised (DINO + iBOT + KoLeo, EMA teacher) image encoder exported by `dinolike export`; "
        "it gives features (CLS token and patch tokens), no classifier.",
        "",
        *([f"**Warning: collapsed backbone.** Every input gets the same CLS embedding (mean cosine "
           f"{collapsed_cosine:.5f} between 32 probe images): its features cannot tell images apart. It was "
           "exported with `--allow-collapsed`, for inspection only.", ""] if collapsed_cosine is not None else []),
        "## Architecture",
        f"- ViT, patch {c['patch_size']}, width {c['embed_dim']}, {c['depth']} blocks, {c['num_heads']} heads, "
        f"FFN {c.get('ffn_layer', 'mlp')} (ratio {c.get('mlp_ratio')}), {regs} register tokens",
        f"- {c.get('in_chans', 3)} input channel(s), position embedding learned at {c['img_size']} px",
        "",
        "## Preprocessing",
        f"- resize the shorter side to {prep.resize} px (bicubic), center-crop {prep.crop} px",
        f"- normalise with mean {list(prep.mean)}, std {list(prep.std)}",
        "",
    ]
    if run_cfg:
        d, o, h = run_cfg.get("data", {}), run_cfg.get("optim", {}), run_cfg.get("heads", {})
        t, cr = run_cfg.get("teacher", {}), run_cfg.get("crops", {})
        lines += [
            "## Data and recipe",
            f"- training data: {data_label(str(d.get('train')))}" + (f" (first {d['limit']} images)" if d.get("limit")
                                                                     else ""),
            f"- {o.get('epochs')} epochs of {o.get('epoch_length')} iterations, batch {d.get('batch_size')} per "
            f"process, base lr {o.get('base_lr')} ({o.get('lr_scaling')} scaling), weight decay "
            f"{o.get('weight_decay')} -> {o.get('weight_decay_end')}",
            f"- crops: 2 global of {cr.get('global_size')} px, {cr.get('local_number')} local of "
            f"{cr.get('local_size')} px; {h.get('out_dim')} prototypes; teacher temperature "
            f"{t.get('warmup_temp')} -> {t.get('temp')}, momentum {t.get('momentum')} -> {t.get('final_momentum')}",
            "",
        ]
    knn = run_knn(run_dir)
    lines += ["## Evaluation", f"- kNN top-1: {knn[0]:.2f} % ({knn[1]})" if knn else "- no kNN recorded", ""]
    usage = {
        "hf": [
            "from transformers import AutoImageProcessor, AutoModel",
            "processor = AutoImageProcessor.from_pretrained(DIR)",
            "model = AutoModel.from_pretrained(DIR)",
            "features = model(**processor(images=img, return_tensors='pt')).pooler_output",
        ],
        "timm": [
            "import timm",
            "model = timm.create_model('local-dir:' + DIR, pretrained=True)",
            "cfg = timm.data.resolve_data_config({}, model=model)",
            "features = model(timm.data.create_transform(**cfg)(img).unsqueeze(0))",
        ],
    }.get(fmt)
    if usage:
        lines += ["## Usage", "```python", *usage, "```", ""]
    lines.append(f"Exported from `{Path(source).name}`" + (f" of run `{run_dir.name}`." if run_dir else "."))
    return "\n".join(lines) + "\n"
