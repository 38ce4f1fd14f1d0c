"""PSA affinity targets (pair sets) and the balanced affinity loss."""
import itertools
import math

import pytest
import torch

from hsc_fast.errors import DataError
from hsc_fast.losses.affinity import affinity_loss, affinity_targets, downsample_labels
from hsc_fast.ops.random_walk import pair_offsets


def test_hand_built_label_map_has_the_counted_pairs():
    # 0 0 1      radius 2: pairs (0,1) (1,-1) (1,0) (1,1); counted by hand:
    # 0 X 1      bg-bg 3, fg-fg 1, different 2 (X = 255 takes no part)
    label = torch.tensor([[[0, 0, 1], [0, 255, 1]]])
    bg, fg, neg = affinity_targets(label, 2)
    assert bg.shape == (1, 4, 2, 3)
    assert (int(bg.sum()), int(fg.sum()), int(neg.sum())) == (3, 1, 2)
    assert bg[0, 0, 0, 0] and neg[0, 0, 0, 1] and bg[0, 1, 0, 1] and fg[0, 2, 0, 2] and neg[0, 3, 0, 1]
    assert not (bg & fg).any() and not (bg & neg).any() and not (fg & neg).any()


def brute_force_counts(label, radius, bg=0):
    """Every unordered in-image pair at distance < radius, classified directly."""
    h, w = label.shape
    counts = {"bg": 0, "fg": 0, "neg": 0}
    pixels = list(itertools.product(range(h), range(w)))
    for (y0, x0), (y1, x1) in itertools.combinations(pixels, 2):
        if (y1 - y0) ** 2 + (x1 - x0) ** 2 >= radius * radius:
            continue
        a, b = int(label[y0, x0]), int(label[y1, x1])
        if 255 in (a, b):
            continue
        counts["neg" if a != b else "bg" if a == bg else "fg"] += 1
    return counts


@pytest.mark.parametrize("radius", [2, 3, 5])
def test_pair_sets_equal_a_brute_force_count(radius):
    g = torch.Generator().manual_seed(radius)
    label = torch.randint(0, 3, (2, 7, 9), generator=g)
    label[label == 2] = 255
    label[1, 2:5, 3:6] = 7
    bg, fg, neg = affinity_targets(label, radius)
    for i in range(2):
        want = brute_force_counts(label[i], radius)
        assert (int(bg[i].sum()), int(fg[i].sum()), int(neg[i].sum())) == (want["bg"], want["fg"], want["neg"])


def test_psa_crop_keeps_only_pairs_from_the_cropped_region():
    label = torch.zeros(1, 6, 12, dtype=torch.long)
    bg, _, _ = affinity_targets(label, 5, psa_crop=True)
    assert int(bg.sum()) == len(pair_offsets(5)) * (6 - 4) * (12 - 8)
    assert int(affinity_targets(label, 5)[0].sum()) > int(bg.sum())


def loop_loss(aff, bg, fg, neg, eps=1e-5):
    sums, counts = {"bg": 0.0, "fg": 0.0, "neg": 0.0}, {"bg": 0, "fg": 0, "neg": 0}
    for idx in itertools.product(*(range(s) for s in aff.shape)):
        a = float(aff[idx])
        for name, mask in (("bg", bg), ("fg", fg), ("neg", neg)):
            if mask[idx]:
                sums[name] += -math.log(1 + eps - a) if name == "neg" else -math.log(a + eps)
                counts[name] += 1
    parts = {k: sums[k] / (counts[k] + eps) for k in sums}
    return parts["bg"] / 4 + parts["fg"] / 4 + parts["neg"] / 2, parts


def test_loss_equals_a_python_loop_over_pairs():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (2, 4, 5), generator=g)
    label[label == 3] = 255
    targets = affinity_targets(label, 3)
    aff = torch.rand(2, len(pair_offsets(3)), 4, 5, generator=g, dtype=torch.float64)
    aff[0, 0, 0, 0] = 1.0                          # log(1 + eps - 1) = log(eps): still finite
    total, parts = affinity_loss(aff, targets)
    want_total, want_parts = loop_loss(aff, *targets)
    assert float(total) == pytest.approx(want_total, rel=1e-12)
    for k in ("bg", "fg", "neg"):
        assert float(parts[k]) == pytest.approx(want_parts[k], rel=1e-12)
        assert int(parts[f"{k}_count"]) == int(targets[("bg", "fg", "neg").index(k)].sum())


def test_empty_sets_give_zero_and_gradients_stay_finite():
    label = torch.zeros(1, 4, 4, dtype=torch.long)          # all background: no fg, no neg pairs
    targets = affinity_targets(label, 3)
    aff = torch.zeros(1, len(pair_offsets(3)), 4, 4, requires_grad=True)   # a = 0 on positives
    total, parts = affinity_loss(aff, targets)
    assert parts["fg"] == 0 and parts["neg"] == 0 and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(aff.grad).all()
    with pytest.raises(DataError, match="three masks"):
        affinity_loss(aff[:, :2], targets)
    with pytest.raises(DataError, match="integer"):
        affinity_targets(label.float(), 3)


def test_affinity_net_trains_through_pairwise_affinity_and_the_loss():
    """The pieces fit: AffinityNet features -> pairwise_affinity -> targets/loss -> head gradients."""
    from hsc_fast.models.affinity import build_affinity_net
    from hsc_fast.ops.random_walk import pairwise_affinity

    torch.manual_seed(0)
    net = build_affinity_net("resnet38", 16, branch_dims=(8, 8, 16), feat_dim=32).train()
    feat = net(torch.randn(2, 3, 48, 56))
    aff = pairwise_affinity(feat, 5)
    label = torch.zeros(2, 6, 7, dtype=torch.long)
    label[:, 2:5, 2:5] = 3
    label[1, 0, :] = 255
    total, parts = affinity_loss(aff, affinity_targets(label, 5))
    total.backward()
    assert all(int(parts[f"{k}_count"]) > 0 for k in ("bg", "fg", "neg"))
    assert net.f9.weight.grad is not None and torch.isfinite(net.f9.weight.grad).all()
    assert net.f9.weight.grad.abs().sum() > 0


def test_downsample_labels_takes_each_blocks_majority():
    label = torch.zeros(1, 10, 12, dtype=torch.long)
    label[0, :8, :8] = 255
    label[0, :3, :8] = 5                 # 24 of 64: 255 wins the first block
    label[0, :8, 8:] = 7                 # block (0,1): 32 in-image pixels, all 7 (the rest is past the edge)
    label[0, 8:, :4] = 3                 # block (1,0): 8 of 3 vs 8 of 0 -> tie -> 0
    small = downsample_labels(label, (2, 2))
    assert small.tolist() == [[[255, 7], [0, 0]]]
    with pytest.raises(DataError, match="gives 2x2 blocks"):
        downsample_labels(label, (1, 2))
    big = torch.randint(0, 21, (2, 448, 448))
    assert downsample_labels(big, (56, 56)).shape == (2, 56, 56)
