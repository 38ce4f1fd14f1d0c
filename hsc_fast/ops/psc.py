"""psc_terms(f1, f2, y1, y2, p1, p2, m1, m2) -> (4,): the four PSC InfoNCE terms.

Spec in hsc_fast.ops; kernel: kernels/psc.py."""
from __future__ import annotations

import functools

import torch

from hsc_fast.ops.check import Probe
from hsc_fast.ops.dispatch import LossInputError, check_dims, dispatch, l2_normalize, upcast
EMBED_NORM_EPS = 1e-12  # F.normalize default, as the official PSC pixel embeddings


def nce_rows(emb, protos, labels, tau):
    """Per-row -log softmax(emb @ protos.T / tau)[label], via log-sum-exp."""
    logits = emb @ protos.t() / tau
    return torch.logsumexp(logits, dim=1) - logits.gather(1, labels[:, None]).squeeze(1)


def psc_terms_reference(f1, f2, y1, y2, p1, p2, m1, m2, tau=0.1, norm_eps=EMBED_NORM_EPS):
    e1 = l2_normalize(upcast(f1), dim=-1, eps=norm_eps)
    e2 = l2_normalize(upcast(f2), dim=-1, eps=norm_eps)
    p1, p2, m1, m2 = (upcast(t.detach()) for t in (p1, p2, m1, m2))

    def nce(e, protos, y):
        return nce_rows(e, protos, y, tau).mean()

    cross_proto = (nce(e1, p2, y1) + nce(e2, p1, y2)) / 2
    cross_label = (nce(e1, p1, y2) + nce(e2, p2, y1)) / 2
    intra = (nce(e1, p1, y1) + nce(e2, p2, y2)) / 2
    memory = (nce(e1, m1, y1) + nce(e2, m2, y2)) / 2
    return torch.stack([cross_proto, cross_label, intra, memory])


def psc_terms(f1, f2, y1, y2, p1, p2, m1, m2, *, tau=0.1, impl="auto"):
    """The four PSC InfoNCE terms (4,): [cross_proto, cross_label, intra, memory]."""
    check_dims("psc_terms", f1=(f1, 2), f2=(f2, 2), y1=(y1, 1), y2=(y2, 1),
                p1=(p1, 2), p2=(p2, 2), m1=(m1, 2), m2=(m2, 2))
    if f1.shape != f2.shape or y1.shape[0] != f1.shape[0] or y2.shape[0] != f1.shape[0]:
        raise LossInputError(f"psc_terms: f1 {tuple(f1.shape)}, f2 {tuple(f2.shape)}, y1 {tuple(y1.shape)}, "
                         f"y2 {tuple(y2.shape)} must share M (and D)")
    for name, t in (("p1", p1), ("p2", p2), ("m1", m1), ("m2", m2)):
        if t.shape != p1.shape or t.shape[1] != f1.shape[1]:
            raise LossInputError(f"psc_terms: {name} {tuple(t.shape)} must be (C, {f1.shape[1]}) like p1")
    if f1.shape[0] == 0:
        raise LossInputError("psc_terms: no pixels (M = 0): the per-pixel means are undefined")
    # The class count C picks the kernel variant (3C logit columns in one block or in chunks):
    # each C a run meets is self-checked on its own, with a probe of C classes.
    case, probe = variant(p1.shape[0])
    fn = dispatch("psc_terms", "psc.psc_terms_triton", impl, f1, f1.shape[1], psc_terms_reference, probe, case=case)
    return fn(f1, f2, y1.long(), y2.long(), p1, p2, m1, m2, float(tau), EMBED_NORM_EPS)


# Self-check (hsc_fast.ops.check): a small, awkward input for this op
def _psc_terms_probe(dtype, dim, device, g, classes=21):
    """97 pixels per view (odd), `classes` prototype rows per set (21: VOC), normalised
    prototypes, raw banks."""
    f1 = torch.randn(97, dim, generator=g).relu().to(device=device, dtype=dtype)
    f2 = torch.randn(97, dim, generator=g).to(device=device, dtype=dtype)
    y1, y2 = (torch.randint(0, classes, (97,), generator=g).to(device) for _ in range(2))
    p1, p2 = (l2_normalize(torch.randn(classes, dim, generator=g)).to(device) for _ in range(2))
    m1, m2 = (torch.randn(classes, dim, generator=g).to(device) for _ in range(2))
    return [f1, f2], lambda fn, a, b: fn(a, b, y1, y2, p1, p2, m1, m2, 0.1, EMBED_NORM_EPS)


@functools.lru_cache(maxsize=None)
def variant(classes: int) -> tuple[str, Probe]:
    """(self-check case, probe) for `classes` prototype rows per set: "C=21" with a 21-class probe."""
    return f"C={int(classes)}", Probe(functools.partial(_psc_terms_probe, classes=int(classes)))


PROBE = variant(21)[1]
