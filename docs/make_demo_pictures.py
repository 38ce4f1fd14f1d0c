"""Copy the pictures of a finished `make demo` run into docs/img/demo/ for the site's pipeline page.

    python docs/make_demo_pictures.py runs/demo [--n 3]

Writes (names read by docs/hooks.py DEMO_PICTURES):
  sweep.json           RUN/seeds/sweep.json (the site draws its curve)
  seeds_<id>.jpg       RUN/seeds/overlays/<id>.jpg: image | CAM | seeds | seeds + CRF
  masks_<id>.jpg       image | seeds + CRF | Masks | ground truth (train ids with a mask; needs refine/masks)
  deeplab_<id>.jpg     image | DeepLab | DeepLab + CRF | ground truth (val ids)
The panels are made with hsc_fast.eval.visualize.inspection_panel, as the pipeline makes its own.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "img" / "demo"


def _read(path: Path, mode: str = ""):
    """An RGB image (mode "RGB") or a label PNG as its indices (palette or grey, as written)."""
    if not path.is_file():
        return None
    img = Image.open(path)
    return np.asarray(img.convert(mode) if mode else img)


def _panel(image_path: Path, labels: list[Path], out: Path) -> bool:
    from hsc_fast.eval.visualize import inspection_panel, save_rgb
    image = _read(image_path, "RGB")
    found = [_read(p) for p in labels]
    if image is None or any(lab is None for lab in found):
        return False
    save_rgb(out, inspection_panel(image, None, found))
    return True


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--n", type=int, default=3, help="pictures of each kind")
    args = p.parse_args(argv)
    run, voc = args.run_dir, args.run_dir / "synth" / "VOC2012"
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "seeds" / "sweep.json", OUT / "sweep.json")
    overlays = sorted((run / "seeds" / "overlays").glob("*.jpg"))[: args.n]
    for src in overlays:
        shutil.copyfile(src, OUT / f"seeds_{src.stem}.jpg")
    made = 0
    for ov in overlays:
        key = ov.stem
        made += _panel(voc / "JPEGImages" / f"{key}.jpg",
                       [run / "seeds" / "pseudo_labels" / f"{key}.png", run / "refine" / "masks" / f"{key}.png",
                        voc / "SegmentationClass" / f"{key}.png"], OUT / f"masks_{key}.jpg")
    val = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[: args.n]
    for key in val:
        made += _panel(voc / "JPEGImages" / f"{key}.jpg",
                       [run / "deeplab" / "pred" / f"{key}.png", run / "deeplab" / "pred_crf" / f"{key}.png",
                        voc / "SegmentationClass" / f"{key}.png"], OUT / f"deeplab_{key}.jpg")
    print(f"{OUT}: sweep.json, {len(overlays)} seed overlays, {made} Masks / DeepLab panels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
