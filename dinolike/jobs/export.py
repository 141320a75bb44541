"""The export job: ship a backbone to another ecosystem (`dinolike export CKPT --format F --out DIR`).

CKPT is anything `read_backbone` accepts (training checkpoint, exported backbone, official hub file or
teacher checkpoint, HF / timm directory). The weights are first loaded strictly into a dinolike model, so
a broken file fails here with the offending keys named, not later inside someone else's library.

Outputs in DIR:
  official  backbone.pth (plain state dict, official keys; loads into the official `vit_*` with strict=True)
            + backbone.pth.json (explicit architecture, read back by dinolike tools)
  hf        config.json + model.safetensors + preprocessor_config.json
            -> transformers.AutoModel / AutoImageProcessor.from_pretrained(DIR)
            (Dinov2WithRegistersModel for register models)
  timm      config.json + model.safetensors  -> timm.create_model("local-dir:DIR", pretrained=True);
            its pretrained_cfg (mean/std, input size) feeds timm.data.resolve_data_config
Every format also gets README.md, a model card (architecture, data, recipe, the run's kNN). The
preprocessing numbers come from the run's config (inside a training checkpoint, or the config.yaml of the
run folder the file lies in); files are written readable by all (mode 644).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from dinolike.errors import CollapsedBackboneError
from dinolike.interop.common import at_eval_grid, describe_backbone

FORMATS = ("official", "hf", "timm")


def _interpolation_note(cfg: dict[str, Any], fmt: str, crop: int) -> str | None:
    """Other libraries resize positions their own way; say when that differs from this model's way."""
    if fmt == "official":
        return None
    target_aa = True if fmt == "timm" else bool(cfg["n_registers"])
    if cfg["interpolate_offset"] != 0.0 or cfg["interpolate_antialias"] != target_aa:
        return (
            f"note: {fmt} resizes position embeddings to the exact grid (antialias={target_aa}); this model "
            f"uses offset={cfg['interpolate_offset']}, antialias={cfg['interpolate_antialias']}: "
            f"tokens agree at {crop} px (the run's evaluation size, whose grid the export stores) and differ "
            "slightly at other sizes"
        )
    return None


def export(ckpt: str | Path, fmt: str, out: str | Path, which: str = "teacher", allow_collapsed: bool = False) -> Path:
    """Convert `ckpt` into `fmt` under `out`; returns the directory. Raises CheckpointMismatchError
    (InteropError) with a readable message on bad input, and CollapsedBackboneError for a backbone whose
    CLS embedding is the same for every probe image (unless `allow_collapsed`: the model card says so)."""
    from dinolike.eval.spread import CONSTANT_COSINE, backbone_cls_cosine
    from dinolike.interop import hf, timm
    from dinolike.interop.official import read_backbone_with_cfg
    from dinolike.interop.run_info import find_run_config, model_card, preprocessing
    from dinolike.models import build_backbone, load_state_strict
    from dinolike.training.export import export_backbone

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use {', '.join(FORMATS)}")
    state, cfg = read_backbone_with_cfg(ckpt, which)
    model = build_backbone(cfg, drop_path=False)
    load_state_strict(model, state, what=f"backbone in {ckpt}")
    explicit = describe_backbone(model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out = Path(out)
    run_cfg, run_dir = find_run_config(ckpt)
    prep = preprocessing(run_cfg, explicit)
    cosine = backbone_cls_cosine(model, int(explicit.get("in_chans", 3)), prep.crop)
    collapsed = cosine if cosine >= CONSTANT_COSINE else None
    if collapsed is not None and not allow_collapsed:
        raise CollapsedBackboneError(
            f"refusing to export {ckpt}: it gives every input the same CLS embedding (mean cosine {cosine:.5f} "
            "over 32 probe images), so it has collapsed or never learned (e.g. LayerScale 1e-5 in a short run); "
            "--allow-collapsed exports it anyway, marked so in its model card")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused export leaves no empty folder behind
    if fmt == "official":
        export_backbone(model, explicit, out / "backbone.pth")
    elif fmt == "hf":
        hf.save_hf(out, *at_eval_grid(state, explicit, prep.crop), prep)
    else:
        timm.save_timm(out, *at_eval_grid(state, explicit, prep.crop), prep)
    (out / "README.md").write_text(model_card(fmt, explicit, prep, run_cfg, run_dir, str(ckpt), collapsed))
    for f in out.iterdir():  # temp-file writers create 600 files; an export is meant to be shared
        if f.is_file() and not f.name.startswith("."):
            f.chmod(0o644)
    note = _interpolation_note(explicit, fmt, prep.crop)
    if note:
        print(note, file=sys.stderr)
    return out
