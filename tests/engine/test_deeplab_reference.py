"""The official DeepLab test path against my re-derivation of the authors' (HSC `segmentation/`:
experiment/test.py, datasets/transform.py Multiscale + ImageNorm, utils/DenseCRF.py
dense_crf_from_deeplabv2, utils/imutils.img_denorm), written from reading that code, on the real
fixture photos with identical random weights: probabilities within float32 noise, label maps exact,
with and without CRF. And the authors' training optimiser groups, BN mode and poly schedule."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

cv2 = pytest.importorskip("cv2")

from hsc_fast.config import load_config  # noqa: E402
from hsc_fast.crf import DEEPLAB_TEST, crf_imap  # noqa: E402
from hsc_fast.data.seg_set import crf_image, predict_probs, seg_augment  # noqa: E402
from hsc_fast.engine.deeplab_trainer import deeplab_optim_config, predict_options  # noqa: E402
from hsc_fast.engine.optim import PolySchedule, build_optimizer  # noqa: E402
from hsc_fast.models.deeplab import DeepLab  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
PHOTOS = ("2007_000032", "2007_000033")


# ------------------------------------------------------------------- the authors' test path, re-derived
def authors_normalise(rgb):
    image = rgb.astype(np.float32)
    for c in range(3):
        image[..., c] = (image[..., c] / 255 - MEAN[c]) / STD[c]
    return image


def authors_denorm_chw(x):
    x = np.ascontiguousarray(x).copy()
    for c in range(3):
        x[c] = x[c] * STD[c] + MEAN[c]
    return x * 255


@torch.no_grad()
def authors_probs(net, rgb):
    """One pass per scale and flip (batch 1), each upsampled (align_corners=True) and flipped back,
    the mean of the 12 logit maps, softmax; the CRF image de-normalised from the full-size tensor."""
    image = authors_normalise(rgb)
    h, w = rgb.shape[:2]
    passes = []
    for rate in SCALES:
        t = torch.from_numpy(cv2.resize(image, None, fx=rate, fy=rate, interpolation=cv2.INTER_CUBIC)
                             .transpose(2, 0, 1).copy())[None]
        passes += [t, torch.flip(t, [3])]
    outs = []
    for i, t in enumerate(passes):
        o = F.interpolate(net(t), (h, w), mode="bilinear", align_corners=True)
        outs.append(torch.flip(o, [3]) if i % 2 == 1 else o)
    prob = F.softmax(torch.mean(torch.cat(outs, 0), 0, keepdim=True), 1)[0]
    crf_img = authors_denorm_chw(image.transpose(2, 0, 1)).astype(np.uint8)
    return prob, crf_img


def authors_crf_labels(prob, img_chw):
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    from pydensecrf.utils import unary_from_softmax
    c, h, w = prob.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(prob)))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.transpose(img_chw, (1, 2, 0)).copy(order="C"), compat=4)
    return np.array(d.inference(10)).reshape((c, h, w)).argmax(0)


class TinySegNet(torch.nn.Module):
    """A small stride-8 network with the DeepLab forward contract (logits upsampled to the input
    with align_corners=True): random weights give many classes and many near-ties."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(32, 21, 3, 1, 2, dilation=2))

    def forward(self, x):
        return F.interpolate(self.body(x) * 4, x.shape[-2:], mode="bilinear", align_corners=True)


@pytest.fixture(scope="module")
def photos(fixtures_dir):
    from PIL import Image
    return {k: np.array(Image.open(fixtures_dir / "voc" / "JPEGImages" / f"{k}.jpg").convert("RGB")) for k in PHOTOS}


@pytest.fixture(scope="module")
def official():
    return predict_options(load_config("configs/deeplab.yaml", []))


def crf_labels(img, probs):
    return next(iter(crf_imap([(img, probs)], workers=1, backend="pydensecrf", return_labels=True,
                              **DEEPLAB_TEST.kwargs())))


def test_official_test_path_equals_the_authors_on_real_photos(photos, official):
    net = TinySegNet().eval()
    cfg = load_config("configs/deeplab.yaml", [])
    for key, img in photos.items():
        ref, ref_img = authors_probs(net, img)
        ours = predict_probs(net, img, scales=cfg.deeplab.test_scales, flip=True, **official)
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)   # float32: summation order only
        labels = ref.argmax(0)
        assert len(labels.unique()) > 3, "a test that can fail: several classes compete"
        assert torch.equal(ours.argmax(0), labels), key
        ours_img = crf_image(img, cfg.deeplab.crf_image)
        assert np.array_equal(ours_img, ref_img.transpose(1, 2, 0)) and not np.array_equal(ours_img, img)
        np.testing.assert_array_equal(crf_labels(ours_img, ours.numpy()), authors_crf_labels(ref.numpy(), ref_img))


def test_our_test_path_differs_from_the_authors(photos):
    """The kept variant (bilinear to the ceiling size, mean of softmaxes, align_corners=False) is a
    different computation: its labels disagree on part of each photo."""
    net = TinySegNet().eval()
    for img in photos.values():
        ref, _ = authors_probs(net, img)
        old = predict_probs(net, img, scales=SCALES, flip=True)
        assert (old.argmax(0) != ref.argmax(0)).float().mean() > 0.001


def test_cv2_scales_round_like_the_authors():
    img = np.random.default_rng(0).integers(0, 256, (281, 500, 3), dtype=np.uint8)
    sizes = []
    net = lambda x: (sizes.append(tuple(x.shape[-2:])), torch.zeros(x.shape[0], 21, *x.shape[-2:]))[1]  # noqa: E731
    predict_probs(net, img, scales=[0.75, 1.25], flip=False, resize="cv2_cubic")
    assert sizes == [(211, 375), (351, 625)]   # 281 * 0.75 = 210.75 -> 211 (ours: ceil 211); 351.25 -> 351
    sizes.clear()
    predict_probs(net, img, scales=[1.25], flip=False)
    assert sizes == [(352, 625)]


# ------------------------------------------------------------------------------------ training recipe
def authors_groups(model):
    """get_parameter_groups: Conv2d modules only; new layers = the head's convs."""
    new = set(model.head.modules())
    groups = ([], [], [], [])
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            if m.weight.requires_grad:
                groups[2 if m in new else 0].append(m.weight)
            if m.bias is not None and m.bias.requires_grad:
                groups[3 if m in new else 1].append(m.bias)
    return groups


def test_optimiser_groups_bn_mode_and_poly_are_the_authors():
    cfg = load_config("configs/deeplab.yaml", ["deeplab.backbone=resnet18", "deeplab.allow_random_init=true"])
    dl = cfg.deeplab
    model = DeepLab(dl.backbone, dl.head, frozen_bn=dl.frozen_bn, align_corners=dl.align_corners,
                    head_bn_momentum=dl.head_bn_momentum, bn_affine_trained=dl.bn_affine_trained,
                    lr_groups=dl.lr_groups).train()
    opt_cfg = deeplab_optim_config(cfg)
    opt = build_optimizer(model, opt_cfg)
    lr, wd = dl.lr, dl.weight_decay
    expected = [(g, m * lr, d) for g, m, d in zip(authors_groups(model), (1, 2, 10, 20), (wd, 0, wd, 0)) if g]
    assert len(opt.param_groups) == len(expected) == 3   # torchvision convs carry no bias: the 2x group is empty
    for group, (params, g_lr, g_wd) in zip(opt.param_groups, expected):
        assert [id(p) for p in group["params"]] == [id(p) for p in params]
        assert group["lr"] == pytest.approx(g_lr) and group["weight_decay"] == g_wd and group["momentum"] == 0.9
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.training for m in bns)
    assert not any(id(p) in in_opt for m in bns for p in m.parameters())
    assert {m.momentum for m in model.head.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {3e-4}
    stem_bn = model.backbone[1]
    before = stem_bn.running_mean.clone()
    model(torch.randn(2, 3, 40, 40))
    assert not torch.equal(stem_bn.running_mean, before)   # batch statistics, running stats updated
    schedule = PolySchedule(opt, dl.poly_power, opt_cfg.poly_steps)
    for itr in range(dl.max_steps):
        if itr in (0, 1, dl.max_steps // 2, dl.max_steps - 1):
            assert opt.param_groups[0]["lr"] == pytest.approx(lr * (1 - itr / (dl.max_steps + 1)) ** 0.9, rel=1e-12)
        schedule.step()
    ours = load_config("configs/deeplab.yaml", ["deeplab.poly_plus_one=false"])
    assert deeplab_optim_config(ours).poly_steps == dl.max_steps
    # deeplab.backbone_lr_mult scales the backbone's groups only (1.0: the authors')
    slow = load_config("configs/deeplab.yaml", ["deeplab.backbone_lr_mult=0.01"])
    scaled = build_optimizer(model, deeplab_optim_config(slow)).param_groups
    want = {"weight": 0.01 * lr, "bias": 0.02 * lr, "new_weight": 10 * lr, "new_bias": 20 * lr}
    assert {g["name"]: g["lr"] for g in scaled} == pytest.approx({g["name"]: want[g["name"]] for g in scaled})
    assert [[id(p) for p in g["params"]] for g in scaled] == [[id(p) for p in g["params"]] for g in opt.param_groups]


def test_training_augmentation_follows_the_authors(photos):
    """HSV + flip + cv2 cubic/nearest + float32 normalisation + random placement: equal to the
    authors' transforms driven by the same draws."""
    img = photos["2007_000032"]
    label = (np.arange(img.shape[0] * img.shape[1]) % 21).reshape(img.shape[:2]).astype(np.uint8)
    for seed in range(4):
        x, y = seg_augment(img, label, np.random.default_rng(seed), crop=321, scale_range=[0.5, 1.5],
                           hsv=(10, 10, 10), interp="cv2_cubic", placement="random")
        rng = np.random.default_rng(seed)   # the same draws, in the order seg_augment takes them
        dh, ds, dv = (int(rng.integers(-10, 11)) for _ in range(3))
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.int32)
        hsv = np.stack([(hsv[..., 0] + dh) % 180, np.clip(hsv[..., 1] + ds, 0, 255),
                        np.clip(hsv[..., 2] + dv, 0, 255)], -1).astype(np.uint8)
        image, seg = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), label
        scale = rng.uniform(0.5, 1.5)
        if rng.random() < 0.5:
            image, seg = np.flip(image, 1), np.flip(seg, 1)
        image = cv2.resize(np.ascontiguousarray(image), None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        seg = cv2.resize(np.ascontiguousarray(seg), None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        image = authors_normalise(image)
        out_img, out_seg = np.zeros((321, 321, 3), np.float32), np.full((321, 321), 255.0, np.float32)
        (h, w), place = image.shape[:2], []
        for size in (h, w):
            space, n = size - 321, min(size, 321)
            off = int(rng.integers(0, abs(space) + 1))
            place.append((slice(off, off + n), slice(0, n)) if space > 0 else (slice(0, n), slice(off, off + n)))
        (sy, dy), (sx, dx) = place
        out_img[dy, dx], out_seg[dy, dx] = image[sy, sx], seg[sy, sx]
        torch.testing.assert_close(x, torch.from_numpy(out_img.transpose(2, 0, 1)), atol=0, rtol=0)
        assert torch.equal(y, torch.from_numpy(out_seg.astype(np.int64)))
