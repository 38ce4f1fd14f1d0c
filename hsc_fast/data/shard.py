"""Pack a VOC/SBD id list (or MS COCO, :mod:`hsc_fast.data.coco`) into WebDataset shards, and verify shards.

    python -m hsc_fast.shard --voc-root VOC2012 [--sbd-root SBD] --list train_aug.txt \\
        [--cls-labels cls_labels.npy] [--saliency-root SaliencyMaps] --out shards/ \\
        [--shard-size 1000] [--workers 4] [--skip-bad]
    python -m hsc_fast.shard --coco-root COCO --coco-split train2014 --out shards/ [...]
    python -m hsc_fast.shard --verify shards/

A dataset source plugs in through :func:`write_shards`: a list of ``(id, item)`` pairs in shard
order and a builder turning one item into a raw sample (the tar writing, worker pool, temporary
folder, atomic publishing and index are shared).

Output: ``{out}/{name}-{000000}.tar`` (name = the list file's stem) with one sample per id
(members: see :mod:`hsc_fast.data.samples`; the JPEG is the original file, byte for byte) and
``{out}/index.json`` (ids, count, sha256 and size per shard, sources, hsc-fast version, skipped ids).

Guarantees:
  * nothing is published unless every sample is good (or ``--skip-bad``, which leaves the bad ids
    out and lists them in index.json): shards are built in a temporary folder inside ``out`` and
    moved in place one by one (atomic renames), index.json last;
  * a rerun gives byte-identical files (fixed tar header fields, member order, mtime 0);
  * ``--verify`` re-reads every shard: sha256, tar structure, the ids of the index, and that every
    member decodes (JPEG, label PNG values, JSON class list, saliency image). Exit 1 on a problem.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hsc_fast.io import atomic_write_text
from hsc_fast import __version__
from hsc_fast.classes import VOC, ClassSet, from_index
from hsc_fast.data import samples as S
from hsc_fast.data.folder import FolderDataset
from hsc_fast.errors import DataError
from hsc_fast.data.voc import read_id_list, safe_join

INDEX_NAME = "index.json"
INDEX_FORMAT = "hsc-fast-shards/1"
TAR_MTIME = 0  # fixed header fields make reruns byte-identical


# -------------------------------------------------------------------------------------- writing
def _tar_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def write_tar(path: Path, samples: Sequence[dict]) -> None:
    """Write ``samples`` (raw sample dicts) as a deterministic tar at ``path``."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for sample in samples:
            for name in S.MEMBERS:
                if sample.get(name) is not None:
                    _tar_member(tf, f"{sample[S.KEY]}.{name}", sample[name])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_BUILD: Optional[Callable[[Any], dict]] = None  # one per pool worker: item -> raw sample dict


class _VocBuilder:
    """A VOC item (its id) -> its raw sample: FolderDataset.raw_sample with the mask, fully validated."""

    def __init__(self, dataset: FolderDataset):
        self.dataset = dataset

    def __call__(self, image_id: str) -> dict:
        return self.dataset.raw_sample(image_id, with_mask=True, validate=True)


def _voc_builder(*dataset_args) -> _VocBuilder:
    """Each pool worker builds its own FolderDataset (labels loaded once per worker, not pickled)."""
    return _VocBuilder(FolderDataset(*dataset_args))


def _init_worker(factory: Callable, factory_args: tuple) -> None:
    global _BUILD
    _BUILD = factory(*factory_args)


def _build_shard(job: tuple) -> dict:
    """Validate and write one shard into the temp folder; returns its index entry and bad ids.
    With bad ids and no ``skip_bad`` the tar is not written (the run will fail anyway)."""
    number, file_name, items, tmp_dir, skip_bad = job
    good, bad = [], []
    for image_id, item in items:
        try:
            good.append(_BUILD(item))
        except DataError as e:
            bad.append({"id": image_id, "error": str(e)})
    entry = {"file": file_name, "ids": [s[S.KEY] for s in good], "count": len(good)}
    if bad and not skip_bad:
        return {"number": number, "entry": entry, "bad": bad}
    path = Path(tmp_dir) / file_name
    write_tar(path, good)
    entry.update(sha256=sha256_file(path), bytes=path.stat().st_size)
    return {"number": number, "entry": entry, "bad": bad}


def _run_jobs(jobs: list, builder: Callable, factory: Callable, factory_args: tuple, workers: int, total: int,
              progress: bool) -> list:
    global _BUILD
    from tqdm import tqdm
    results = []
    with tqdm(total=total, unit="img", desc="shards", disable=not progress) as bar:
        if workers <= 1:
            _BUILD = builder
            for job in jobs:
                results.append(_build_shard(job))
                bar.update(len(job[2]))
        else:
            with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(factory, factory_args)) as pool:
                futures = {pool.submit(_build_shard, job): job for job in jobs}
                for fut in as_completed(futures):
                    results.append(fut.result())
                    bar.update(len(futures[fut][2]))
    return sorted(results, key=lambda r: r["number"])


def _old_shard_files(out: Path) -> list[str]:
    """Shard files a previous run listed in out/index.json (to remove the ones no longer used)."""
    try:
        return [e["file"] for e in json.loads((out / INDEX_NAME).read_text(encoding="utf-8"))["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _bad_summary(bad: list) -> str:
    lines = [f"  {b['error']}" for b in bad[:20]]
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    return f"{len(bad)} bad sample(s); nothing was written (use --skip-bad to leave them out):\n" + "\n".join(lines) + more


def shard_dataset(voc_root, id_list, out, *, sbd_root=None, cls_labels=None, saliency_root=None,
                  shard_size: int = 1000, workers: int = 1, skip_bad: bool = False, name: Optional[str] = None,
                  progress: bool = True) -> dict:
    """Write the shards of ``id_list`` into ``out``; returns the index dict (also written as index.json).

    Raises DataError naming every bad id and file (nothing published) unless ``skip_bad``.
    """
    if shard_size < 1:
        raise DataError(f"--shard-size {shard_size}: expected >= 1")
    ids = read_id_list(id_list)
    name = name or Path(id_list).stem
    S.check_key(name, f"{id_list}: shard name")
    dataset_args = (str(voc_root), ids, str(sbd_root) if sbd_root else None,
                    str(cls_labels) if cls_labels else None, str(saliency_root) if saliency_root else None)
    dataset = FolderDataset(*dataset_args)  # fail fast on bad roots / label file, before any worker starts
    return write_shards(
        out, name, [(i, i) for i in ids], _VocBuilder(dataset), _voc_builder, dataset_args,
        shard_size=shard_size, workers=workers, skip_bad=skip_bad, progress=progress,
        make_index=lambda results, bad: _make_index(name, results, bad, shard_size, dataset_args, id_list,
                                                    dataset.class_set))


def write_shards(out, name: str, items: Sequence[tuple], builder: Callable[[Any], dict], factory: Callable,
                 factory_args: tuple, *, shard_size: int, workers: int = 1, skip_bad: bool = False,
                 progress: bool = True, make_index: Callable[[list, list], dict]) -> dict:
    """The shared writer of every dataset source. ``items``: ``(id, item)`` pairs in shard order;
    ``builder(item)`` returns the raw sample (raising DataError for a bad one) in this process,
    ``factory(*factory_args)`` makes the same builder in each pool worker (``workers > 1``; both must
    pickle). Shards ``{name}-{k:06d}.tar`` of ``shard_size`` items are built in a temporary folder
    inside ``out`` and published atomically with ``make_index(results, bad)`` as index.json (last).
    Bad items: DataError listing them, nothing published, unless ``skip_bad``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=out, prefix=".hsc-shard-tmp-"))
    try:
        chunks = [list(items[i:i + shard_size]) for i in range(0, len(items), shard_size)]
        jobs = [(k, f"{name}-{k:06d}.tar", chunk, str(tmp_dir), skip_bad) for k, chunk in enumerate(chunks)]
        results = _run_jobs(jobs, builder, factory, factory_args, workers, len(items), progress)
        bad = [b for r in results for b in r["bad"]]
        if bad and not skip_bad:
            raise DataError(_bad_summary(bad))
        index = make_index(results, bad)
        _publish(out, tmp_dir, index)
        return index
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def base_index(name: str, results: list, skipped: list, shard_size: int, classes, members: Sequence[str],
               sources: dict, has_saliency: bool = False) -> dict:
    """The index.json of any source: shards from ``results`` (of :func:`write_shards`), its class set."""
    shards = [r["entry"] for r in results]
    return {
        "format": INDEX_FORMAT,
        "hsc_fast_version": __version__,
        "name": name,
        "count": sum(e["count"] for e in shards),
        "shard_size": shard_size,
        "classes": classes.to_json(),
        "has_saliency": has_saliency,
        "members": list(members),
        "sources": sources,
        "skipped": skipped,
        "shards": shards,
    }


def _make_index(name, results, bad, shard_size, dataset_args, id_list, classes) -> dict:
    voc_root, _, sbd_root, cls_labels, saliency_root = dataset_args
    absolute = lambda p: str(Path(p).resolve()) if p else None  # noqa: E731
    return base_index(
        name, results, bad, shard_size, classes,
        members=[m for m in S.MEMBERS if m != S.SALIENCY or saliency_root is not None],
        sources={"voc_root": absolute(voc_root), "sbd_root": absolute(sbd_root), "list": absolute(id_list),
                 "cls_labels": absolute(cls_labels), "saliency_root": absolute(saliency_root)},
        has_saliency=saliency_root is not None)


def _publish(out: Path, tmp_dir: Path, index: dict) -> None:
    """Move the shards in place (atomic renames), drop shards of an earlier run that are no longer
    listed, and write index.json last."""
    stale = set(_old_shard_files(out)) - {e["file"] for e in index["shards"]}
    for entry in index["shards"]:
        os.replace(tmp_dir / entry["file"], out / entry["file"])
    atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=1, sort_keys=True) + "\n")
    for file_name in stale:
        try:
            safe_join(out, file_name).unlink()
        except (OSError, DataError):
            pass


# ------------------------------------------------------------------------------------ verifying
def _check_member(key: str, ext: str, data: bytes, where: str, classes: ClassSet = VOC) -> None:
    if ext == S.IMAGE:
        S.open_jpeg(data, where)
    elif ext == S.LABELS:
        S.decode_labels(data, where, classes)
    elif ext == S.MASK:
        S.decode_mask(data, where, classes)
    elif ext == S.SALIENCY:
        S.open_saliency(data, where)
    else:
        raise DataError(f"{where}: unexpected member '.{ext}' (expected one of {', '.join(S.MEMBERS)})")


def _verify_tar(path: Path, expected_ids: list, problems: list, classes: ClassSet = VOC) -> int:
    """Check every member of one shard (labels and masks against ``classes``); returns the number
    of samples seen."""
    shard = path.name
    seen: list[str] = []
    members: dict[str, set] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                key, _, ext = info.name.partition(".")
                where = f"{shard}: {key}"
                if not info.isfile() or "/" in info.name:
                    problems.append({"shard": shard, "key": key, "problem": f"unexpected tar entry {info.name!r}"})
                    continue
                if not seen or seen[-1] != key:
                    seen.append(key)
                members.setdefault(key, set()).add(ext)
                try:
                    _check_member(key, ext, tf.extractfile(info).read(), where, classes)
                except DataError as e:
                    problems.append({"shard": shard, "key": key, "problem": str(e)})
    except (tarfile.TarError, EOFError, OSError) as e:
        problems.append({"shard": shard, "key": seen[-1] if seen else None,
                         "problem": f"unreadable or truncated tar ({type(e).__name__}: {e})"})
    for key in seen:
        for need in (S.IMAGE, S.LABELS):
            if need not in members[key]:
                problems.append({"shard": shard, "key": key, "problem": f"missing member '{need}'"})
    if seen != list(expected_ids):
        missing = [i for i in expected_ids if i not in set(seen)]
        extra = [k for k in seen if k not in set(expected_ids)]
        problems.append({"shard": shard, "key": (missing or extra or [None])[0],
                         "problem": f"ids differ from index.json: {len(missing)} missing, {len(extra)} unexpected"
                                    + ("" if missing or extra else ", order differs")})
    return len(seen)


def _report_unlisted(directory: Path, listed: set, problems: list) -> None:
    """A .tar beside index.json that the index does not list (a stale or stray shard: a brace URL
    over the folder would train on it) is reported with its first key."""
    for path in sorted(directory.glob("*.tar")):
        if path.name in listed:
            continue
        try:
            with tarfile.open(path, "r:") as tf:
                first = next(iter(tf), None)
            key = first.name.partition(".")[0] if first is not None else None
        except (tarfile.TarError, EOFError, OSError):
            key = None
        problems.append({"shard": path.name, "key": key, "problem": "shard file is not listed in index.json"})


def verify_shards(directory) -> dict:
    """Re-read every shard listed in ``directory``/index.json, decoding labels and masks with the
    class set the index records (VOC, COCO, ...). Report:
    ``{"ok", "directory", "shards", "samples", "problems": [{"shard", "key", "problem"}]}``."""
    directory = Path(directory)
    index_path = directory / INDEX_NAME
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        entries = index["shards"]
        assert isinstance(entries, list)
    except (OSError, ValueError, KeyError, TypeError, AssertionError, RecursionError) as e:
        raise DataError(f"{index_path}: not a readable shard index ({str(e)[:200]})") from e
    classes = from_index(index, str(index_path))  # VOC for indexes written before the key
    problems: list[dict] = []
    n_samples = 0
    for entry in entries:
        file_name = entry.get("file", "")
        try:
            path = safe_join(directory, file_name)
        except DataError as e:
            problems.append({"shard": file_name, "key": None, "problem": str(e)})
            continue
        if not path.is_file():
            ids = entry.get("ids") or [None]
            problems.append({"shard": file_name, "key": ids[0],
                             "problem": f"shard file listed in index.json is missing (its {len(ids)} ids are lost)"})
            continue
        digest = sha256_file(path)
        if digest != entry.get("sha256"):
            problems.append({"shard": file_name, "key": None,
                             "problem": f"sha256 {digest[:16]}... differs from index.json {str(entry.get('sha256'))[:16]}..."})
        n_samples += _verify_tar(path, entry.get("ids", []), problems, classes)
    _report_unlisted(directory, {e.get("file") for e in entries}, problems)
    return {"ok": not problems, "directory": str(directory), "shards": len(entries), "samples": n_samples,
            "problems": problems}
