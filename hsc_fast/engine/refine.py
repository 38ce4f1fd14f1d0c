"""Pipeline stage ``refine`` (``refine.method: psa``): seeds -> "Masks" with PSA's AffinityNet
(Ahn & Kwak, CVPR 2018), the third column of the HSC paper's Table 1.

1. **Affinity labels** (``make_affinity_labels``): per training image, the CAMs through the dense
   CRF with a low and a high background alpha (``refine.alpha_low`` / ``alpha_high``; auto: PSA's
   4 / 32 scaled by the seed CRF's alpha over the authors' 7, ``affinity_alphas``): confident
   foreground, confident background, the rest 255 (hsc_fast.eval.affinity_labels) ->
   ``RUN/refine/aff_labels/{id}.png`` (``refine.label_pooling: vote``) or both score maps
   ``{id}.npz`` (``scores``, PSA: pooled 8x8 after the crop, then the rule).
2. **AffinityNet** (``train_affinity``): the CAM network's backbone (its trained weights) with the
   affinity head (hsc_fast.models.affinity), trained on pixel pairs within ``refine.radius`` at
   stride 8 (``refine.pairs``: PSA's subset or every in-image pair) with PSA's balanced loss, on
   hsc_fast.engine.affinity_data samples (jitter, crop, padding, label pooling: ``refine.*``), in
   the same DeepSpeed step loop as CAM and DeepLab training (non-finite guard, checkpoints,
   resume, metrics) -> ``RUN/refine/affinity/``.
3. **Random walk** (``random_walk_masks``): each image's CAMs at feature resolution, background
   (1 - max fg)^``bg_alpha``, propagated 2^``logt`` steps with the transition of the learned
   affinities raised to ``beta`` (hsc_fast.ops.random_walk: banded, batched on the device),
   upsampled, argmax -> ``RUN/refine/masks/{id}.png``, DeepLab's training labels. PSA's walk also
   pads the image to a multiple of 8 (``refine.walk_pad8``) and uses its training pair subset.

PSA's recipe is ``refine.pairs: psa_crop``, ``label_pooling: scores``, ``crop_pad: black``,
``walk_pad8: true``, ``scale_range: [1, 1]``, ``color_jitter: [0.3, 0.3, 0.3, 0.1]``,
``momentum_quirk: true``, ``weight_decay: 5e-4``, ``epochs: 8``, ``loss_reduction: batch``,
``init: imagenet`` (configs/hsc_eps_official.yaml);
SEAM's copy differs in lr 0.01, alpha_high 24, bg_alpha 6, logt 6 (configs/seam.yaml).

Every step is resumable: finished PNGs are skipped, training resumes from its checkpoints; ranks
split the ids of steps 1 and 3 (ids[r::W]).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from hsc_fast import checkpoint as ckpt
from hsc_fast import distributed as D
from hsc_fast import io
from hsc_fast.config import OptimConfig, RunConfig, run_class_set
from hsc_fast.engine.deeplab_trainer import LabelMapLoop, deeplab_ds_config
from hsc_fast.engine.runlog import RunLog
from hsc_fast.engine.session import training_session
from hsc_fast.errors import ConfigError, DataError, WeightsError

AFF_LABELS, AFFINITY, MASKS = "aff_labels", "affinity", "masks"
FEATURE_STRIDE = 8


def check_refine_config(cfg: RunConfig) -> None:
    r = cfg.refine
    for name in ("radius", "feat_dim", "batch_size", "crop_size", "max_steps", "save_every"):
        if getattr(r, name) <= 0:
            raise ConfigError(f"config key 'refine.{name}': must be positive, got {getattr(r, name)}")
    for name in ("alpha_low", "alpha_high"):
        value = getattr(r, name)
        if isinstance(value, str) and value != "auto" or not isinstance(value, str) and value <= 0:
            raise ConfigError(f"config key 'refine.{name}': expected a number > 0 or 'auto', got {value!r}")
    if not isinstance(r.alpha_low, str) and not isinstance(r.alpha_high, str) and not r.alpha_low < r.alpha_high:
        raise ConfigError(f"config keys 'refine.alpha_low' / 'refine.alpha_high': expected low < high, got "
                          f"{r.alpha_low} / {r.alpha_high}")
    if r.logt < 0 or r.beta <= 0:
        raise ConfigError("config keys 'refine.logt' >= 0 and 'refine.beta' > 0 expected")
    if isinstance(r.bg_alpha, str) and r.bg_alpha != "auto" or not isinstance(r.bg_alpha, str) and r.bg_alpha <= 0:
        raise ConfigError(f"config key 'refine.bg_alpha': expected a number > 0 or 'auto', got {r.bg_alpha!r}")
    if len(r.scale_range) != 2 or not 0 < r.scale_range[0] <= r.scale_range[1]:
        raise ConfigError(f"config key 'refine.scale_range': expected [min, max] with 0 < min <= max, got {r.scale_range}")
    if len(r.color_jitter) not in (0, 4) or any(v < 0 for v in r.color_jitter):
        raise ConfigError(f"config key 'refine.color_jitter': expected [] or four values >= 0, got {r.color_jitter}")
    grid, floor = -(-r.crop_size // FEATURE_STRIDE), r.radius - 1
    if r.pairs == "psa_crop" and grid <= 2 * floor:   # PSA's first ends: columns [floor, grid - floor)
        raise ConfigError(f"config key 'refine.crop_size': {r.crop_size} px is a {grid}x{grid} grid, where PSA's pair "
                          f"subset (refine.pairs: psa_crop, radius {r.radius}) is empty; use a crop of at least "
                          f"{FEATURE_STRIDE * (2 * floor + 1)} px or refine.pairs: all")
    if r.epochs < 0 or r.momentum < 0 or r.weight_decay < 0:
        raise ConfigError("config keys 'refine.epochs', 'refine.momentum', 'refine.weight_decay': expected >= 0")


PSA_ALPHAS = (4.0, 32.0)      # PSA's la / ha, paired with the authors' seed CRF alpha 7
PSA_WALK_ALPHA = 16.0         # PSA's random-walk background alpha, likewise
AUTHORS_CRF_ALPHA = 7.0


def seed_crf_alpha(cfg: RunConfig, seeds_dir=None) -> float:
    """The seed CRF's alpha as used: seeds_dir/crf_params.json (alpha auto resolved by the
    sweep), else a numeric seeds.crf.alpha, else the authors' 7."""
    import json
    made = Path(seeds_dir) / "crf_params.json" if seeds_dir else None
    if made is not None and made.is_file():
        return float(json.loads(made.read_text())["alpha"])
    return float(cfg.seeds.crf.alpha) if not isinstance(cfg.seeds.crf.alpha, str) else AUTHORS_CRF_ALPHA


def affinity_alphas(cfg: RunConfig, crf_alpha: float) -> tuple[float, float]:
    """(low, high) background alphas of the affinity labels. auto keeps PSA's ratios to the seed
    CRF's alpha (4/7 and 32/7: PSA's 4 and 32 when the seeds use the authors' 7). Measured on the
    demo's CAMs (seed alpha swept to 2): PSA's fixed 4 / 32 label 41 % of the pixels foreground
    at 27 % precision and 10 % background; auto (1.14 / 9.1) gives 19 % at 45 % and 38 % at 99.6 %."""
    out = []
    for value, psa in zip((cfg.refine.alpha_low, cfg.refine.alpha_high), PSA_ALPHAS):
        out.append(psa * crf_alpha / AUTHORS_CRF_ALPHA if value == "auto" else float(value))
    if not out[0] < out[1]:
        raise ConfigError(f"refine.alpha_low / alpha_high resolve to {out[0]:g} / {out[1]:g}: expected low < high")
    return out[0], out[1]


def walk_bg_alpha(cfg: RunConfig, crf_alpha: float) -> float:
    """The random walk's background alpha; auto: PSA's 16 x seed alpha / 7. Measured on the demo
    (60 evaluation images, the same AffinityNet): PSA's 16 gives Masks 20.6 mIoU, auto (4.57) 30.3."""
    value = cfg.refine.bg_alpha
    return PSA_WALK_ALPHA * crf_alpha / AUTHORS_CRF_ALPHA if value == "auto" else float(value)


def refine_backbone(cfg: RunConfig) -> str:
    return cfg.refine.backbone or cfg.model.backbone


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled or None)


def _write_png(path: Path, label: np.ndarray, classes) -> None:
    from hsc_fast.data.voc import encode_label_png
    io.atomic_write_bytes(path, encode_label_png(np.asarray(label, np.uint8), classes))


# --------------------------------------------------------------------------- 1. affinity labels
def make_affinity_labels(cfg: RunConfig, data: str, cam_dir, out_dir, ids: Sequence[str], *, workers: int = 0,
                         progress: bool = False, crf_alpha: Optional[float] = None) -> int:
    """RUN/refine/aff_labels/{id}.png for this rank's share of `ids` (existing files skipped);
    `crf_alpha`: the seed CRF's alpha (default: seed_crf_alpha beside `cam_dir`)."""
    low, high = affinity_alphas(cfg, seed_crf_alpha(cfg, Path(cam_dir).parent) if crf_alpha is None else crf_alpha)
    from hsc_fast.engine.affinity_data import SCORES_EXT
    from hsc_fast.eval.seeds import _read_cams_for, open_samples, pending_ids, split_ids
    scores = cfg.refine.label_pooling == "scores"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = pending_ids(split_ids(list(ids), D.get_rank(), D.world_size()),
                       [(out_dir, (SCORES_EXT if scores else "png",))])
    bar = _bar(len(todo), "affinity labels", progress)
    n = 0
    for s in open_samples(data, todo, workers=workers):
        keys, cams = _read_cams_for(cam_dir, s, classes=run_class_set(cfg))
        _write_affinity_target(cfg, out_dir, s.key, s.image, cams, keys, low, high)
        n += 1
        bar.update(1)
    bar.close()
    D.barrier()
    return n


def _write_affinity_target(cfg: RunConfig, out_dir: Path, key: str, image, cams, keys, low: float, high: float):
    """PSA's CRF (10 iterations, 3/3 + 80/13/10) at image resolution; 'scores': both score maps
    ({key}.npz, pooled after the crop as PSA), 'vote': the stride-1 label ({key}.png)."""
    from hsc_fast.eval.affinity_labels import _check_cams, affinity_crf_scores, affinity_label_from_scores
    cams, keys = _check_cams(cams, keys, run_class_set(cfg))
    maps = [affinity_crf_scores(image, cams, a, backend=cfg.seeds.crf.backend) for a in (low, high)]
    if cfg.refine.label_pooling == "scores":
        from hsc_fast.engine.affinity_data import SCORES_EXT, save_affinity_scores
        save_affinity_scores(out_dir / f"{key}.{SCORES_EXT}", maps[0], maps[1], keys)
    else:
        _write_png(out_dir / f"{key}.png", affinity_label_from_scores(maps[0], maps[1], keys), run_class_set(cfg))


# ------------------------------------------------------------------------------ 2. AffinityNet
def planned_world_size() -> int:
    """The ranks of the process group, or of the one about to be made (the launcher's WORLD_SIZE)."""
    import os
    return D.world_size() if torch.distributed.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def affinity_steps(cfg: RunConfig, n_train: int, world_size: int = 1) -> int:
    """refine.max_steps, or with refine.epochs > 0 PSA's len(train) // batch x epochs (drop_last), the
    global batch being refine.batch_size x ranks: 10,582 // 8 x 8 = 10,576 for train_aug on one GPU."""
    r = cfg.refine
    if r.epochs <= 0:
        return r.max_steps
    steps = n_train // (r.batch_size * world_size) * r.epochs
    if steps <= 0:
        raise ConfigError(f"refine.epochs {r.epochs}: {n_train} training ids make no full batch of "
                          f"{r.batch_size} x {world_size} ranks")
    return steps


def affinity_optim_config(cfg: RunConfig, steps: Optional[int] = None) -> OptimConfig:
    """SGD with the 1x/2x/10x/20x groups (weight decay on weights only), poly 0.9 over `steps`
    (default refine.max_steps). refine.momentum_quirk: PSA's momentum = the weight-decay value."""
    r = cfg.refine
    return OptimConfig(lr=r.lr, weight_decay=r.weight_decay, momentum=r.momentum,
                       official_momentum_quirk=r.momentum_quirk, poly_power=0.9, backbone_lr_mult=r.backbone_lr_mult,
                       poly_steps=r.max_steps if steps is None else steps)


def affinity_init_state(cfg: RunConfig, cam_run) -> dict:
    """The backbone AffinityNet starts from: the CAM run's (refine.init: cam) or the ImageNet
    weights of model.weights (imagenet: PSA's and SEAM's train_aff.py)."""
    if cfg.refine.init == "cam":
        return cam_backbone_state(cam_run)
    if refine_backbone(cfg) != cfg.model.backbone:
        raise ConfigError(f"refine.init imagenet loads model.weights ({cfg.model.backbone}); refine.backbone "
                          f"{cfg.refine.backbone!r} differs")
    from hsc_fast.models import build_cam_model
    return build_cam_model(cfg.model, load_weights=True).state_dict()


def cam_backbone_state(cam_run) -> dict:
    """The trained CAM network's state dict (RUN/cam/final/model.pt or its newest checkpoint)."""
    from hsc_fast.engine.deeplab_trainer import resolve_model_file
    path, key = resolve_model_file(cam_run, None)
    state = ckpt.safe_load(path)
    state = state.get(key) if key else state
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected the CAM network's state dict")
    return state


class AffinityTrainer(LabelMapLoop):
    """AffinityNet + SGD + poly schedule in a DeepSpeed engine, on (image, affinity label) pairs."""
    kind = "affinity"
    title = "AffinityNet"

    def __init__(self, cfg: RunConfig, run_dir, info: D.DistInfo, dataset, init_state: Optional[dict],
                 ds_config: Optional[dict] = None, log: Optional[RunLog] = None, steps: Optional[int] = None):
        from hsc_fast.models.affinity import build_affinity_net
        check_refine_config(cfg)
        self.dataset, self.batch_size = dataset, cfg.refine.batch_size
        self._setup(cfg, run_dir, info, ds_config if ds_config is not None else
                    affinity_ds_config(cfg, info.world_size), log)
        model = build_affinity_net(refine_backbone(cfg), width_div=cfg.model.width_div, feat_dim=cfg.refine.feat_dim,
                                   weights_state_dict=init_state)
        model.to(self.device).train()
        self._wrap_engine(model, affinity_optim_config(cfg, steps))
        self._seed_rank_streams()

    def micro_losses(self, raw: dict, step_no: int, last: bool) -> tuple[dict, int]:
        """PSA's balanced pair loss of one micro-batch: bg-pos/4 + fg-pos/4 + neg/2."""
        from hsc_fast.losses.affinity import affinity_loss, affinity_targets, downsample_labels
        from hsc_fast.ops.random_walk import pairwise_affinity
        r = self.cfg.refine
        img, label = self._to_device(raw)
        feats = self.engine(img).float()
        if r.label_pooling == "vote":   # stride-1 labels: the most frequent per 8x8; 'scores' come pooled
            label = downsample_labels(label, tuple(feats.shape[-2:]), stride=FEATURE_STRIDE)
        crop = r.pairs == "psa_crop"
        targets = affinity_targets(label, r.radius, psa_crop=crop)
        total, parts = affinity_loss(pairwise_affinity(feats, r.radius, psa_crop=crop), targets,
                                     count_scale=self._global_count_scale(targets))
        terms = {k: v for k, v in parts.items() if not k.endswith("_count")}   # bg, fg, neg
        return {**terms, "total": total}, int(img.shape[0])

    def _global_count_scale(self, targets) -> Optional[list]:
        """loss_reduction 'batch' on several ranks: per part, W x (this rank's pair count) / (all ranks'),
        so the ranks' mean of the rank-local means is the mean over the whole global batch."""
        world = self.info.world_size
        if self.cfg.refine.loss_reduction != "batch" or world == 1:
            return None
        from hsc_fast.losses.affinity import global_count_scale
        local = torch.stack([m.sum() for m in targets]).double()
        total = local.clone()
        torch.distributed.all_reduce(total)
        return global_count_scale(local.tolist(), total.tolist(), world)


def affinity_ds_config(cfg: RunConfig, world_size: int, path: Optional[str] = None) -> dict:
    import dataclasses
    as_dl = dataclasses.replace(cfg, deeplab=dataclasses.replace(cfg.deeplab, batch_size=cfg.refine.batch_size))
    return deeplab_ds_config(as_dl, world_size, path)


def build_affinity_train_set(cfg: RunConfig, images: str, labels_dir, train_ids: Sequence[str]):
    from hsc_fast.data.seg_set import open_image_reader
    from hsc_fast.engine.affinity_data import AffinityTrainSet
    r = cfg.refine
    dataset = AffinityTrainSet(train_ids, open_image_reader(images, cfg.data.sbd_root), labels_dir, crop=r.crop_size,
                               scale_range=r.scale_range, flip=True, color_jitter=r.color_jitter,
                               crop_pad=r.crop_pad, label_pooling=r.label_pooling, seed=cfg.train.seed,
                               classes=run_class_set(cfg))
    missing = [k for k in train_ids if not dataset.target_path(k).is_file()]
    if missing:
        raise DataError(f"{len(missing)} training id(s) have no affinity label ({r.label_pooling}) in {labels_dir}: "
                        f"e.g. {missing[:5]}")
    return dataset


def train_affinity(cfg: RunConfig, run_dir, *, images: str, labels_dir, train_ids: Sequence[str], cam_run,
                   resume: str = "auto", progress: bool = True, local_rank: Optional[int] = None) -> dict:
    """Train AffinityNet from the CAM run's backbone; joins an existing process group or makes one."""
    check_refine_config(cfg)
    init_state = affinity_init_state(cfg, cam_run)
    steps = affinity_steps(cfg, len(train_ids), planned_world_size())
    env = {"stage": "affinity", "images": str(images), "labels_dir": str(labels_dir), "n_train_ids": len(train_ids),
           "steps": steps}
    with training_session(cfg, Path(run_dir), stage="affinity", resume=resume, max_steps=steps,
                          ds_config=lambda world: affinity_ds_config(cfg, world), local_rank=local_rank,
                          progress=progress, env=env, title="AffinityNet ") as session:
        dataset = build_affinity_train_set(cfg, images, labels_dir, train_ids)
        return session.run(lambda s: AffinityTrainer(cfg, run_dir, s.info, dataset, init_state, s.ds_config, s.log,
                                                     steps), cfg.refine.save_every)


def load_affinity_net(cfg: RunConfig, run_dir, device) -> torch.nn.Module:
    from hsc_fast.engine.deeplab_trainer import resolve_model_file
    from hsc_fast.models.affinity import build_affinity_net
    path, key = resolve_model_file(run_dir, None)
    state = ckpt.safe_load(path)
    state = state.get(key) if key else state
    model = build_affinity_net(refine_backbone(cfg), width_div=cfg.model.width_div, feat_dim=cfg.refine.feat_dim)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise WeightsError(f"{path}: does not fit AffinityNet({refine_backbone(cfg)}): {str(e)[:300]}") from e
    return model.to(device).eval()


# ------------------------------------------------------------------------------ 3. random walk
@torch.no_grad()
def walk_one(model: torch.nn.Module, image: np.ndarray, keys: np.ndarray, cams: np.ndarray, cfg: RunConfig,
             device, bg_alpha: Optional[float] = None) -> np.ndarray:
    """uint8 (H, W) VOC labels: the CAMs (with PSA's background) propagated by the random walk
    on the image's learned affinities, upsampled to the image, argmax."""
    from hsc_fast.data.seg_set import normalize_image
    from hsc_fast.ops.random_walk import pairwise_affinity, random_walk_cams
    h, w = image.shape[:2]
    if len(keys) == 0:
        return np.zeros((h, w), np.uint8)
    x = normalize_image(image).unsqueeze(0)
    if cfg.refine.walk_pad8:   # infer_aff.py: 0 after normalisation up to a multiple of the stride
        x = torch.nn.functional.pad(x, (0, -w % FEATURE_STRIDE, 0, -h % FEATURE_STRIDE))
    feats = model(x.to(device)).float()
    cam = torch.from_numpy(np.asarray(cams, np.float32)).unsqueeze(0).to(device)      # (1, K, H, W)
    if bg_alpha is None:
        bg_alpha = walk_bg_alpha(cfg, seed_crf_alpha(cfg))
    affinity = pairwise_affinity(feats, cfg.refine.radius, psa_crop=cfg.refine.pairs == "psa_crop")
    walked = random_walk_cams(cam, affinity, alpha=bg_alpha, beta=cfg.refine.beta, logt=cfg.refine.logt,
                              stride=FEATURE_STRIDE)[0]
    voc_ids = np.concatenate([[0], np.asarray(keys, np.int64) + 1]).astype(np.uint8)   # bg first
    return voc_ids[walked.argmax(0).cpu().numpy()]


def random_walk_masks(cfg: RunConfig, model: torch.nn.Module, data: str, cam_dir, out_dir, ids: Sequence[str], *,
                      device, workers: int = 0, progress: bool = False, crf_alpha: Optional[float] = None) -> int:
    """RUN/refine/masks/{id}.png for this rank's share of `ids` (existing files skipped);
    `crf_alpha`: the seed CRF's alpha (default: seed_crf_alpha beside `cam_dir`)."""
    bg_alpha = walk_bg_alpha(cfg, seed_crf_alpha(cfg, Path(cam_dir).parent) if crf_alpha is None else crf_alpha)
    from hsc_fast.eval.seeds import _read_cams_for, open_samples, pending_ids, split_ids
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = pending_ids(split_ids(list(ids), D.get_rank(), D.world_size()), [(out_dir, ("png",))])
    bar = _bar(len(todo), "random walk", progress)
    n = 0
    for s in open_samples(data, todo, workers=workers):
        keys, cams = _read_cams_for(cam_dir, s, classes=run_class_set(cfg))
        _write_png(out_dir / f"{s.key}.png", walk_one(model, s.image, keys, cams, cfg, device, bg_alpha), run_class_set(cfg))
        n += 1
        bar.update(1)
    bar.close()
    D.barrier()
    return n
