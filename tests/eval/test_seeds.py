"""CAM inference invariants on tiny fake models, file outputs, resume, CRF label mapping, 2-rank split."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hsc_fast.config import RunConfig, SeedConfig
from hsc_fast.crf import CrfParams
from hsc_fast.errors import ConfigError, WeightsError
from hsc_fast.eval.evaluate import evaluate, read_cam_file, seeds_from_cams
from hsc_fast.eval.seeds import PseudoLabelParams, SeedJob, crf_input, crf_label, infer_cam_files, label_from_crf, load_cam_model, multiscale_cam, open_samples, run_cam_stage, split_ids, write_labels
from hsc_fast.cli.make_seeds import main
from hsc_fast.data.voc import read_label_png, write_label_png

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class FakeCam(torch.nn.Module):
    """forward_cam(x) = conv(x) at 1/stride resolution (forward: {"cam": that}); with a
    mirror-symmetric kernel and stride 1 it is exactly flip-equivariant. Counts its CAM passes."""

    def __init__(self, kernel=3, stride=1, symmetric=False, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(21, 3, kernel, kernel, generator=g)
        if symmetric:
            w = (w + w.flip(-1)) / 2
        self.conv = torch.nn.Conv2d(3, 21, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.conv.weight.data.copy_(w)
        self.calls = 0

    def forward_cam(self, x):
        self.calls += 1
        return self.conv(x) * 2.0

    def forward(self, x):
        return {"cam": self.forward_cam(x)}


def _image(h=37, w=53, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _label(*classes):
    v = np.zeros(20, np.float32)
    v[list(classes)] = 1
    return v


def reference_cam(model, image, label, scales, flip, cam_fn=lambda model, x: model.forward_cam(x)):
    """The recipe written out plainly (HSC inference.py): per scale and flip one pass of the CAM path,
    PIL bicubic, normalise in float64 then cast, softmax, upsample."""
    h, w = image.shape[:2]
    total = np.zeros((20, h, w), np.float64)
    for s in scales:
        im = Image.fromarray(image).resize((round(w * s), round(h * s)), Image.BICUBIC)
        x = ((np.asarray(im) / 255.0 - np.array(MEAN)) / np.array(STD)).astype(np.float32)
        views = [x, x[:, ::-1]] if flip else [x]
        for j, v in enumerate(views):
            t = torch.from_numpy(np.ascontiguousarray(v.transpose(2, 0, 1)))[None]
            with torch.no_grad():
                logits = cam_fn(model, t)
            p = F.interpolate(torch.softmax(logits, 1), size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
            if j == 1:
                p = p[:, :, ::-1]
            total += p[:20] * label[:, None, None]
    return total / (total.max(axis=(1, 2), keepdims=True) + 1e-5)


def test_matches_plain_reference_and_image_size():
    model = FakeCam(stride=2).eval()
    img, lab = _image(), _label(2, 14)
    ref = reference_cam(model, img, lab, (0.5, 1.0, 1.5, 2.0), True)
    model.calls = 0
    cams = multiscale_cam(model, img, lab, scales=(0.5, 1.0, 1.5, 2.0), flip=True)
    assert cams.shape == (20, 37, 53)
    assert np.allclose(cams.numpy(), ref, atol=1e-5)
    assert model.calls == 4                     # one batch (image + flip) per scale
    c = cams.numpy()
    assert np.all(c[[i for i in range(20) if i not in (2, 14)]] == 0)
    assert np.allclose(c[[2, 14]].max(axis=(1, 2)), 1.0, atol=1e-4)


def test_flip_averaging():
    img, lab = _image(seed=1), _label(0, 7, 19)
    # any model: CAMs of the mirrored image are the mirrored CAMs (both orientations are averaged)
    model = FakeCam(stride=2, seed=3).eval()
    a = multiscale_cam(model, img, lab, scales=(1.0, 1.5), flip=True)
    b = multiscale_cam(model, np.ascontiguousarray(img[:, ::-1]), lab, scales=(1.0, 1.5), flip=True)
    assert np.allclose(a.numpy(), b.flip(-1).numpy(), atol=1e-4)
    # a flip-equivariant model: adding the flipped input changes nothing after normalisation,
    # and a mirror-symmetric image gives mirror-symmetric CAMs
    sym = FakeCam(symmetric=True, seed=4).eval()
    with_flip = multiscale_cam(sym, img, lab, scales=(1.0,), flip=True)
    without = multiscale_cam(sym, img, lab, scales=(1.0,), flip=False)
    assert np.allclose(with_flip.numpy(), without.numpy(), atol=1e-4)
    mirror = np.concatenate([img, img[:, ::-1]], axis=1)
    m = multiscale_cam(sym, mirror, lab, scales=(1.0,), flip=False).numpy()
    assert np.allclose(m, m[:, :, ::-1], atol=1e-5)
    # a model that is NOT flip-equivariant really is affected by the flip option
    assert not np.allclose(multiscale_cam(model, img, lab, scales=(1.0,), flip=False).numpy(),
                           multiscale_cam(model, img, lab, scales=(1.0,), flip=True).numpy(), atol=1e-3)


def test_cam_inference_runs_the_cam_path_only(fixtures_dir):
    """A real CamNet with PCM and both projectors: multiscale_cam never calls them, and its CAMs
    equal the recipe run pass by pass through the whole training forward's "cam" output."""
    from hsc_fast.models.backbones import build_backbone
    from hsc_fast.models.cam_net import CamNet
    torch.manual_seed(0)
    net = CamNet(build_backbone("resnet38", width_div=16), pcm=True, projectors=True).eval()
    calls = []
    for part in (net.pcm, net.psc_proj, net.rsc_proj):
        part.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    photo = Image.open(fixtures_dir / "voc" / "JPEGImages" / "2007_000032.jpg").convert("RGB")
    img, lab = np.asarray(photo.resize((100, 56), Image.BICUBIC)), _label(0, 14)
    cams = multiscale_cam(net, img, lab, scales=(0.5, 1.0, 1.5, 2.0), flip=True).numpy()
    assert calls == []
    ref = reference_cam(net, img, lab, (0.5, 1.0, 1.5, 2.0), True, cam_fn=lambda m, x: m(x)["cam"])
    assert len(calls) == 3 * 8                      # the hooks do fire on the training forward
    np.testing.assert_allclose(cams, ref, rtol=0, atol=1e-6)   # measured <= 3.2e-7
    keys = np.array([0, 14])
    for t in (0.1, 0.22, 0.4):                      # the seeds are the same label maps
        assert np.array_equal(seeds_from_cams(keys, cams[keys], t), seeds_from_cams(keys, ref[keys].astype(np.float32), t))


def test_cam_inference_needs_forward_cam():
    class DictOnly(torch.nn.Module):
        def forward(self, x):
            return {"cam": x}
    with pytest.raises(ConfigError, match="forward_cam"):
        multiscale_cam(DictOnly(), _image(), _label(1), scales=(1.0,))


def _voc_tree(root, n=5, size=(24, 32)):
    """A tiny VOC-style tree: JPEGImages, SegmentationClass, cls_labels.json, train list."""
    rng = np.random.default_rng(7)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    ids, labels = [], {}
    for i in range(n):
        key = f"2011_{i:06d}"
        h, w = size[0] + i, size[1] + 2 * i
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{key}.jpg")
        classes = sorted(rng.choice(np.arange(1, 21), size=1 + i % 3, replace=False).tolist())
        gt = np.zeros((h, w), np.uint8)
        for j, c in enumerate(classes):
            gt[:, j * w // 4:(j + 1) * w // 4] = c
        gt[0] = 255
        write_label_png(root / "SegmentationClass" / f"{key}.png", gt)
        labels[key] = classes
        ids.append(key)
    (root / "cls_labels.json").write_text(json.dumps(labels))
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    return ids, labels


def _job(root, out, ids, **kw):
    root = Path(root)
    cfg = RunConfig()
    cfg.seeds.scales = [0.5, 1.0]
    return SeedJob(cfg=cfg, data=str(root), out=str(out), ids=ids, cls_labels=str(root / "cls_labels.json"),
                   progress=False, **kw)


def test_cam_files_only_present_classes_and_resume(tmp_path):
    ids, labels = _voc_tree(tmp_path / "voc")
    out = tmp_path / "out"
    model = FakeCam(stride=2).eval()
    job = _job(tmp_path / "voc", out, ids)
    assert run_cam_stage(job, model, "cpu") == len(ids)
    for key in ids:
        keys, cams = read_cam_file(out / "cam_npy" / f"{key}.npy")
        assert keys.tolist() == [c - 1 for c in labels[key]]
        assert cams.shape[1:] == read_label_png(tmp_path / "voc" / "SegmentationClass" / f"{key}.png").shape
        assert np.allclose(cams.max(axis=(1, 2)), 1.0, atol=1e-4)
    # resume: complete outputs are skipped; a deleted one is redone; a stale temp file is ignored
    os.remove(out / "cam_npy" / f"{ids[2]}.npy")
    (out / "cam_npy" / f".{ids[3]}.npy.tmp123").write_bytes(b"partial")
    before = {k: (out / "cam_npy" / f"{k}.npy").stat().st_mtime_ns for k in ids if k != ids[2]}
    model.calls = 0
    assert run_cam_stage(job, model, "cpu") == 1
    assert model.calls == len(job.cfg.seeds.scales)
    assert all((out / "cam_npy" / f"{k}.npy").stat().st_mtime_ns == t for k, t in before.items())
    assert (out / "cam_npy" / f"{ids[2]}.npy").is_file()


def test_npz_fp16_and_folder_loader_workers(tmp_path):
    ids, _ = _voc_tree(tmp_path / "voc", n=3)
    cfg = SeedConfig(scales=[1.0], fp16=True)
    samples = open_samples(tmp_path / "voc", ids, cls_labels=str(tmp_path / "voc" / "cls_labels.json"), workers=1)
    n = infer_cam_files(FakeCam().eval(), samples, tmp_path / "cams", cfg, fmt="npz")
    assert n == 3
    with np.load(tmp_path / "cams" / f"{ids[0]}.npz", allow_pickle=False) as z:
        assert z["cams"].dtype == np.float16 and z["keys"].dtype == np.int64


def test_split_ids_each_once():
    ids = [str(i) for i in range(11)]
    parts = [split_ids(ids, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(ids) and sum(map(len, parts)) == 11


def test_crf_label_mapping_and_uncertain():
    keys = np.array([4, 9])
    cams = np.array([[[0.9, 0.1, 0.5]], [[0.2, 0.8, 0.45]]], np.float32)   # (2, 1, 3)
    img = np.zeros((1, 3, 3), np.uint8)
    probs = crf_input(keys, cams, alpha=1.0)
    assert np.allclose(probs[0], [[0.1, 0.2, 0.5]])                        # bg first: 1 - max fg
    assert label_from_crf(keys, probs).tolist() == [[5, 10, 0]]            # 3rd pixel: bg ties class 4 -> bg
    assert label_from_crf(keys, probs, uncertain_margin=0.1).tolist() == [[5, 10, 255]]
    # zero mean-field iterations: the CRF returns its (normalised, clipped) input -> same argmax
    lab = crf_label(img, keys, cams, PseudoLabelParams(alpha=1.0, crf=CrfParams(iters=0)))
    assert lab.tolist() == [[5, 10, 0]]
    assert crf_label(img, np.zeros(0, np.int64), np.zeros((0, 1, 3), np.float32), PseudoLabelParams()).tolist() == [[0, 0, 0]]


def test_write_labels_seeds_crf_overlays(tmp_path):
    ids, _ = _voc_tree(tmp_path / "voc", n=3)
    job = _job(tmp_path / "voc", tmp_path / "out", ids)
    run_cam_stage(job, FakeCam(stride=2).eval(), "cpu")
    out = tmp_path / "out"
    samples = open_samples(job.data, ids, cls_labels=job.cls_labels)
    n = write_labels(samples, out / "cam_npy", out, threshold=0.3, crf=PseudoLabelParams(alpha=2.0, crf=CrfParams(iters=0)),
                     overlays=2)
    assert n == 3
    images = {}
    for key in ids:
        keys, cams = read_cam_file(out / "cam_npy" / f"{key}.npy")
        seed = read_label_png(out / "seeds" / f"{key}.png")
        assert np.array_equal(seed, seeds_from_cams(keys, cams, 0.3))
        crf = read_label_png(out / "pseudo_labels" / f"{key}.png")
        bg = (1 - cams.max(0)) ** 2
        probs = np.clip(np.concatenate([bg[None], cams]), 1e-5, 1)
        assert np.array_equal(crf, np.concatenate([[0], keys + 1])[probs.argmax(0)])
        images[key] = np.array(Image.open(tmp_path / "voc" / "JPEGImages" / f"{key}.jpg").convert("RGB"))
    assert len(list((out / "overlays").glob("*.jpg"))) == 2
    # real mean-field iterations in 2 CRF processes == one image at a time, in order
    p = PseudoLabelParams(alpha=4.0, crf=CrfParams(iters=3))
    write_labels(open_samples(job.data, ids, cls_labels=job.cls_labels), out / "cam_npy", out, crf=p, workers=2)
    for key in ids:
        keys, cams = read_cam_file(out / "cam_npy" / f"{key}.npy")
        assert np.array_equal(read_label_png(out / "pseudo_labels" / f"{key}.png"),
                              crf_label(images[key], keys, cams, p))


def test_load_cam_model(tmp_path, monkeypatch):
    import hsc_fast.models as models
    monkeypatch.setattr(models, "build_cam_model", lambda cfg, load_weights=True: FakeCam(seed=5), raising=False)
    src = FakeCam(seed=9)
    (tmp_path / "run" / "final").mkdir(parents=True)
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "run" / "final" / "model.pt")
    m = load_cam_model(RunConfig().model, tmp_path / "run")
    assert torch.equal(m.conv.weight, src.conv.weight) and not m.training
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="conv.weight"):
        load_cam_model(RunConfig().model, tmp_path / "bad.pt")
    torch.save({"conv.weight": object()}, tmp_path / "pickle.pt")   # not loadable with weights_only
    with pytest.raises(WeightsError):
        load_cam_model(RunConfig().model, tmp_path / "pickle.pt")


def test_cli_cam_then_sweep(tmp_path, monkeypatch):
    import hsc_fast.models as models
    monkeypatch.setattr(models, "build_cam_model", lambda cfg, load_weights=True: FakeCam(stride=2), raising=False)
    ids, _ = _voc_tree(tmp_path / "voc", n=3)
    ck = tmp_path / "model.pt"
    torch.save(FakeCam(stride=2).state_dict(), ck)
    common = ["--data", str(tmp_path / "voc"), "--out", str(tmp_path / "out"), "--scales", "1.0",
              "--cls-labels", str(tmp_path / "voc" / "cls_labels.json"), "--workers", "0", "--no-progress"]
    assert main(common + ["--stage", "cam", "--checkpoint", str(ck)]) == 0
    assert main(common + ["--stage", "sweep", "--set", "seeds.thresholds=0.0:0.6:0.1"]) == 0
    sweep = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert len(sweep["curve"]) == 6 and (tmp_path / "out" / "sweep.png").is_file()
    seeds = evaluate(tmp_path / "voc" / "SegmentationClass", pred_dir=tmp_path / "out" / "seeds", ids=ids)
    assert seeds["miou"] == pytest.approx(sweep["best"]["miou"])   # seeds written at the best threshold
    assert main(common + ["--stage", "cam"]) == 2                    # no checkpoint -> clear error, exit 2


def _two_rank_worker(rank, world, init_file, root, out, ids, result_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sizes = []

        class Recorder(FakeCam):
            def forward_cam(self, x):
                sizes.append(tuple(x.shape[-2:]))
                return super().forward_cam(x)
        job = _job(root, out, ids)
        n = run_cam_stage(job, Recorder(stride=2).eval(), "cpu")
        # every image of the tree has its own size: the full-scale inputs tell which ids this rank ran
        by_size = {Image.open(os.path.join(root, "JPEGImages", f"{k}.jpg")).size[::-1]: k for k in ids}
        seen = [by_size[s] for s in sizes if s in by_size]
        res = evaluate(os.path.join(root, "SegmentationClass"), cam_dir=os.path.join(out, "cam_npy"), ids=ids,
                       thresholds="0.0:0.6:0.1")
        with open(f"{result_file}.{rank}", "w") as f:
            json.dump({"n": n, "ids": seen, "curve": res["curve"]}, f)
        # Both ranks leave the last collective before either tears gloo down: once (one full CI run
        # of several; 0 of 9 single runs) both ranks aborted with "terminate called without an
        # active exception" at teardown; a gloo race at destroy is the likely cause, not proven.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
def test_cuda_bf16_matches_cpu():
    model = FakeCam(stride=2).eval()
    img, lab = _image(), _label(3, 11)
    cpu = multiscale_cam(model, img, lab, scales=(0.5, 1.0, 2.0), flip=True)
    gpu = multiscale_cam(model.cuda(), img, lab, scales=(0.5, 1.0, 2.0), flip=True, device="cuda")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    assert torch.allclose(gpu.cpu(), cpu, atol=2e-2)             # bf16 autocast of the model only
    exact = multiscale_cam(model, img, lab, scales=(0.5, 1.0, 2.0), flip=True, device="cuda", amp=False)
    assert torch.allclose(exact.cpu(), cpu, atol=1e-4)
