"""Data: VOC/SBD folder datasets, WebDataset shard pipelines and the two-view training transform.

Public API (import from here):
  * :func:`build_train_loader` -> :class:`TrainLoader` of batches ``{"img", "label", "valid",
    "sal" (with saliency), "key"}``; :class:`SkipCounter` counts corrupt samples skipped.
  * :func:`build_eval_dataset` -> :class:`EvalStream` of ``(key, image, label, mask)``, each sample
    exactly once across ranks x workers.
  * :class:`FolderDataset` over VOC/SBD trees; :class:`TwoViewTransform`; :func:`make_view2`
    and :func:`denormalize` for the device side.
The shard format is described in :mod:`hsc_fast.data.samples`; shards are written by :mod:`hsc_fast.data.shard`.
"""
from hsc_fast.data.folder import FolderDataset, decode_eval_sample, find_voc_root
from hsc_fast.data.loader import (EvalStream, ShardSet, SkipCounter, TrainLoader, build_eval_dataset, build_train_loader,
                     collate, consumed_batches, is_shard_source, open_train_source, resolve_run_classes,
                     source_class_set)
from hsc_fast.data.transforms import TwoViewTransform, denormalize, finish_batch, make_view2, normalize

__all__ = [
    "FolderDataset", "decode_eval_sample", "find_voc_root", "EvalStream", "ShardSet", "SkipCounter", "TrainLoader",
    "build_eval_dataset", "build_train_loader", "collate", "consumed_batches", "is_shard_source",
    "open_train_source", "resolve_run_classes", "source_class_set", "TwoViewTransform", "denormalize", "finish_batch", "make_view2", "normalize",
]
