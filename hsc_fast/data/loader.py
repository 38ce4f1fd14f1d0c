"""Training and evaluation data pipelines over shards (WebDataset tars) or VOC/SBD folders.

Training (:func:`build_train_loader`): an endless, deterministic stream per (rank, worker):
  shards -> resampled with a seed of (seed, epoch, rank, worker) (so ranks and workers draw
  independent shard sequences: the resampled equivalent of splitting by node and by worker) ->
  webdataset tar reading -> sample shuffle buffer -> decode (JPEG, PNG, JSON only; nothing is
  unpickled) -> two-view transform -> batches. Folders -> a permutation of the ids per (seed, epoch),
  split by rank then by worker, repeated. Every worker yields the same number of batches, computed
  from the config alone, so every rank sees the same number per epoch (no collective hangs).

Exact resume: a sample's augmentation is drawn from an rng keyed by (seed, epoch, rank, worker,
its index in that worker's stream), and torch's DataLoader takes batches from its workers in
round-robin order. To skip K consumed batches, worker w plays the part of worker (w + K) % W and
drops the raw samples of its batches already consumed *before* decoding them: batch K of the
resumed loader is the batch K the first run produced (exactly, unless a corrupt sample fell in the
skipped part).

Corrupt samples met while training are skipped and counted (:class:`SkipCounter`, logged by the
trainer); evaluation streams raise instead.

Evaluation / inference (:func:`build_eval_dataset`): finite, each sample exactly once across
ranks x workers. With at least ranks x workers shards, shards are split by rank then by worker;
with fewer, every slot reads all shards and keeps samples by index modulo the slot count (no empty
workers, no "No samples found").
"""
from __future__ import annotations

import json
import logging
import os
import random
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import webdataset as wds

from hsc_fast.classes import VOC, ClassSet, from_index
from hsc_fast.errors import ConfigError, DataError
from hsc_fast.data import samples as S
from hsc_fast.data.folder import FolderDataset, decode_eval_sample
from hsc_fast.data.transforms import TwoViewTransform, finish_batch

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
MAX_CONSECUTIVE_FAILURES = 1000  # an all-corrupt source would otherwise spin forever
MAX_EMPTY_SHARDS = 1000  # likewise shards that hold no sample (an all-zero file is a valid empty tar)


# ------------------------------------------------------------------------------------ skip counter
class SkipCounter:
    """Counts samples (or shards) skipped because they could not be read; a webdataset handler.

    ``handler(exn)`` records the error and returns True (= continue), like ``wds.warn_and_continue``
    but counting. In a loader worker the pending count travels to the main process inside the next
    batch (``batch["skipped"]``), where :class:`TrainLoader` adds it to its own counter.
    """

    def __init__(self, max_logged: int = 20):
        self.count = 0
        self.pending = 0
        self.consecutive = 0
        self.last_errors: list[str] = []
        self.max_logged = max_logged

    def handler(self, exn: BaseException) -> bool:
        self.count += 1
        self.pending += 1
        self.consecutive += 1
        msg = f"{type(exn).__name__}: {exn}"
        self.last_errors = (self.last_errors + [msg])[-self.max_logged:]
        if self.count <= self.max_logged:
            log.warning("skipping unreadable data (%d so far): %s", self.count, msg)
        if self.consecutive >= MAX_CONSECUTIVE_FAILURES:
            raise DataError(f"{self.consecutive} unreadable samples in a row; last: {msg}") from exn
        return True

    def ok(self) -> None:
        self.consecutive = 0

    def take(self) -> int:
        """The count since the last call (what the next batch reports)."""
        n, self.pending = self.pending, 0
        return n

    def add(self, n: int) -> None:
        self.count += int(n)


# ---------------------------------------------------------------------------------------- sources
def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # unreadable, bad UTF-8 / JSON, absurd nesting
        raise DataError(f"{path}: cannot read the shard index ({str(e)[:200]})") from e
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise DataError(f"{path}: expected a shard index with a 'shards' list (written by hsc_fast.data.shard)")
    return index


def is_shard_source(source: Union[str, os.PathLike]) -> bool:
    """True for an index.json, a folder holding one, or a (brace) URL / path of .tar shards."""
    s = str(source)
    return s.endswith(".json") or ".tar" in s or (Path(s).is_dir() and (Path(s) / INDEX_NAME).is_file())


class ShardSet:
    """The shard files of a source, and the index when there is one (sample count, ids per shard)."""

    def __init__(self, source: Union[str, os.PathLike]):
        s = str(source)
        path = Path(s)
        index_path = path if s.endswith(".json") else path / INDEX_NAME if path.is_dir() else None
        self.index_file = index_path  # where the index was read from (None: shards without one)
        if index_path is not None:
            self.index = _read_index(index_path)
            from hsc_fast.data.voc import safe_join
            self.urls = [str(safe_join(index_path.parent, e["file"])) for e in self.index["shards"]]
            self.ids = [list(e.get("ids", [])) for e in self.index["shards"]]
        else:
            self.urls = list(wds.shardlists.expand_urls(s))
            guess = Path(self.urls[0]).parent / INDEX_NAME if self.urls else None
            self.index = _read_index(guess) if guess is not None and guess.is_file() else None
            self.index_file = guess if self.index is not None else None
            self.ids = None
            if self.index is not None:
                by_file = {e["file"]: e.get("ids", []) for e in self.index["shards"]}
                self.ids = [by_file.get(Path(u).name) for u in self.urls]
                if any(v is None for v in self.ids):
                    self.ids = None
        if not self.urls:
            raise DataError(f"{source}: no shards")

    @property
    def count(self) -> Optional[int]:
        return None if self.ids is None else sum(len(v) for v in self.ids)

    @property
    def has_saliency(self) -> bool:
        return bool(self.index and self.index.get("has_saliency"))

    @property
    def class_set(self) -> ClassSet:
        """The classes the index records (shards without an index, or from before the key: VOC)."""
        return from_index(self.index, "shard index") if self.index else VOC


def _worker_slot() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def _shuffle(stream: Iterable, bufsize: int, rng: random.Random) -> Iterator:
    """Sample shuffle buffer (seeded): fill to ``bufsize``, then emit a random element per input."""
    buf: list = []
    for item in stream:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(len(buf))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def _skip_training_members(name: str) -> bool:
    """Training never needs the mask: webdataset skips that member instead of keeping its bytes."""
    return not name.endswith("." + S.MASK)


# -------------------------------------------------------------------------------- training stream
class _TrainStream(torch.utils.data.IterableDataset):
    """The per-worker training stream (see the module docstring)."""

    def __init__(self, source, transform: TwoViewTransform, batch_size: int, shuffle_buffer: int,
                 batches_per_worker: int, with_saliency: bool, seed: int, epoch: int, rank: int,
                 world_size: int, skip_batches: int):
        super().__init__()
        self.source, self.transform = source, transform
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.batches_per_worker, self.with_saliency = batches_per_worker, with_saliency
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.skip_batches = skip_batches

    def _raw(self, worker: int, num_workers: int, counter: SkipCounter) -> Iterator[dict]:
        if isinstance(self.source, FolderDataset):
            return self._raw_folder(worker, num_workers, counter)
        shard_seed = _seed(self.seed, self.epoch, self.rank, worker, 1)
        urls = wds.ResampledShards(self.source.urls, seed=shard_seed, deterministic=True, worker_seed=lambda: 0)
        read = wds.tarfile_to_samples(handler=counter.handler, select_files=_skip_training_members)
        return _fail_on_empty_shards(iter(urls), read)

    def _raw_folder(self, worker: int, num_workers: int, counter: SkipCounter) -> Iterator[dict]:
        """Permutations of all ids (one per cycle, the same on every rank), concatenated; this
        (rank, worker) slot keeps every slots-th position, so even a tiny dataset feeds every slot."""
        ds = self.source
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        position, cycle = 0, 0
        while True:
            order = np.random.default_rng(_seed(self.seed, self.epoch, cycle, 2)).permutation(len(ds))
            first = (slot - position) % slots
            for i in order[first::slots]:
                try:
                    yield ds.raw_sample(ds.ids[i], with_mask=False)
                except DataError as e:
                    counter.handler(e)
            position, cycle = position + len(order), cycle + 1

    def _decode(self, sample: dict, rng: np.random.Generator) -> dict:
        where = S.sample_where(sample)
        image = S.open_jpeg(S.member(sample, S.IMAGE, where), where)
        labels = S.decode_labels(S.member(sample, S.LABELS, where), where, self.source.class_set)
        item = {"key": sample[S.KEY], "label": torch.from_numpy(labels)}
        sal = S.open_saliency(S.member(sample, S.SALIENCY, where), where, image.size) if self.with_saliency else None
        item.update(self.transform(image, rng, sal))
        return item

    def __iter__(self):
        worker, num_workers = _worker_slot()
        logical = (worker + self.skip_batches) % num_workers
        done = consumed_batches(self.skip_batches, logical, num_workers)
        counter = SkipCounter()
        base = _seed(self.seed, self.epoch, self.rank, logical, 3)
        raw = _shuffle(self._raw(logical, num_workers, counter), self.shuffle_buffer, random.Random(base))
        index = done * self.batch_size
        raw = islice(raw, index, None)  # consumed samples are dropped before decoding
        batch, produced = [], done
        while produced < self.batches_per_worker:
            sample = next(raw)
            rng = np.random.default_rng([base & 0xFFFFFFFF, base >> 32, index])
            index += 1
            try:
                batch.append(self._decode(sample, rng))
                counter.ok()
            except Exception as e:  # a corrupt sample is skipped and counted, never fatal
                counter.handler(e)
                continue
            if len(batch) == self.batch_size:
                yield collate(batch, counter.take())
                batch, produced = [], produced + 1


def _fail_on_empty_shards(urls: Iterator[dict], read) -> Iterator[dict]:
    """``read(urls)``, raising DataError once MAX_EMPTY_SHARDS shards in a row gave no sample: an
    endless resampled stream over empty shards would otherwise hang the training silently."""
    opened = [0]

    def counted() -> Iterator[dict]:
        for url in urls:
            opened[0] += 1
            if opened[0] > MAX_EMPTY_SHARDS:
                raise DataError(f"{MAX_EMPTY_SHARDS} shards in a row gave no sample (last: {url.get('url')}): "
                                "are the shards empty or unreadable? (python -m hsc_fast.shard --verify DIR)")
            yield url

    for sample in read(counted()):
        opened[0] = 0
        yield sample


def consumed_batches(skip_batches: int, worker: int, num_workers: int) -> int:
    """How many of the first ``skip_batches`` round-robin batches came from ``worker``."""
    return max(0, (skip_batches - worker + num_workers - 1) // num_workers)


def collate(items: Sequence[dict], skipped: int = 0) -> dict:
    """Stack per-sample dicts into the batch the trainer consumes."""
    batch = {"img": torch.stack([it["img"] for it in items]),
             "label": torch.stack([it["label"] for it in items]),
             "valid": torch.stack([it["valid"] for it in items]),
             "key": [it["key"] for it in items],
             "skipped": skipped}
    if "sal" in items[0]:
        batch["sal"] = torch.stack([it["sal"] for it in items])
    return batch


class TrainLoader:
    """Iterable of training batches for one rank; re-iterable per epoch.

    Batches: ``img`` float (B, 3, S, S) normalised view 1, ``label`` float (B, K) multi-hot,
    ``valid`` bool (B, 1, S, S) (False on crop padding), ``sal`` float (B, 1, S, S) in [0, 1] when
    the data has saliency, ``key`` list[str]. Workers send uint8 crops; the normalisation runs
    here, after the move to ``device`` (see :func:`hsc_fast.data.transforms.finish_batch`). View 2 is
    made on the device with :func:`hsc_fast.data.make_view2`. ``skip_counter.count``: corrupt
    samples skipped so far.
    """

    def __init__(self, source, data_cfg, rank: int, world_size: int, seed: int, epoch_samples: int,
                 with_saliency: bool, device=None, epoch: int = 0, skip_batches: int = 0):
        self.source, self.cfg = source, data_cfg
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.with_saliency = with_saliency
        self.device = torch.device(device) if device is not None else None
        self.transform = TwoViewTransform.from_config(data_cfg)
        if len(data_cfg.mean) != 3 or len(data_cfg.std) != 3 or min(data_cfg.std) <= 0:
            raise ConfigError(f"data.mean / data.std = {data_cfg.mean} / {data_cfg.std}: expected 3 values each, std > 0")
        self.num_workers = int(data_cfg.workers)
        slots = max(1, self.num_workers)
        nb = max(1, int(epoch_samples) // int(data_cfg.batch_size))
        self.batches_per_worker = -(-nb // slots)
        self.batches_per_epoch = self.batches_per_worker * slots
        self.skip_counter = SkipCounter()
        self.set_epoch(epoch, skip_batches)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch the next iteration yields, skipping its first ``skip_batches`` batches."""
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise ConfigError(f"skip_batches = {skip_batches}: expected 0..{self.batches_per_epoch}")
        self.epoch, self.skip_batches = int(epoch), int(skip_batches)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip_batches

    def _stream(self) -> _TrainStream:
        c = self.cfg
        return _TrainStream(self.source, self.transform, int(c.batch_size), int(c.shuffle_buffer),
                            self.batches_per_worker, self.with_saliency, self.seed, self.epoch,
                            self.rank, self.world_size, self.skip_batches)

    def __iter__(self) -> Iterator[dict]:
        pin = self.device is not None and self.device.type == "cuda"
        kw = dict(prefetch_factor=2) if self.num_workers > 0 else {}
        loader = torch.utils.data.DataLoader(self._stream(), batch_size=None, num_workers=self.num_workers,
                                             pin_memory=pin, **kw)
        for batch in loader:
            self.skip_counter.add(batch.pop("skipped"))
            if self.device is not None:
                batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
            yield finish_batch(batch, self.cfg.mean, self.cfg.std)
        self.skip_batches = 0  # a later iteration of the same epoch starts at its beginning


def _folder_from_config(data_cfg) -> FolderDataset:
    if not data_cfg.train_list:
        raise ConfigError(f"data.train = {data_cfg.train!r} is a folder: data.train_list (an id list) is required")
    return FolderDataset(data_cfg.train, data_cfg.train_list, data_cfg.sbd_root or None,
                         data_cfg.cls_labels or None, data_cfg.saliency_root or None)


def open_train_source(data_cfg):
    """``data.train`` -> a :class:`ShardSet` or a :class:`FolderDataset`."""
    if not data_cfg.train:
        raise ConfigError("data.train is empty: give a shard index.json / brace URL or a VOC root folder")
    if is_shard_source(data_cfg.train):
        return ShardSet(data_cfg.train)
    if Path(data_cfg.train).is_dir():
        return _folder_from_config(data_cfg)
    raise ConfigError(f"data.train = {data_cfg.train!r}: not a shard index, shard URL or folder")


def source_class_set(source) -> ClassSet:
    """The class set of a data source: a shard index's 'classes' (VOC without one), a VOC-layout
    tree's classes.json (VOC without one)."""
    return _source_classes(source)[0]


def _source_classes(source) -> tuple:
    """(class set, the file that records it or None) of a data source."""
    if is_shard_source(source):
        shards = ShardSet(source)
        return shards.class_set, shards.index_file
    from hsc_fast.classes import CLASSES_FILE
    from hsc_fast.data.folder import find_voc_root, folder_classes
    root = find_voc_root(source)
    recorded = root / CLASSES_FILE
    return folder_classes(root), recorded if recorded.is_file() else None


def resolve_run_classes(cfg, source) -> ClassSet:
    """Resolve ``data.classes`` (auto: the class set of ``source``) into ``cfg`` once, before any
    work: it names the set and sets model.num_classes = K+1 (hsc_fast.config.apply_class_set).
    A config that already names its set keeps it (checked against the source's)."""
    from hsc_fast.config import apply_class_set
    try:
        classes, recorded_in = _source_classes(source)
    except DataError as e:
        raise ConfigError(f"{source}: {e}") from e
    apply_class_set(cfg, classes, recorded_in)
    return classes


def build_train_loader(data_cfg, rank: int = 0, world_size: int = 1, seed: int = 0, device=None, *,
                       epoch: int = 0, skip_batches: int = 0, epoch_samples: Optional[int] = None) -> TrainLoader:
    """The training batches of ``rank`` (see :class:`TrainLoader`), deterministic given
    (seed, epoch, rank, world_size, config). ``epoch_samples``: samples per rank per epoch
    (default ``data.epoch_samples``, else dataset size // world_size)."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} / world_size {world_size}: expected 0 <= rank < world_size")
    for name in ("batch_size", "shuffle_buffer"):
        if int(getattr(data_cfg, name)) < 1:
            raise ConfigError(f"data.{name} = {getattr(data_cfg, name)}: expected >= 1")
    if int(data_cfg.workers) < 0:
        raise ConfigError(f"data.workers = {data_cfg.workers}: expected >= 0")
    source = open_train_source(data_cfg)
    size = len(source) if isinstance(source, FolderDataset) else source.count
    n = epoch_samples or data_cfg.epoch_samples or (max(1, size // world_size) if size else 0)
    if not n:
        raise ConfigError(f"data.epoch_samples: cannot tell the dataset size of {data_cfg.train!r} (no index.json): "
                          "set data.epoch_samples")
    sal = source.has_saliency
    return TrainLoader(source, data_cfg, rank, world_size, seed, n, sal, device, epoch, skip_batches)


# ------------------------------------------------------------------------------ evaluation stream
class EvalStream(torch.utils.data.IterableDataset):
    """Finite stream of ``(key, image uint8 (H, W, 3), label float32 (K,), mask uint8 (H, W) or None)``;
    across ranks x workers every selected sample appears exactly once. ``class_set``: the source's."""

    def __init__(self, source, ids: Optional[Sequence[str]], rank: int, world_size: int):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} / world_size {world_size}: expected 0 <= rank < world_size")
        self.source, self.rank, self.world_size = source, rank, world_size
        self.wanted = None if ids is None else set(ids)
        if isinstance(source, FolderDataset):
            self.keys = [i for i in source.ids if self.wanted is None or i in self.wanted]
            missing = [] if self.wanted is None else sorted(self.wanted - set(source.ids))
            self.urls = None
        else:
            self.urls, shard_ids = source.urls, source.ids
            missing = []
            if shard_ids is not None and self.wanted is not None:
                keep = [k for k, v in enumerate(shard_ids) if self.wanted & set(v)]
                self.urls = [self.urls[k] for k in keep]
                missing = sorted(self.wanted - {i for v in shard_ids for i in v})
        if missing:
            raise DataError(f"{len(missing)} requested ids are not in the source, e.g. {missing[:5]}")

    def _slot(self) -> tuple[int, int]:
        worker, num_workers = _worker_slot()
        return self.rank * num_workers + worker, self.world_size * num_workers

    def _raw(self) -> Iterator[dict]:
        slot, slots = self._slot()
        if self.urls is None:
            for key in self.keys[slot::slots]:
                yield self.source.raw_sample(key, with_mask=True)
            return
        if len(self.urls) >= slots:
            worker, num_workers = _worker_slot()
            urls, keep = self.urls[self.rank::self.world_size][worker::num_workers], None
        else:  # fewer shards than slots: everyone reads all, keeps every slots-th sample
            urls, keep = self.urls, slot
        stream = wds.tarfile_to_samples()(iter([{"url": u} for u in urls]))
        wanted = (s for s in stream if self.wanted is None or s[S.KEY] in self.wanted)
        for k, sample in enumerate(wanted):
            if keep is None or k % slots == keep:
                yield sample

    def __iter__(self):
        classes = self.class_set
        for sample in self._raw():
            yield decode_eval_sample(sample, classes)

    @property
    def class_set(self) -> ClassSet:
        return self.source.class_set

    def loader(self, num_workers: int = 0) -> torch.utils.data.DataLoader:
        """A DataLoader over this stream that passes the tuples through unchanged."""
        return torch.utils.data.DataLoader(self, batch_size=None, num_workers=num_workers, collate_fn=_identity)


def _identity(x):
    return x


def build_eval_dataset(source, ids: Optional[Sequence[str]] = None, rank: int = 0, world_size: int = 1, *,
                       id_list=None, sbd_root=None, cls_labels=None, saliency_root=None) -> EvalStream:
    """An evaluation / inference stream from shards (index.json, folder with one, brace URL), a
    :class:`FolderDataset`, or a VOC root folder (then ``id_list`` or ``ids`` names the ids)."""
    if isinstance(source, FolderDataset):
        return EvalStream(source, ids, rank, world_size)
    if is_shard_source(source):
        return EvalStream(ShardSet(source), ids, rank, world_size)
    if id_list is None and ids is None:
        raise ConfigError(f"{source}: a folder source needs id_list or ids")
    ds = FolderDataset(source, id_list if id_list is not None else list(ids), sbd_root, cls_labels, saliency_root)
    return EvalStream(ds, ids, rank, world_size)
