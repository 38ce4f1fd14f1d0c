"""The CAM training loop (HSC and its baselines) on top of a DeepSpeed engine.

One optimiser step = `gradient_accumulation_steps` micro-steps (from the DeepSpeed JSON). Each
micro-step: a batch of view-1 crops from `hsc_fast.data.build_train_loader`; view 2 made on the
device (`make_view2`); both views through the same network; the method losses
(`hsc_fast.losses.method_losses`, which runs the in-training CRF through `crf_fn` and combines
batch-wide statistics across ranks through a `DistContext`) -> `engine.backward`. Prototype banks
(`PrototypeBanks`) are chained through the micro-steps and committed only if the whole step was
finite; they stay identical on every rank because their updates use global statistics only.

Faults:
  * non-finite loss on any rank (agreed by one all-reduce): the step is skipped on every rank --
    DeepSpeed still runs `engine.step()` (counters, zero_grad, schedule) but the optimizer's
    `skip_next` makes it a no-op and the banks are not updated. `train.max_nonfinite` skipped
    steps in a row -> checkpoint + `TrainingError`. Test hook: HSC_FAULT_NAN_STEPS="3,4" makes
    the loss of those steps NaN (1-based step numbers as in metrics.csv; HSC_FAULT_NAN_RANK=r
    restricts it to one rank).
  * a dead rank: a failed collective or the heartbeat monitor (`distributed.Heartbeat`) ends
    every survivor within `train.dist_timeout_s` naming the lost rank (`RankLostError`).
  * bad samples: skipped by the loader, counted (its SkipCounter) in metrics.csv, never fatal.

Resume: `--resume auto|PATH` restores model, optimizer (incl. momentum), schedule, banks, RNG of
every rank and the data position; with `train.deterministic` on CPU the continued run is bitwise
equal to an uninterrupted one.
"""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from hsc_fast import distributed as D
from hsc_fast.config import RunConfig, cam_channels
from hsc_fast.errors import ConfigError, DataError
from hsc_fast.losses.methods import get_method
from hsc_fast.engine.deepspeed import build_ds_config
from hsc_fast.engine.loop import EpochStream, StepLoop, StepResult
from hsc_fast.engine.runlog import RunLog

# ----------------------------------------------------------------------------------------------
# Configuration checks and the DeepSpeed JSON
# ----------------------------------------------------------------------------------------------
def feature_size(pixels: int) -> int:
    """Feature-map side of an output-stride-8 network."""
    return math.ceil(pixels / 8)


def check_geometry(cfg: RunConfig) -> None:
    """Cross-field checks of the contrast maps (before any work): view 2 at 1/8 must match the
    contrast size, and the batch-wide top-k sizes must fit in the pixels of one batch."""
    loss, data = cfg.loss, cfg.data
    if data.view2_size > data.crop_size:
        raise ConfigError(f"config key 'data.view2_size': {data.view2_size} exceeds data.crop_size {data.crop_size}")
    side2 = feature_size(data.view2_size)
    if loss.contrast_size < 0:
        raise ConfigError("config key 'loss.contrast_size': must be >= 0")
    if loss.contrast_size and loss.contrast_size != side2:
        raise ConfigError(
            f"config key 'loss.contrast_size': {loss.contrast_size} must equal view 2's feature size "
            f"data.view2_size/8 = {side2} (official: 128 px -> 16), or 0 for feature resolution")
    side = loss.contrast_size or side2
    image_side = loss.contrast_size or feature_size(data.crop_size)   # 0: view 1's feature resolution
    method = get_method(loss.method)
    if method.check is not None:
        method.check(cfg, side=side, image_side=image_side)
    if cfg.train.save_every <= 0 or cfg.train.keep_last <= 0 or cfg.train.max_nonfinite <= 0:
        raise ConfigError("config keys 'train.save_every', 'train.keep_last', 'train.max_nonfinite': must be positive")
    if cfg.train.dist_timeout_s <= 0:
        raise ConfigError("config key 'train.dist_timeout_s': must be positive")


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def check_inputs(cfg: RunConfig) -> None:
    """Every file the config names exists: checked before any process group, model or log is made,
    so a typo costs seconds, not a queue wait plus a model build."""
    from hsc_fast.data import is_shard_source
    source = cfg.data.train
    if not source:
        raise ConfigError("config key 'data.train' is empty: give a shard index.json / brace URL or a VOC root folder")
    if is_shard_source(source) and not _is_remote(source):
        if source.endswith(".json"):
            found = Path(source).is_file()
        elif Path(source).is_dir():
            found = True  # is_shard_source saw its index.json
        else:
            import webdataset as wds
            found = any(Path(u).is_file() for u in wds.shardlists.expand_urls(source))
        if not found:
            raise ConfigError(f"config key 'data.train': '{source}' does not exist (expected a shard index.json, "
                              "a folder holding one, or a brace URL of existing .tar shards)")
    elif not is_shard_source(source):
        if not Path(source).is_dir():
            raise ConfigError(f"config key 'data.train': '{source}' does not exist (expected a shard index.json, "
                              "a folder holding one, a brace URL of .tar shards or a VOC root folder)")
        from hsc_fast.data import find_voc_root
        try:
            find_voc_root(source)  # JPEGImages/ in it or in VOC2012/ below it
        except DataError as e:
            raise ConfigError(f"config key 'data.train': {e}") from e
        for key in ("train_list", "sbd_root", "cls_labels", "saliency_root"):  # used by folder sources only
            value = getattr(cfg.data, key)
            if value and not Path(value).exists():
                raise ConfigError(f"config key 'data.{key}': '{value}' does not exist")
    from hsc_fast.data import resolve_run_classes
    resolve_run_classes(cfg, source)  # data.classes, model.num_classes from the data
    check_saliency_source(cfg)
    from hsc_fast.models.timm_backbone import resolve_weights
    if cfg.model.weights and not Path(resolve_weights(cfg.model.weights)).is_file():
        raise ConfigError(f"config key 'model.weights': file '{cfg.model.weights}' does not exist")
    if not cfg.model.weights and not cfg.model.allow_random_init:
        raise ConfigError("config key 'model.weights' is empty: give ImageNet weights (mxnet .params or a .pth "
                          "state dict) or set model.allow_random_init=true to train from random init")


def check_saliency_source(cfg: RunConfig) -> None:
    """EPS methods read saliency maps: the data must carry them (COCO, for one, ships none)."""
    from hsc_fast.data import open_train_source
    from hsc_fast.registry import METHODS
    if not METHODS.get(cfg.loss.method).saliency:
        return
    if not open_train_source(cfg.data).has_saliency:
        raise ConfigError(f"config key 'loss.method': {cfg.loss.method!r} needs saliency maps, and data.train "
                          f"'{cfg.data.train}' has none: shard with --saliency-root (or set data.saliency_root for "
                          "a folder); MS COCO comes without them (EPS used PFAN maps), so give your own")


def check_resume_world_size(resume_from: Optional[Path], world_size: int) -> None:
    """RNG streams, data positions and ZeRO partitions are per rank: resume with the same world size."""
    if resume_from is None:
        return
    meta = Path(resume_from) / "meta.json"
    saved = json.loads(meta.read_text()).get("world_size") if meta.is_file() else None
    if saved is not None and saved != world_size:
        raise ConfigError(f"--resume {resume_from}: written with world size {saved}, this run has world size "
                          f"{world_size}; resume with {saved} ranks (or start a new run from its state.pt weights)")


def autocast_device(cfg: RunConfig, device: torch.device) -> Optional[str]:
    """Device type whose bf16 autocast wraps the forward pass (train.bf16_autocast on CUDA,
    train.cpu_bf16_autocast on CPU), or None for fp32."""
    if device.type == "cuda" and cfg.train.bf16_autocast:
        return "cuda"
    if device.type == "cpu" and cfg.train.cpu_bf16_autocast:
        return "cpu"
    return None


class DataStream(EpochStream):
    """Endless batches from a `TrainLoader` with a resumable position (epoch, batches consumed).

    Each epoch is one pass of the loader after `set_epoch(epoch, skip_batches)`; the loader
    re-creates an epoch's stream exactly from (seed, epoch, rank), so resuming mid-epoch skips
    the consumed batches without decoding them.
    """

    empty_message = "the training loader yields no batches (empty dataset or every sample skipped)"

    def __init__(self, loader, epoch: int = 0, batches_in_epoch: int = 0):
        self.loader = loader
        self.epoch = epoch
        self._start_epoch(batches_in_epoch)

    def _start_epoch(self, skip_batches: int = 0) -> None:
        self.loader.set_epoch(self.epoch, skip_batches)
        self._it: Iterator = iter(self.loader)
        self.batches_in_epoch = skip_batches

    def skipped(self) -> int:
        """Corrupt samples the loader skipped so far on this rank."""
        counter = getattr(self.loader, "skip_counter", None)
        return int(counter.count) if counter is not None else 0


# ----------------------------------------------------------------------------------------------
# The CAM trainer
# ----------------------------------------------------------------------------------------------
def part_init_seeds(seed: int) -> dict:
    """One init seed per network part (cam_net.INIT_PARTS), from train.seed alone: every loss
    method trains from the same initial weights at the same seed, whichever parts it builds
    (the paired ablation, engine.ablation)."""
    from hsc_fast.data.loader import _seed
    from hsc_fast.models.cam_net import INIT_PARTS
    return {part: _seed(seed, i, 4) for i, part in enumerate(INIT_PARTS)}


def build_train_model(cfg: RunConfig, device: torch.device, channels_last: bool, log_info) -> torch.nn.Module:
    """The CAM network in training mode on ``device``, with ``model.weights`` loaded (or random init
    when ``model.allow_random_init``: ConfigError otherwise); random init per part_init_seeds."""
    from hsc_fast.models import build_cam_model
    model = build_cam_model(cfg.model, init_seeds=part_init_seeds(cfg.train.seed))
    if cfg.model.weights:
        report = model.load_pretrained(cfg.model.weights)
        log_info("pretrained weights: %s", getattr(report, "summary", lambda: report)())
    elif not cfg.model.allow_random_init:
        raise ConfigError("config key 'model.weights' is empty: give ImageNet weights or set "
                          "model.allow_random_init=true to train from random init")
    model.train()  # CamNet.train keeps frozen BatchNorms in eval mode
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def cam_picture(img: torch.Tensor, cam: torch.Tensor, label: torch.Tensor, mean, std) -> np.ndarray:
    """One training image with the max of its present classes' CAMs overlaid (RGB uint8)."""
    from hsc_fast.data import denormalize
    from hsc_fast.eval.visualize import overlay_cam
    image = denormalize(img[None].float().cpu(), mean, std)[0]
    image = image.permute(1, 2, 0).numpy() if image.shape[0] == 3 else np.asarray(image)
    fg = torch.relu(cam[:-1].cpu()) * label.cpu().float()[:, None, None]
    heat = fg.max(dim=0).values
    heat = heat / (heat.max() + 1e-5)
    heat = torch.nn.functional.interpolate(heat[None, None], size=image.shape[:2], mode="bilinear",
                                           align_corners=False)[0, 0].numpy()
    return overlay_cam(image, heat)


class Trainer(StepLoop):
    """Builds model, optimizer, schedule, DeepSpeed engine and banks; runs and checkpoints steps."""

    def __init__(self, cfg: RunConfig, run_dir, info: D.DistInfo, ds_config: Optional[dict] = None,
                 log: Optional[RunLog] = None):
        from hsc_fast.losses.prototypes import DistContext, PrototypeBanks

        check_geometry(cfg)
        self._setup(cfg, run_dir, info, ds_config if ds_config is not None else build_ds_config(cfg, info.world_size),
                    log)
        self.channels_last = bool(cfg.model.channels_last and self.device.type == "cuda")
        self._wrap_engine(build_train_model(cfg, self.device, self.channels_last, self._log_info), cfg.optim)
        if cfg.train.compile:
            self.engine.compile()
        self.banks = PrototypeBanks(seed=cfg.train.seed, rsc_dim=cfg.model.rsc_dim, psc_dim=cfg.model.psc_dim,
                                    num_classes=cam_channels(cfg.model)).to(self.device)
        self.dist_ctx = DistContext() if info.world_size > 1 else None
        self.autocast_device = autocast_device(cfg, self.device)
        self._kernel_reports_seen = 0  # kernel self-check verdicts already written to env.json
        self._last_visual: Optional[tuple] = None
        self._skipped_before = 0  # loader skips already recorded (this rank)
        self._seed_rank_streams()

    # -- helpers ---------------------------------------------------------------------------------
    def build_loader(self):
        from hsc_fast.data import build_train_loader
        return build_train_loader(self.cfg.data, self.info.rank, self.info.world_size, self.cfg.train.seed,
                                  self.device)

    def _to_device(self, batch: dict) -> dict:
        out = {}
        for k, v in batch.items():
            out[k] = v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        if self.engine_bf16:  # DeepSpeed bf16 keeps bf16 weights: feed bf16 images
            out["img"] = out["img"].to(torch.bfloat16)
        if self.channels_last:
            out["img"] = out["img"].contiguous(memory_format=torch.channels_last)
        return out

    # -- one optimiser step ------------------------------------------------------------------------
    def forward_losses(self, batch: dict, banks: dict) -> tuple[dict, dict, dict]:
        """Both views through the network and the method losses -> (terms, new banks, view-1 out)."""
        from hsc_fast.data import make_view2
        from hsc_fast.losses import method_losses
        img1 = batch["img"]
        batch = dict(batch, img2=make_view2(img1, self.cfg.data.view2_size))
        # The network runs in bf16 under autocast; method_losses switches it off (hsc_fast.precision).
        amp = torch.autocast(self.autocast_device, dtype=torch.bfloat16) if self.autocast_device else nullcontext()
        with amp:
            out1 = self.engine(img1)
            out2 = self.engine(batch["img2"])
            # The in-training CRF runs inside (loss.crf.enabled, loss.crf.backend: hsc_fast.crf.train).
            terms, new_banks = method_losses(out1, out2, batch, banks, self.cfg.loss, dist_ctx=self.dist_ctx,
                                             img_mean=tuple(self.cfg.data.mean), img_std=tuple(self.cfg.data.std))
        return terms, new_banks, out1

    def _begin_step(self) -> None:
        self._pending = {k: v.clone() for k, v in self.banks.as_dict().items()}

    def micro_losses(self, raw: dict, step_no: int, last: bool) -> tuple[dict, int]:
        batch = self._to_device(raw)
        terms, self._new_banks, out1 = self.forward_losses(batch, self._pending)
        if last and self._wants_picture(step_no):
            self._last_visual = (batch["img"][0].detach(), out1["cam"][0].detach().float(), batch["label"][0].detach())
        return terms, int(batch["img"].shape[0])

    def _micro_done(self, any_bad: bool) -> None:
        if not any_bad:  # the banks follow the finite micro-steps only
            self._pending = self._new_banks

    def _end_step(self, nonfinite: bool) -> None:
        if not nonfinite:
            self.banks.update_(self._pending)

    def _wants_picture(self, step_no: int) -> bool:
        every = self.cfg.train.image_every
        return bool(every) and self.info.is_main and step_no % every == 0

    # -- checkpoints ------------------------------------------------------------------------------
    def _checkpoint_extra(self) -> dict:
        return {"banks": self.banks.state_dict()}

    def _restore_extra(self, shared: dict, ckpt_dir: Path) -> None:
        self.banks.load_state_dict(shared["banks"])

    # -- pictures -----------------------------------------------------------------------------------
    def write_picture(self, step_no: int) -> Optional[Path]:
        if self._last_visual is None or self.log is None:
            return None
        picture = cam_picture(*self._last_visual, self.cfg.data.mean, self.cfg.data.std)
        self._last_visual = None
        return self.log.image("cam", step_no, picture)

    # -- the loop (StepLoop.fit) ---------------------------------------------------------------------
    def make_stream(self) -> DataStream:
        self._skipped_before = 0
        return DataStream(self.build_loader(), self.state.epoch, self.state.batches_in_epoch)

    def _nonfinite_message(self, result: StepResult, path: Path) -> str:
        st = self.state
        return (f"loss was non-finite for {st.nonfinite_in_a_row} optimiser steps in a row (steps "
                f"{st.step - st.nonfinite_in_a_row + 1}..{st.step}; non-finite terms on this rank: "
                f"{', '.join(result.nonfinite_terms) or 'none (another rank)'}); train.max_nonfinite="
                f"{self.cfg.train.max_nonfinite}. Parameters and banks are those of the last finite step, saved in {path}")

    def _finish(self) -> dict:
        final = self.save_final()
        return {"step": self.state.step, "nonfinite_total": self.state.nonfinite_total,
                "skipped_samples": self.state.skipped_samples, "final_model": str(final) if final else None}

    def _record(self, result: StepResult, stream: DataStream, seconds: float, heartbeat) -> None:
        skipped_now = stream.skipped()
        skipped, self._skipped_before = skipped_now - self._skipped_before, skipped_now
        st = self.state
        self._count_nonfinite(result.nonfinite, f"loss (terms: {', '.join(result.nonfinite_terms) or 'on another rank'})")
        local = dict(result.terms)
        local["_skipped"] = float(skipped) * self.info.world_size  # mean x world = sum over ranks
        local["_images"] = float(result.images) * self.info.world_size
        glob = self._guarded(lambda: D.all_reduce_mean(local, self.device), heartbeat)
        st.skipped_samples += int(round(glob.pop("_skipped")))
        images = glob.pop("_images")
        if skipped and self.log is not None:
            self.log.warning("step %d: %d bad sample(s) skipped by the loader on this rank", st.step, skipped)
        if self.log is None:
            return
        row = {"step": st.step, "epoch": st.epoch, "lr": result.lr, "loss": glob.pop("total"), **glob}
        self._log_step(row, images, st.skipped_samples, seconds)
        self.write_picture(st.step)
