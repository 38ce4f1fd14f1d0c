"""The last stage: train DeepLab on pseudo-labels (or ground truth) and evaluate it.

    python launch/train_deeplab.py --config deeplab --run-dir runs/dl --images VOC2012 \\
        --sbd-root SBD --labels runs/seeds/pseudo_labels --train-list train_aug.txt --eval-list val.txt

Training (`train_deeplab`): DeepLab (hsc_fast.models.deeplab) wrapped in a DeepSpeed engine
exactly like CAM training (`train.ds_config`: ZeRO stage, bf16, gradient accumulation, clipping),
SGD with momentum over `deeplab.lr_groups` (the authors': conv weights 1x / biases 2x / head
weights 10x / head biases 20x, no decay on biases, BatchNorm parameters not optimised while BN
runs on batch statistics), poly decay over `deeplab.max_steps` (+1 with `poly_plus_one`), pixel
cross-entropy ignoring 255. Each rank reads its own
batches of one shared per-epoch permutation (`segmentation.epoch_batches`); a sample's
augmentation depends on (seed, epoch, index) only, so a resumed run continues bitwise (CPU,
`train.deterministic`). The run dir is the CAM run's layout: config.yaml, env.json,
metrics.csv, tb/, logs/, atomic checkpoints/step_N (`--resume auto`), final/model.pt.

Evaluation (`evaluate_deeplab`): rank r predicts ids[r::world] -- multi-scale (`deeplab.test_scales`)
+ flip, fused by `deeplab.test_fusion` (the authors: softmax of the mean logits), argmax -> RUN_DIR/pred/{id}.png (VOC palette); with `crf` the dense CRF of `deeplab.crf`
(default the DEEPLAB_TEST preset) on the same probabilities -> RUN_DIR/pred_crf/; then `hsc_fast.eval.evaluate` (confusions all-reduced)
-> RUN_DIR/eval.json (+ eval_crf.json).

Both functions join a process group the caller already made (and leave it alone) or make and
destroy their own.
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hsc_fast.classes import IGNORE_INDEX
from hsc_fast import checkpoint as ckpt
from hsc_fast import distributed as D
from hsc_fast import io
from hsc_fast.config import OptimConfig, RunConfig, run_class_set
from hsc_fast.data.loader import resolve_run_classes
from hsc_fast.engine.loop import EpochStream, StepLoop, StepResult
from hsc_fast.engine.deepspeed import build_ds_config
from hsc_fast.engine.session import training_session
from hsc_fast.errors import ConfigError, DataError, TrainingError, WeightsError
from hsc_fast.engine.runlog import RunLog
from hsc_fast.data.seg_set import (SegTrainSet, epoch_batches, missing_labels, open_image_reader, predict_probs)

PRED_DIR, PRED_CRF_DIR = "pred", "pred_crf"
EVAL_JSON, EVAL_CRF_JSON = "eval.json", "eval_crf.json"


# ----------------------------------------------------------------------------------- config
def check_deeplab_config(cfg: RunConfig) -> None:
    """Cross-field checks of the `deeplab` section (before any work)."""
    dl = cfg.deeplab
    for name in ("batch_size", "max_steps", "crop_size", "save_every"):
        if getattr(dl, name) <= 0:
            raise ConfigError(f"config key 'deeplab.{name}': must be positive, got {getattr(dl, name)}")
    if (len(dl.scale_range) != 2 or not all(isinstance(v, (int, float)) for v in dl.scale_range)
            or not 0 < dl.scale_range[0] <= dl.scale_range[1]):
        raise ConfigError(f"config key 'deeplab.scale_range': expected [min, max] with 0 < min <= max, "
                          f"got {dl.scale_range}")
    if not dl.test_scales or not all(isinstance(v, (int, float)) and v > 0 for v in dl.test_scales):
        raise ConfigError(f"config key 'deeplab.test_scales': expected positive numbers, got {dl.test_scales}")
    if len(dl.hsv_jitter) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                                          for v in dl.hsv_jitter):
        raise ConfigError(f"config key 'deeplab.hsv_jitter': expected three integers [h, s, v] in 0..255, "
                          f"got {dl.hsv_jitter}")
    from hsc_fast.crf import available_backends
    if dl.crf.backend not in available_backends():
        raise ConfigError(f"config key 'deeplab.crf.backend': {dl.crf.backend!r} is not one of "
                          f"{', '.join(available_backends())}")
    if cfg.train.keep_last <= 0 or cfg.train.max_nonfinite <= 0 or cfg.train.dist_timeout_s <= 0:
        raise ConfigError("config keys 'train.keep_last', 'train.max_nonfinite', 'train.dist_timeout_s': "
                          "must be positive")


def deeplab_ds_config(cfg: RunConfig, world_size: int, path: Optional[str] = None) -> dict:
    """The CAM engine's DeepSpeed settings with DeepLab's per-rank batch."""
    as_cam = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=cfg.deeplab.batch_size))
    return build_ds_config(as_cam, world_size, path)


def deeplab_optim_config(cfg: RunConfig) -> OptimConfig:
    """The reference recipe: plain SGD with momentum (no official CAM quirks), poly over max_steps
    (+ 1 with poly_plus_one: the authors' `(1 - itr / (max_itr + 1)) ** power`)."""
    dl = cfg.deeplab
    return OptimConfig(lr=dl.lr, weight_decay=dl.weight_decay, momentum=dl.momentum,
                       official_momentum_quirk=False, poly_power=dl.poly_power, backbone_lr_mult=dl.backbone_lr_mult,
                       poly_steps=dl.max_steps + (1 if dl.poly_plus_one else 0))


def pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored pixels (0, not NaN, for an all-ignored batch)."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


# ------------------------------------------------------------------------------------ data
class BatchStream(EpochStream):
    """Endless batches of this rank with a resumable position (epoch, batches consumed)."""
    empty_message = "the DeepLab training loader yields no batches"

    def __init__(self, dataset: SegTrainSet, batch_size: int, rank: int, world_size: int, seed: int,
                 workers: int = 0, pin_memory: bool = False, epoch: int = 0, batches_in_epoch: int = 0):
        self.dataset, self.batch_size = dataset, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.workers, self.pin_memory = workers, pin_memory
        self.epoch = epoch
        self._start_epoch(batches_in_epoch)

    def _start_epoch(self, skip: int = 0) -> None:
        batches = epoch_batches(len(self.dataset), self.batch_size, self.rank, self.world_size, self.seed, self.epoch)
        self.dataset.epoch = self.epoch  # before the iterator exists: workers copy the dataset
        # A private generator: making the iterator must not draw from the global torch RNG,
        # or a resumed run (which makes it at another moment) would diverge.
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches[skip:], num_workers=self.workers,
                                             pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(0))
        self._it = iter(loader)
        self.batches_in_epoch = skip


def build_train_set(cfg: RunConfig, images: str, labels_dir: str, train_ids: Sequence[str]) -> SegTrainSet:
    """The (image, label) dataset; every id must have an image and a label PNG (checked up front)."""
    if not train_ids:
        raise DataError("train_deeplab: the training id list is empty")
    if not Path(labels_dir).is_dir():
        raise DataError(f"labels_dir {labels_dir}: not a folder of label PNGs")
    reader = open_image_reader(images, cfg.data.sbd_root)
    no_label = missing_labels(labels_dir, train_ids)
    if no_label:
        raise DataError(f"{len(no_label)} training id(s) have no label PNG in {labels_dir}: "
                        f"e.g. '{no_label[0]}' (expected {Path(labels_dir) / (no_label[0] + '.png')})"
                        + (f"; others: {no_label[1:6]}" if len(no_label) > 1 else ""))
    no_image = reader.missing(train_ids)
    if no_image:
        raise DataError(f"{len(no_image)} training id(s) have no image in {images}: e.g. {no_image[:5]}")
    dl = cfg.deeplab
    return SegTrainSet(train_ids, reader, labels_dir, crop=dl.crop_size, scale_range=dl.scale_range,
                       flip=dl.flip, seed=cfg.train.seed, classes=run_class_set(cfg), hsv=dl.hsv_jitter,
                       interp=dl.scale_interp, placement=dl.crop_placement)


# ---------------------------------------------------------------------------------- trainer
class LabelMapLoop(StepLoop):
    """The StepLoop of a network trained on (image, label map) pairs of a SegTrainSet: DeepLab on
    pseudo-labels, AffinityNet (engine.refine) on affinity labels. A subclass sets `dataset`,
    `batch_size`, `kind` (checkpoint kind, log title) and implements `micro_losses`."""
    kind = "deeplab"
    title = "DeepLab"

    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        img = batch["img"].to(self.device, non_blocking=True)
        if self.engine_bf16:
            img = img.to(torch.bfloat16)
        return img, batch["label"].to(self.device, non_blocking=True)

    # -- checkpoints (StepLoop.save / load) -------------------------------------------------------
    def _checkpoint_extra(self) -> dict:
        return {"kind": self.kind}

    def _restore_extra(self, shared: dict, ckpt_dir: Path) -> None:
        if shared.get("kind") != self.kind:
            raise WeightsError(f"checkpoint {ckpt_dir}: not a {self.title} checkpoint (kind {shared.get('kind')!r})")

    # -- the loop (StepLoop.fit) ---------------------------------------------------------------------
    def fit(self, max_steps: int, save_every: int, resume_from: Optional[Path] = None,
            heartbeat: Optional[D.Heartbeat] = None) -> dict:
        if self.dataset is None:
            raise TrainingError(f"{type(self).__name__}.fit: no training dataset")
        return super().fit(max_steps, save_every, resume_from, heartbeat)

    def make_stream(self) -> BatchStream:
        return BatchStream(self.dataset, self.batch_size, self.info.rank, self.info.world_size,
                           self.cfg.train.seed, self.cfg.data.workers, self.device.type == "cuda",
                           self.state.epoch, self.state.batches_in_epoch)

    def _nonfinite_message(self, result: StepResult, path: Path) -> str:
        return (f"{self.title} loss was non-finite for {self.state.nonfinite_in_a_row} steps in a row (up to step "
                f"{self.state.step}); train.max_nonfinite={self.cfg.train.max_nonfinite}. The weights of the "
                f"last finite step are saved in {path}")

    def _finish(self) -> dict:
        final = self.save_final()
        D.barrier()
        return {"step": self.state.step, "nonfinite_total": self.state.nonfinite_total,
                "final_model": str(final) if final else str(self.run_dir / "final" / "model.pt")}

    def _record(self, result: StepResult, stream: BatchStream, seconds: float, heartbeat) -> None:
        st = self.state
        self._count_nonfinite(result.nonfinite, f"{self.title} loss")
        world = self.info.world_size
        local = {k: v for k, v in result.terms.items()} | {"_images": float(result.images) * world}
        glob = self._guarded(lambda: D.all_reduce_mean(local, self.device), heartbeat)
        if self.log is None:
            return
        images = glob.pop("_images")
        row = {"step": st.step, "epoch": st.epoch, "lr": result.lr, "loss": glob.pop("total"), **glob}
        self._log_step(row, images, 0, seconds)


class DeeplabTrainer(LabelMapLoop):
    """DeepLab + SGD + poly schedule in a DeepSpeed engine; steps, checkpoints, metrics."""

    def __init__(self, cfg: RunConfig, run_dir, info: D.DistInfo, dataset: Optional[SegTrainSet],
                 ds_config: Optional[dict] = None, log: Optional[RunLog] = None):
        from hsc_fast.models.deeplab import build_deeplab

        check_deeplab_config(cfg)
        self.dataset, self.batch_size = dataset, cfg.deeplab.batch_size
        self._setup(cfg, run_dir, info, ds_config if ds_config is not None else deeplab_ds_config(cfg, info.world_size),
                    log)
        model = build_deeplab(cfg.deeplab, run_class_set(cfg).num_classes)  # WeightsError without the ImageNet file
        model.to(self.device).train()       # with frozen_bn, train() freezes the backbone BatchNorm first
        self._wrap_engine(model, deeplab_optim_config(cfg))
        self.autocast = bool(cfg.train.bf16_autocast and self.device.type == "cuda" and not self.engine_bf16)
        self._seed_rank_streams()  # v3 dropout

    def batch_loss(self, batch: dict) -> torch.Tensor:
        img, label = self._to_device(batch)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()
        with amp:
            logits = self.engine(img)
        return pixel_cross_entropy(logits, label)

    def micro_losses(self, raw: dict, step_no: int, last: bool) -> tuple[dict, int]:
        """The pixel cross-entropy of one micro-batch (StepLoop.train_step: the non-finite guard)."""
        return {"total": self.batch_loss(raw)}, int(raw["img"].shape[0])


# ------------------------------------------------------------------------------- public API
def train_deeplab(cfg: RunConfig, run_dir, *, images: str, labels_dir: str, train_ids: Sequence[str],
                  resume: str = "auto", progress: bool = True, ds_config_path: Optional[str] = None,
                  local_rank: Optional[int] = None) -> dict:
    """Train DeepLab on `labels_dir`/{id}.png for `train_ids`, images from a VOC root (+
    cfg.data.sbd_root) or a shard index. Joins an existing process group or makes its own.
    Returns {"step", "nonfinite_total", "final_model"}."""
    check_deeplab_config(cfg)
    resolve_run_classes(cfg, images)  # DeepLab outputs K+1 classes of the images' set
    run_dir = Path(run_dir)
    env = dict(stage="deeplab", images=str(images), labels_dir=str(labels_dir), n_train_ids=len(train_ids))
    with training_session(cfg, run_dir, stage="deeplab", resume=resume, max_steps=cfg.deeplab.max_steps,
                          ds_config=lambda world: deeplab_ds_config(cfg, world, ds_config_path),
                          local_rank=local_rank, progress=progress, env=env, title="DeepLab ") as session:
        dataset = build_train_set(cfg, images, labels_dir, train_ids)
        return session.run(lambda s: DeeplabTrainer(cfg, run_dir, s.info, dataset, s.ds_config, s.log),
                           cfg.deeplab.save_every)


def resolve_model_file(run_dir, checkpoint: Optional[str]) -> tuple[Path, str]:
    """(file, key) of the weights to evaluate: `checkpoint` may be a final/model.pt-style state
    dict file, a checkpoints/step_N folder, or a run dir; default RUN_DIR/final/model.pt, else the
    newest complete checkpoint of RUN_DIR. key is "" for a plain state dict, else "model"."""
    target = Path(checkpoint) if checkpoint else Path(run_dir)
    if target.is_file():
        return target, ""
    if (target / ckpt.SHARED_FILE).is_file():
        if not ckpt.is_complete(target):
            raise WeightsError(f"checkpoint {target}: incomplete (no {ckpt.COMPLETE_MARKER} marker)")
        return target / ckpt.SHARED_FILE, "model"
    final = target / "final" / "model.pt"
    if final.is_file():
        return final, ""
    latest = ckpt.find_latest(target)
    if latest is not None:
        return latest / ckpt.SHARED_FILE, "model"
    raise WeightsError(f"no DeepLab weights at {target}: expected a model.pt file, a checkpoints/step_N folder, "
                       "or a run dir with final/model.pt or a complete checkpoint")


def load_deeplab_for_eval(cfg: RunConfig, run_dir, checkpoint: Optional[str], device) -> torch.nn.Module:
    """The trained network (no ImageNet file needed: every weight comes from the checkpoint)."""
    from hsc_fast.models.deeplab import deeplab_from_config
    path, key = resolve_model_file(run_dir, checkpoint)
    state = ckpt.safe_load(path)
    if key:
        state = state.get(key) if isinstance(state, dict) else None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict{f' under {key!r}' if key else ''}")
    model = deeplab_from_config(cfg.deeplab, run_class_set(cfg).num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsError(f"{path}: does not fit DeepLab(deeplab.backbone={cfg.deeplab.backbone!r}, "
                           f"deeplab.head={cfg.deeplab.head!r}): {str(e)[:400]}") from e
    return model.to(device).eval()


def _write_png_atomic(path: Path, label: np.ndarray, classes=None) -> None:
    from hsc_fast.classes import VOC
    from hsc_fast.data.voc import encode_label_png
    io.atomic_write_bytes(path, encode_label_png(label, classes or VOC))


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled or None)


def predict_to_pngs(model: torch.nn.Module, read_image: Callable[[str], np.ndarray], ids: Sequence[str],
                    out_dir, *, scales: Sequence[float], flip: bool = True, device="cpu",
                    crf_dir=None, crf_backend: str = "pydensecrf", crf_params: Optional[dict] = None,
                    crf_workers: int = 1, progress: bool = False, classes=None, predict_kw: Optional[dict] = None,
                    crf_image_mode: str = "original") -> int:
    """Predict `ids` (all of them: split ids before calling) into palette PNGs in `out_dir`; with
    `crf_dir` also the dense-CRF labels there (`crf_params`: deeplab.crf.params(), default the
    DEEPLAB_TEST preset) on `crf_image(img, crf_image_mode)`. `predict_kw`: predict_probs keywords
    (fusion, resize, align_corners, amp; `predict_options(cfg)`). Returns the number of images."""
    from hsc_fast.data.seg_set import crf_image
    from hsc_fast.crf import DEEPLAB_TEST, CrfParams, crf_imap
    crf_kwargs = CrfParams(**crf_params).kwargs() if crf_params is not None else DEEPLAB_TEST.kwargs()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = _bar(len(ids), "predict", progress)

    def predicted():
        for key in ids:
            img = read_image(key)
            probs = predict_probs(model, img, scales=scales, flip=flip, device=device, **(predict_kw or {}))
            _write_png_atomic(out_dir / f"{key}.png", probs.argmax(0).to(torch.uint8).numpy(), classes)
            bar.update(1)
            yield key, crf_image(img, crf_image_mode) if crf_dir is not None else img, probs.numpy()

    n = 0
    if crf_dir is None:
        for _ in predicted():
            n += 1
    else:
        crf_dir = Path(crf_dir)
        crf_dir.mkdir(parents=True, exist_ok=True)
        keys: list[str] = []

        def pairs():
            for key, img, probs in predicted():
                keys.append(key)
                yield img, probs

        for q in crf_imap(pairs(), workers=max(1, crf_workers), backend=crf_backend, return_labels=True,
                          **crf_kwargs):
            _write_png_atomic(crf_dir / f"{keys[n]}.png", q.astype(np.uint8), classes)
            n += 1
    bar.close()
    return n


def predict_options(cfg: RunConfig) -> dict:
    """The predict_probs keywords of `deeplab.*` (test_fusion, test_resize, align_corners, test_bf16)."""
    dl = cfg.deeplab
    return {"fusion": dl.test_fusion, "resize": dl.test_resize, "align_corners": dl.align_corners,
            "amp": dl.test_bf16}


def evaluate_deeplab(cfg: RunConfig, run_dir, *, images: str, gt_dir: str, eval_ids: Sequence[str],
                     checkpoint: Optional[str] = None, crf: bool = False, progress: bool = False,
                     local_rank: Optional[int] = None) -> dict:
    """Predict `eval_ids` (ranks split them) into RUN_DIR/pred (+ pred_crf) and score them against
    `gt_dir`. Returns {"plain": evaluate() result, "crf": evaluate() result or None}; rank 0
    writes RUN_DIR/eval.json (+ eval_crf.json)."""
    from hsc_fast.eval.evaluate import evaluate, format_table, write_outputs
    check_deeplab_config(cfg)
    if not eval_ids:
        raise DataError("evaluate_deeplab: the evaluation id list is empty")
    if not Path(gt_dir).is_dir():
        raise DataError(f"gt_dir {gt_dir}: not a folder of ground-truth PNGs")
    run_dir = Path(run_dir)
    classes = resolve_run_classes(cfg, images)
    info = D.init_distributed(cfg.train.dist_timeout_s, local_rank_arg=local_rank, use_deepspeed=False)
    try:
        model = load_deeplab_for_eval(cfg, run_dir, checkpoint, info.device)
        reader = open_image_reader(images, cfg.data.sbd_root)
        pred_dir, crf_dir = run_dir / PRED_DIR, (run_dir / PRED_CRF_DIR if crf else None)
        mine = list(eval_ids)[info.rank::info.world_size]
        predict_to_pngs(model, reader, mine, pred_dir, scales=cfg.deeplab.test_scales, flip=cfg.deeplab.test_flip,
                        device=info.device, crf_dir=crf_dir, crf_backend=cfg.deeplab.crf.backend,
                        crf_params=cfg.deeplab.crf.params(), crf_workers=max(1, cfg.data.workers),
                        progress=progress and info.is_main, classes=classes, predict_kw=predict_options(cfg),
                        crf_image_mode=cfg.deeplab.crf_image)
        D.barrier()  # every prediction is on disk before anyone scores
        results = {"plain": evaluate(gt_dir, pred_dir=pred_dir, ids=list(eval_ids), classes=classes), "crf": None}
        if crf:
            results["crf"] = evaluate(gt_dir, pred_dir=crf_dir, ids=list(eval_ids), classes=classes)
        if info.is_main:
            write_outputs(results["plain"], run_dir / EVAL_JSON)
            if crf:
                write_outputs(results["crf"], run_dir / EVAL_CRF_JSON)
            if progress:
                print(format_table(results["plain"]))
                if crf:
                    print(f"with CRF: mIoU {results['crf']['miou']:.2f}")
        return results
    finally:
        D.shutdown(info)
