"""SynthNet: a locally built stand-in for ImageNet weights, for the synthetic set.

WSSS methods start from an ImageNet classifier; the CAM stage only fine-tunes features that already
tell objects apart. No machine here has ImageNet weights, and from random init the CAM classifier
of `make demo` / `make ablation` never leaves the label prior at a CPU budget (docs: results/ablation.md).
So, like ImageNet pretraining, SynthNet trains the backbone as a plain classifier on a *different*
image set: single-object pictures rendered by `hsc_fast.data.synth` under their own seed and ids
(image-level class only, no masks, classes balanced), 20-way softmax, the standard (undilated,
stride 32) torchvision ResNet. The output is a torchvision-format state dict (its 20-class `fc`
is ignored by the loaders), used exactly like an ImageNet file: `model.weights`, `deeplab.weights`.

    python launch/pretrain.py --out weights/synthnet_resnet18.pth [--config demo_synthnet] [--set pretrain.steps=500]
    torchrun --standalone --nproc_per_node 2 launch/pretrain.py --out ...     (or deepspeed ...)

Under several ranks each rank renders and trains on its own share of the images and the gradients
are averaged (one flat all-reduce per step), so 2 CPU ranks or 8 GPUs cost what one would.
The pipeline runs this as stage `pretrain` when `pretrain.enabled` (the demo and the ablation).
Not resumable mid-way (minutes long): an interrupted run starts again; the file is written atomically.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision

from hsc_fast.classes import VOC
from hsc_fast.config import PretrainConfig, RunConfig, to_dict
from hsc_fast.errors import ConfigError

# SynthNet's own label space (the stand-in for ImageNet's 1,000 classes): the 20 hand-made
# synthetic classes, whatever class set the WSSS run then trains on.
NUM_FG = VOC.num_fg

PRETRAIN_ARCHS = ("resnet18", "resnet50", "resnet101")
ID_YEAR = 2102          # ids '2102_000017': never those of the WSSS set (2100 train, 2101 val)
VAL_OFFSET = 10_000_000  # validation ids start here, so they never meet training ids
MIN_RENDER = 96          # smallest size the generator renders single objects at (see render_example)


def weights_path(run_dir: Path, arch: str) -> Path:
    """Where the pipeline keeps the SynthNet file of a backbone."""
    return Path(run_dir) / "pretrain" / f"synthnet_{arch}.pth"


def check_arch(arch: str) -> str:
    if arch not in PRETRAIN_ARCHS:
        raise ConfigError(f"pretrain: backbone {arch!r} cannot be pretrained here (torchvision ResNets only: "
                          f"{', '.join(PRETRAIN_ARCHS)}); ResNet-38 loads the authors' ImageNet .params file")
    return arch


def fill_weights(cfg: RunConfig, run_dir: Path) -> list[str]:
    """With pretrain.enabled, point the empty `model.weights` / `deeplab.weights` of backbones that
    SynthNet can train at the pipeline's SynthNet files. Returns the config keys it set."""
    if not cfg.pretrain.enabled:
        return []
    filled = []
    for sec in ("model", "deeplab"):
        part = getattr(cfg, sec)
        if not part.weights and part.backbone in PRETRAIN_ARCHS:
            part.weights = str(weights_path(run_dir, part.backbone))
            filled.append(f"{sec}.weights")
    return filled


def archs_to_train(cfg: RunConfig, run_dir: Path) -> list[str]:
    """The backbones whose configured weights are this run's SynthNet files."""
    out = []
    for part in (cfg.model, cfg.deeplab):
        if part.weights == str(weights_path(run_dir, part.backbone)) and part.backbone not in out:
            out.append(check_arch(part.backbone))
    return out


# ------------------------------------------------------------------------------------------ data
def image_id(index: int) -> str:
    return f"{ID_YEAR}_{index:06d}" if index < VAL_OFFSET else f"{ID_YEAR}_{index:08d}"


def render_example(seed: int, index: int, size: int) -> tuple[np.ndarray, int]:
    """One single-object picture (uint8 HxWx3) and its class 0..19; class = index mod 20 (balanced).
    Below MIN_RENDER px the picture is rendered at MIN_RENDER and shrunk: thin shapes (bicycle
    rings) cannot keep a visible core at small sizes."""
    from PIL import Image
    from hsc_fast.data.synth import image_rng, render_scene
    cls = index % NUM_FG
    scene = render_scene(image_rng(seed, image_id(index)), max(size, MIN_RENDER), classes=[cls + 1])
    if size >= MIN_RENDER:
        return scene.rgb, cls
    return np.array(Image.fromarray(scene.rgb).resize((size, size), Image.BOX)), cls


def render_set(seed: int, indices, size: int, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,3,H,W) uint8 images and (N,) int64 classes for the given indices."""
    indices = list(indices)
    images = torch.empty((len(indices), 3, size, size), dtype=torch.uint8)
    labels = torch.empty(len(indices), dtype=torch.int64)
    it = indices
    if progress:
        from tqdm import tqdm
        it = tqdm(indices, desc="pretrain: render", unit="img", mininterval=2.0)
    for i, index in enumerate(it):
        rgb, cls = render_example(seed, index, size)
        images[i] = torch.from_numpy(rgb).permute(2, 0, 1)
        labels[i] = cls
    return images, labels


def rank_share(n: int, rank: int, world: int, offset: int = 0) -> range:
    """This rank's indices of n items (strided: shares differ by at most one)."""
    return range(offset + rank, offset + n, world)


# ---------------------------------------------------------------------------------------- model
def build_classifier(arch: str) -> torch.nn.Module:
    """The standard torchvision classifier with a 20-way head (parameter names as torchvision's)."""
    return getattr(torchvision.models, check_arch(arch))(weights=None, num_classes=NUM_FG)


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 when asked, or 'auto' on a GPU with bf16; 'auto' on CPU is fp32 on every CPU model, so a
    run's numbers do not depend on whether the CPU has AMX / AVX512-BF16 (issue 26)."""
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine to 0 at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def normalizer(mean, std, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 NCHW -> normalised float, with the CAM stage's mean/std (so the features transfer)."""
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
    return lambda x: (x.to(device, torch.float32) - m) / s


def augment(x: torch.Tensor, gen: torch.Generator, pad: int) -> torch.Tensor:
    """Random flip and a random shift of up to `pad` pixels (reflect padding), per batch."""
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(3)
    if pad <= 0:
        return x
    h, w = x.shape[2:]
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    return padded[:, :, dy:dy + h, dx:dx + w]


def average_gradients(model: torch.nn.Module, world: int) -> None:
    """Mean of every gradient over ranks with one flat all-reduce."""
    if world == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def average_bn_statistics(model: torch.nn.Module, world: int) -> None:
    """BatchNorm running means/variances averaged over ranks (each rank saw only its own batches),
    so every rank ends with the same model and the file holds statistics of all the data."""
    if world == 1:
        return
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for t in (m.running_mean, m.running_var):
                dist.all_reduce(t)
                t /= world


def broadcast_parameters(model: torch.nn.Module, world: int) -> None:
    """Rank 0's initial weights everywhere (each rank seeds alike, but do not rely on it)."""
    if world == 1:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


@torch.no_grad()
def accuracy(model, images, labels, norm, bf16: bool, device, world: int, batch: int = 200) -> float:
    """Top-1 accuracy (percent) over every rank's share of the validation images."""
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(norm(images[i:i + batch]).contiguous(memory_format=torch.channels_last))
        correct += int((logits.argmax(1).cpu() == labels[i:i + batch]).sum())
    counts = torch.tensor([correct, len(labels)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(counts)
    model.train()
    return 100.0 * float(counts[0] / counts[1].clamp(min=1))


# ------------------------------------------------------------------------------------- training
def train_classifier(cfg: RunConfig, arch: str, *, rank: int = 0, world: int = 1,
                     device: Optional[torch.device] = None, progress: bool = True, log=print,
                     metrics_path: Optional[Path] = None) -> tuple[torch.nn.Module, dict]:
    """Render this rank's share and train SynthNet for `arch` (every rank calls it: collectives).
    Returns the model (identical on every rank) and a summary with the held-out top-1 accuracy."""
    from hsc_fast.engine.runlog import MetricsCSV, git_sha
    pc = cfg.pretrain
    if pc.batch_size % world:
        raise ConfigError(f"pretrain.batch_size={pc.batch_size} is the batch of all ranks together: "
                          f"it must divide evenly over {world} ranks")
    rank_batch = pc.batch_size // world
    device = device or torch.device("cpu")
    main = rank == 0
    bf16 = use_bf16(pc.precision, device)
    t0 = time.perf_counter()
    images, labels = render_set(pc.seed, rank_share(pc.images, rank, world), pc.size, progress and main)
    val_images, val_labels = render_set(pc.seed, rank_share(pc.val_images, rank, world, VAL_OFFSET), pc.size)
    render_s = time.perf_counter() - t0
    if main:
        log(f"[pretrain] {arch}: rendered {pc.images} + {pc.val_images} images at {pc.size} px "
            f"in {render_s:.1f} s; {pc.steps} steps x {pc.batch_size} images on {world} rank(s), "
            f"{'bf16' if bf16 else 'fp32'}")
    torch.manual_seed(pc.seed)
    model = build_classifier(arch).to(device).to(memory_format=torch.channels_last)
    broadcast_parameters(model, world)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # BN and biases: no decay
    opt = torch.optim.SGD([{"params": decay, "weight_decay": pc.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=pc.lr, momentum=pc.momentum, nesterov=pc.momentum > 0)
    norm = normalizer(cfg.data.mean, cfg.data.std, device)
    gen = torch.Generator().manual_seed(pc.seed * 1009 + rank)
    metrics = MetricsCSV(metrics_path) if main and metrics_path is not None else None
    bar = None
    if progress and main:
        from tqdm import tqdm
        bar = tqdm(total=pc.steps, desc=f"pretrain {arch}", unit="step", mininterval=2.0)
    t_train, seen, window = time.perf_counter(), 0, []
    for step in range(pc.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, pc)
        idx = torch.randint(0, len(labels), (rank_batch,), generator=gen)
        x = augment(norm(images[idx]), gen, pad=pc.size // 12).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), labels[idx].to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain {arch}: non-finite loss at step {step}; lower pretrain.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model, world)
        opt.step()
        seen += rank_batch * world
        window.append(float(loss.detach()))
        if metrics is not None and ((step + 1) % pc.log_every == 0 or step + 1 == pc.steps):
            elapsed = time.perf_counter() - t_train
            metrics.write({"step": step + 1, "epoch": seen / pc.images, "lr": lr_at(step, pc),
                           "loss": sum(window) / len(window), "images_per_s": seen / elapsed, "time_s": elapsed})
            window = []
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{window[-1] if window else float(loss.detach()):.3f}", refresh=False)
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t_train
    average_bn_statistics(model, world)
    acc = accuracy(model, val_images, val_labels, norm, bf16, device, world)
    summary = {"arch": arch, "val_top1": acc, "val_images": pc.val_images, "chance_top1": 100.0 / NUM_FG,
               "steps": pc.steps, "images_seen": seen, "epochs": seen / pc.images, "images_per_s": seen / train_s,
               "render_seconds": render_s, "train_seconds": train_s, "precision": "bf16" if bf16 else "fp32",
               "world_size": world, "device": str(device), "git_commit": git_sha(),
               "config": to_dict(pc)}
    return model, summary


def sharing(ranks: str, device: torch.device, world: int) -> str:
    """'all' or 'main'. On one CPU host, 1-thread ranks that all-reduce 45 MB of ResNet-18 gradients
    every step ran at 93 img/s where one rank with both cores ran at 157 (2 cores, bf16): on CPU
    one rank trains with every core of its host and the others wait."""
    if world == 1:
        return "all"
    if ranks == "auto":
        return "all" if device.type == "cuda" else "main"
    return ranks


class _threads:
    """Temporarily use n intra-op threads."""

    def __init__(self, n: int):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def host_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pretrain(cfg: RunConfig, arch: str, out_path, *, rank: int = 0, world: int = 1,
             device: Optional[torch.device] = None, progress: bool = True, log=print) -> dict:
    """Train SynthNet for `arch`; rank 0 writes its state dict to out_path (atomically) with a .json
    summary and a _metrics.csv beside it. Every rank must call this. Returns the summary (on the
    waiting ranks of pretrain.ranks=main: the one rank 0 wrote)."""
    from hsc_fast.checkpoint import atomic_torch_save, atomic_write_text
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    device = device or torch.device("cpu")
    metrics_path = out_path.parent / f"{out_path.stem}_metrics.csv"
    if sharing(cfg.pretrain.ranks, device, world) == "main":
        if rank == 0:
            with _threads(host_cores() if device.type == "cpu" else torch.get_num_threads()):
                model, summary = train_classifier(cfg, arch, device=device, progress=progress, log=log,
                                                  metrics_path=metrics_path)
            summary["ranks"] = "main"
    else:
        model, summary = train_classifier(cfg, arch, rank=rank, world=world, device=device, progress=progress,
                                          log=log, metrics_path=metrics_path)
        summary["ranks"] = "all"
    if rank == 0:
        summary["file"] = str(out_path)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_torch_save(state, out_path)
        atomic_write_text(out_path.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
        log(f"[pretrain] {arch}: top-1 {summary['val_top1']:.1f} % on {summary['val_images']} held-out images "
            f"(chance 5.0 %), {summary['images_per_s']:.0f} img/s, {summary['train_seconds']:.0f} s -> {out_path}")
    if world > 1:
        dist.barrier()  # no rank goes on to load the file before rank 0 has written it
    if rank != 0:
        return json.loads(out_path.with_suffix(".json").read_text())
    return summary
