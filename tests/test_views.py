"""Views: batched operations against torchvision's functional ops, random parameters against the spec's
distributions, and the two data paths (DeviceViews on the device, MultiView in DataLoader workers).

Tolerances: on float input the batched ops compute the same formulas as torchvision's float kernels (resampling
and blur as matrix products, hue in closed form), so they agree to float32 rounding: 1e-5 on [0, 1] pixels, 1e-4
after normalisation (dividing by std ~ 0.25 scales errors by 4). Against torchvision's uint8 kernels the bound is
one grey level: they round their result to uint8 (0.5 level) with fixed-point weights.
"""
import dataclasses
import math
import warnings

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from common import UserError
from common import (DeviceViews, MultiView, ViewSpec, apply_view, batched_view, sample_view_params,
                          torchvision_view, view_generator)
from common.views import _adjust_hue, _blend_op, _color_jitter, _crop_resize_flip, _gaussian_blur, _grayscale
from sync_detector import SyncDetector

MEAN_STD = ((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
BYOL = ViewSpec(crop_scale=(0.08, 1.0), flip_p=0.5, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2,
                blur_p=0.5, solarize_p=0.2)


def images(n, h=32, w=32, seed=0):
    """uint8 images with smooth structure plus noise, a few grey pixels and ties between channel maxima."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([yy, xx, 1 - yy * xx]) * 180 + torch.rand(n, 3, h, w, generator=g) * 75
    x = base.round().clamp(0, 255).to(torch.uint8)
    x[:, :, 0, :4] = 128  # grey pixels (zero chroma)
    x[:, 1, 1, :4] = x[:, 0, 1, :4]  # R == G ties
    return x


def within_4se(count, n, p):
    return abs(count / n - p) <= 4 * math.sqrt(max(p * (1 - p), 1e-12) / n)


# ----------------------------------------------------------------------------- each batched op vs torchvision

@pytest.mark.parametrize("size", [32, 20, 48])  # same size, downsampling (antialiased), upsampling
def test_resized_crop_and_flip_match_torchvision(size):
    img = images(6, 40, 36)
    top, left = torch.tensor([0, 5, 3, 10, 0, 39]), torch.tensor([0, 7, 20, 1, 0, 35])
    h, w = torch.tensor([40, 20, 37, 8, 40, 1]), torch.tensor([36, 29, 11, 8, 36, 1])
    flip = torch.tensor([False, True, False, True, True, False])
    out = _crop_resize_flip(img, top, left, h, w, flip, size)
    for i in range(6):
        args = (top[i].item(), left[i].item(), h[i].item(), w[i].item(), [size, size])
        ref = F.resized_crop(img[i].float() / 255, *args, antialias=True)
        ref8 = F.resized_crop(img[i], *args, antialias=True).float() / 255  # uint8 kernel: rounds, fixed point
        if flip[i]:
            ref, ref8 = F.hflip(ref), F.hflip(ref8)
        assert (out[i] - ref).abs().max() <= 1e-5
        assert (out[i] - ref8).abs().max() <= 1.01 / 255


def test_hflip_alone_is_exact():
    img = images(2)
    full = torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([32, 32]), torch.tensor([32, 32])
    out = _crop_resize_flip(img, *full, torch.tensor([True, False]), 32)
    assert torch.allclose(out[0], F.hflip(img[0].float() / 255), atol=1e-6, rtol=0)
    assert torch.allclose(out[1], img[1].float() / 255, atol=1e-6, rtol=0)


@pytest.mark.parametrize("op,fn", [(0, F.adjust_brightness), (1, F.adjust_contrast), (2, F.adjust_saturation)])
def test_blend_ops_match_torchvision(op, fn):
    x = images(5).float() / 255
    factor = torch.tensor([0.0, 0.6, 1.0, 1.4, 2.5])
    ones = torch.ones(5)
    factors = [factor if k == op else ones for k in range(3)]
    out = _blend_op(x, torch.full((5,), op), *factors)
    for i in range(5):
        assert (out[i] - fn(x[i], factor[i].item())).abs().max() <= 1e-6
    assert torch.equal(_blend_op(x, torch.full((5,), -1), factor, factor, factor), x)  # identity slot is exact


def test_hue_matches_torchvision():
    x = images(6).float() / 255
    hue = torch.tensor([-0.5, -0.1, 0.0, 0.03, 0.2, 0.5])
    out = _adjust_hue(x, hue)
    for i in range(6):
        assert (out[i] - F.adjust_hue(x[i], hue[i].item())).abs().max() <= 1e-5


def test_grayscale_and_solarize_match_torchvision():
    x = images(3).float() / 255
    assert (_grayscale(x) - F.rgb_to_grayscale(x, 1)).abs().max() <= 1e-6
    spec = ViewSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0, gray_p=0.5, solarize_p=0.5)
    params = sample_view_params(spec, 3, (32, 32), 32, torch.Generator().manual_seed(0), "cpu")
    params["gray"], params["solarize"] = torch.tensor([True, False, True]), torch.tensor([False, True, True])
    out = apply_view(images(3), params, spec, 32, ((0, 0, 0), (1, 1, 1)))
    refs = [x[0], x[1], x[2]]
    refs = [F.rgb_to_grayscale(r, 3) if g else r for r, g in zip(refs, params["gray"])]
    refs = [F.solarize(r, 0.5) if s else r for r, s in zip(refs, params["solarize"])]
    for o, r in zip(out, refs):
        assert (o - r).abs().max() <= 1e-6


@pytest.mark.parametrize("k", [3, 7])
def test_gaussian_blur_matches_torchvision(k):
    x = images(4).float() / 255
    sigma, apply = torch.tensor([0.1, 0.7, 2.0, 1.3]), torch.tensor([True, True, True, False])
    out = _gaussian_blur(x, sigma, apply, k)
    for i in range(3):  # per-sample sigma, reflect padding at the borders
        assert (out[i] - F.gaussian_blur(x[i], [k, k], [sigma[i].item()] * 2)).abs().max() <= 1e-5
    assert (out[3] - x[3]).abs().max() <= 1e-6  # not blurred


@pytest.mark.parametrize("hue", [0.1, 0.0])  # with hue: before/after slots; without: the four positions
def test_color_jitter_applies_each_samples_own_order(hue):
    """All 24 orders, each against torchvision's four ops run one after the other in that order."""
    import itertools
    orders = torch.tensor(list(itertools.permutations(range(4))))
    n = len(orders)
    x = images(n).float() / 255
    g = torch.Generator().manual_seed(1)
    params = dict(jitter=torch.arange(n) != 5, order=orders, brightness=0.5 + torch.rand(n, generator=g),
                  contrast=0.5 + torch.rand(n, generator=g), saturation=0.5 + torch.rand(n, generator=g),
                  hue=hue * (2 * torch.rand(n, generator=g) - 1))
    out = _color_jitter(x, params, ViewSpec(jitter=(0.5, 0.5, 0.5, hue), jitter_p=1.0))
    fns = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    names = ["brightness", "contrast", "saturation", "hue"]
    for i in range(n):
        ref = x[i]
        for op in orders[i].tolist() if params["jitter"][i] else []:
            ref = fns[op](ref, params[names[op]][i].item())
        assert (out[i] - ref).abs().max() <= 1e-5, orders[i]
    assert (out[5] - x[5]).abs().max() <= 1e-6  # jitter not applied: identity up to the hue round trip


def reference_view(img, p, i, spec, size, mean_std):
    """Plain per-sample transcription with torchvision's functional float ops at the sampled parameters, at the
    spec's own size if it has one, else `size`."""
    side = spec.size or size
    x = F.resized_crop(img.float() / 255, p["top"][i].item(), p["left"][i].item(), p["height"][i].item(),
                       p["width"][i].item(), [side, side], antialias=True)
    if p["flip"][i]:
        x = F.hflip(x)
    if p["jitter"][i]:
        fns = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
        for op, name in [(o, ["brightness", "contrast", "saturation", "hue"][o]) for o in p["order"][i].tolist()]:
            x = fns[op](x, p[name][i].item())
    if p["gray"][i]:
        x = F.rgb_to_grayscale(x, 3)
    if p["blur"][i]:
        k = spec.kernel_size(size)
        x = F.gaussian_blur(x, [k, k], [p["sigma"][i].item()] * 2)
    if p["solarize"][i]:
        x = F.solarize(x, 0.5)
    return F.normalize(x, *mean_std)


@pytest.mark.parametrize("size,spec_size,side", [(32, 0, 32), (24, 0, 24), (32, 12, 12)])  # spec.size wins
def test_apply_view_matches_per_sample_reference(size, spec_size, side):
    img = images(16, 36, 40)
    spec = ViewSpec(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.3, blur_p=0.5,
                    solarize_p=0.3, size=spec_size)
    p = sample_view_params(spec, 16, (36, 40), size, torch.Generator().manual_seed(3), "cpu")
    out = apply_view(img, p, spec, size, MEAN_STD)
    assert out.shape == (16, 3, side, side) and out.dtype == torch.float32
    for i in range(16):
        assert (out[i] - reference_view(img[i], p, i, spec, size, MEAN_STD)).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- random parameters vs the spec

N = 20000


@pytest.fixture(scope="module")
def byol_params():
    return sample_view_params(BYOL, N, (32, 32), 32, torch.Generator().manual_seed(0), "cpu")


def test_mask_rates_match_spec(byol_params):
    p = byol_params
    for name, prob in [("flip", BYOL.flip_p), ("jitter", BYOL.jitter_p), ("gray", BYOL.gray_p),
                       ("blur", BYOL.blur_p), ("solarize", BYOL.solarize_p)]:
        assert p[name].dtype == torch.bool and within_4se(p[name].sum().item(), N, prob), name
    never = sample_view_params(ViewSpec(flip_p=0.0), 1000, (32, 32), 32, torch.Generator().manual_seed(0), "cpu")
    assert not never["flip"].any() and not never["blur"].any() and not never["solarize"].any()


def test_jitter_factors_and_order(byol_params):
    p = byol_params
    for name, s in zip(["brightness", "contrast", "saturation"], BYOL.jitter[:3]):
        lo, hi = max(0.0, 1 - s), 1 + s
        assert p[name].min() >= lo and p[name].max() <= hi
        assert abs(p[name].mean().item() - (lo + hi) / 2) <= 4 * (hi - lo) / math.sqrt(12 * N)
    h = BYOL.jitter[3]
    assert p["hue"].abs().max() <= h and abs(p["hue"].mean().item()) <= 4 * 2 * h / math.sqrt(12 * N)
    order = p["order"]
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(N, 4))  # each row a permutation
    perms, counts = torch.unique(order, dim=0, return_counts=True)
    assert len(perms) == 24 and all(within_4se(c.item(), N, 1 / 24) for c in counts)


def test_blur_sigma(byol_params):
    s, (lo, hi) = byol_params["sigma"], BYOL.blur_sigma
    assert s.min() >= lo and s.max() <= hi
    assert abs(s.mean().item() - (lo + hi) / 2) <= 4 * (hi - lo) / math.sqrt(12 * N)


def test_crop_boxes_follow_the_rule(byol_params):
    p, area = byol_params, 32 * 32
    top, left, h, w = p["top"], p["left"], p["height"].double(), p["width"].double()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    ok = ~p["fallback"]
    # w = round(sqrt(A r)), h = round(sqrt(A / r)) with A / area in scale and r in ratio: bounds through rounding
    assert ((h[ok] + 0.5) * (w[ok] + 0.5) >= BYOL.crop_scale[0] * area).all()
    assert ((h[ok] - 0.5) * (w[ok] - 0.5) <= BYOL.crop_scale[1] * area).all()
    assert ((w[ok] + 0.5) / (h[ok] - 0.5) >= BYOL.crop_ratio[0]).all()
    assert ((w[ok] - 0.5) / (h[ok] + 0.5) <= BYOL.crop_ratio[1]).all()
    room = ok & (h < 32)  # the position is uniform over the free rows
    assert abs((top[room] / (32 - h[room])).mean().item() - 0.5) <= 4 * math.sqrt(1 / 12 / room.sum().item()) + 0.01


@pytest.mark.parametrize("in_hw,scale,ratio", [((32, 32), (0.9, 1.0), (0.5, 2.0)), ((24, 40), (0.55, 1.0), (0.9, 1.1))])
def test_crop_distribution_matches_torchvision(in_hw, scale, ratio):
    """Where the fallback is common: its rate matches the rule's exact value and RandomResizedCrop.get_params, the
    fallback box is torchvision's, and the mean crop area matches get_params."""
    spec = ViewSpec(crop_scale=scale, crop_ratio=ratio)
    p = sample_view_params(spec, N, in_hw, 32, torch.Generator().manual_seed(0), "cpu")
    box = torch.stack([p["top"], p["left"], p["height"], p["width"]], 1)
    torch.manual_seed(0)
    dummy, m = torch.empty(3, *in_hw), 3000
    tv = torch.tensor([T.RandomResizedCrop.get_params(dummy, list(scale), list(ratio)) for _ in range(m)])
    fb = p["fallback"]
    fallback_box = box[fb][0]
    assert (box[fb] == fallback_box).all() and fallback_box.tolist() in tv.tolist()
    # exact rate: one attempt fits with probability a (midpoint rule on a 1000 x 1000 grid), all 10 fail: (1 - a)^10
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    area = (scale[0] + (scale[1] - scale[0]) * u.view(-1, 1)) * math.prod(in_hw)
    r = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u.view(1, -1))
    w, h = torch.sqrt(area * r).round(), torch.sqrt(area / r).round()
    a = ((w <= in_hw[1]) & (h <= in_hw[0])).double().mean().item()
    q = fb.double().mean().item()
    assert 0.05 < q < 0.95 and abs(q - (1 - a) ** 10) <= 4 * math.sqrt(q * (1 - q) / N) + 0.005
    # against get_params (two samples, 4 standard errors); a fitting crop may equal the fallback box in both
    q, q_tv = (box == fallback_box).all(1).double().mean().item(), (tv == fallback_box).all(1).double().mean().item()
    assert abs(q - q_tv) <= 4 * math.sqrt(q * (1 - q) / N + q * (1 - q) / m)
    frac, frac_tv = (box[:, 2] * box[:, 3]).double(), (tv[:, 2] * tv[:, 3]).double()
    se = math.sqrt(frac.var().item() / N + frac_tv.var().item() / m)
    assert abs(frac.mean().item() - frac_tv.mean().item()) <= 4 * se


@pytest.mark.parametrize("spec", [BYOL, dataclasses.replace(BYOL, crop_scale=(0.05, 0.2), size=12)],
                         ids=["run-size", "small-crop-12px"])
def test_batched_and_torchvision_views_have_the_same_distribution(spec):
    """End to end, one image, 500 views each way: per-channel means agree within 4 standard errors (of the
    difference of two means of per-view means) and pixel standard deviations within 5 %. Also for a multi-crop
    style small view, which both paths make at its own 12 px rather than the run's 32."""
    img, n, side = images(1, 40, 40)[0], 500, spec.size or 32
    tv = torchvision_view(spec, 32, MEAN_STD)
    torch.manual_seed(0)
    a = torch.stack([tv(F.to_pil_image(img)) for _ in range(n)])
    b = batched_view(spec, img.expand(n, -1, -1, -1).contiguous(), 32, MEAN_STD, torch.Generator().manual_seed(0))
    assert a.shape == b.shape == (n, 3, side, side)
    se = torch.sqrt(a.mean((2, 3)).var(0) / n + b.mean((2, 3)).var(0) / n)
    assert ((a.mean((0, 2, 3)) - b.mean((0, 2, 3))).abs() <= 4 * se).all()
    assert ((a.std((0, 2, 3)) / b.std((0, 2, 3)) - 1).abs() <= 0.05).all()


def test_same_image_twice_gets_different_views():
    img = images(1).expand(4, -1, -1, -1).contiguous()
    out = batched_view(BYOL, img, 32, MEAN_STD, torch.Generator().manual_seed(0))
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[2], out[3])


def test_view_generator_is_deterministic():
    draw = lambda *key: torch.rand(8, generator=view_generator(*key))
    assert torch.equal(draw(0, 1, 2, 0), draw(0, 1, 2, 0))
    keys = [(0, 1, 2, 0), (0, 1, 2, 1), (0, 1, 3, 0), (0, 2, 2, 0), (1, 1, 2, 0)]
    assert len({tuple(draw(*k).tolist()) for k in keys}) == len(keys)
    a = sample_view_params(BYOL, 16, (32, 32), 32, view_generator(0, 1, 2, 0), "cpu")
    b = sample_view_params(BYOL, 16, (32, 32), 32, view_generator(0, 1, 2, 0), "cpu")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- torchvision pipeline

def test_torchvision_view_omits_ops_with_probability_zero():
    def kinds(spec):
        out = []
        for t in torchvision_view(spec, 32, MEAN_STD).transforms:
            out += [type(u).__name__ for u in t.transforms] if isinstance(t, T.RandomApply) else [type(t).__name__]
        return out
    assert "GaussianBlur" not in kinds(ViewSpec())
    assert kinds(ViewSpec()) == ["ToImage", "RandomResizedCrop", "RandomHorizontalFlip", "ToDtype", "Normalize"]
    assert kinds(BYOL) == ["ToImage", "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "RandomGrayscale",
                           "GaussianBlur", "RandomSolarize", "ToDtype", "Normalize"]
    blur = [t for t in torchvision_view(BYOL, 32, MEAN_STD).transforms if isinstance(t, T.RandomApply)][-1]
    assert blur.p == BYOL.blur_p and blur.transforms[0].kernel_size == (3, 3)  # 2 * (32 // 20) + 1
    pil = F.to_pil_image(images(1)[0])
    out = torchvision_view(BYOL, 24, MEAN_STD)(pil)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32


# ----------------------------------------------------------------------------- every ViewSpec field reaches both paths
# A table over dataclasses.fields(ViewSpec): for each field a value its default does not have (with the other fields
# it needs to act, e.g. a blur probability for the blur sigma), a check of the batched path (the parameters
# sample_view_params draws, and apply_view's output) and one of the torchvision pipeline. Each check must pass with
# the value and fail without it, so it does look at the field. A new field without a row fails.

SIDE, ROW_N, PLAIN = 32, 256, ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # PLAIN: no normalisation, pixels stay in [0, 1]
ROW_IMAGES = images(ROW_N, SIDE, SIDE, seed=7)


def changed(out, ref):
    """Fraction of the samples that differ."""
    return ((out - ref).abs().amax((1, 2, 3)) > 1e-4).float().mean().item()


def batched(spec, **forced):
    """(params of ROW_N samples, apply_view's output) for a spec; `forced` replaces a boolean mask by all False."""
    p = sample_view_params(spec, ROW_N, (SIDE, SIDE), SIDE, torch.Generator().manual_seed(5), "cpu")
    p = {**p, **{k: torch.zeros_like(p[k]) for k in forced}}
    return p, apply_view(ROW_IMAGES, p, spec, SIDE, PLAIN)


def tv_op(spec, kind):
    """(the one `kind` operation of the torchvision pipeline, its probability); RandomApply unpacked."""
    found = []
    for t in torchvision_view(spec, SIDE, PLAIN).transforms:
        found += ([(u, t.p) for u in t.transforms] if isinstance(t, T.RandomApply) else [(t, getattr(t, "p", 1.0))])
    found = [(op, p) for op, p in found if isinstance(op, kind)]
    assert len(found) == 1, f"{len(found)} {kind.__name__} in the torchvision pipeline"
    return found[0]


def crop_scale_batched(spec):  # area 0.25 * 32^2 = 256 for every sample, through the rounding of w and h
    p, _ = batched(spec)
    h, w = p["height"].double(), p["width"].double()
    assert not p["fallback"].any() and ((h + 0.5) * (w + 0.5) >= 256).all() and ((h - 0.5) * (w - 0.5) <= 256).all()


def crop_ratio_batched(spec):  # width / height 2 for every sample (the fallback box is 16 x 32: 2 as well)
    p, _ = batched(spec)
    h, w = p["height"].double(), p["width"].double()
    assert ((w + 0.5) / (h - 0.5) >= 2).all() and ((w - 0.5) / (h + 0.5) <= 2).all()


def flip_batched(spec):  # every sample flipped, and the output is the mirror image of the unflipped one
    p, out = batched(spec)
    assert p["flip"].all()
    assert torch.allclose(out, F.hflip(batched(spec, flip=True)[1]), atol=1e-6, rtol=0)


def jitter_batched(spec):  # factors spread over brightness [0.5, 1.5], contrast [0.7, 1.3], saturation [0.8, 1.2],
    p, out = batched(spec)  # hue [-0.1, 0.1]; and the output is not the un-jittered one
    for name, (lo, hi) in [("brightness", (0.5, 1.5)), ("contrast", (0.7, 1.3)), ("saturation", (0.8, 1.2)),
                           ("hue", (-0.1, 0.1))]:
        v = p[name]
        assert lo - 1e-6 <= v.min() and v.max() <= hi + 1e-6 and v.max() - v.min() >= 0.9 * (hi - lo), name
    assert changed(out, batched(spec, jitter=True)[1]) >= 0.9


def jitter_p_batched(spec):
    p, out = batched(spec)
    assert p["jitter"].all() and changed(out, batched(spec, jitter=True)[1]) >= 0.9


def gray_batched(spec):  # every output grey: three equal channels
    p, out = batched(spec)
    assert p["gray"].all() and torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def blur_batched(spec):  # every sample blurred: torchvision's 3 x 3 blur (2 * (32 // 20) + 1) at its own sigma
    p, out = batched(spec)
    sharp = batched(spec, blur=True)[1]
    assert p["blur"].all() and all((out[i] - F.gaussian_blur(sharp[i], [3, 3], [p["sigma"][i].item()] * 2)).abs().max()
                                   <= 1e-5 for i in range(8))


def blur_sigma_batched(spec):  # sigma 1.5 drawn for every sample and used: torchvision's 3 x 3 blur at sigma 1.5
    p, out = batched(spec)
    assert (p["sigma"] == 1.5).all()
    sharp = batched(spec, blur=True)[1]
    assert all((out[i] - F.gaussian_blur(sharp[i], [3, 3], [1.5, 1.5])).abs().max() <= 1e-5 for i in range(8))


def blur_kernel_batched(spec):  # a 5 x 5 kernel, each sample at its own sigma
    p, out = batched(spec)
    sharp = batched(spec, blur=True)[1]
    assert all((out[i] - F.gaussian_blur(sharp[i], [5, 5], [p["sigma"][i].item()] * 2)).abs().max() <= 1e-5
               for i in range(8))


def solarize_batched(spec):  # every sample solarised: x -> 1 - x where x >= 0.5
    p, out = batched(spec)
    plain = batched(spec, solarize=True)[1]
    assert p["solarize"].all() and torch.allclose(out, torch.minimum(plain, 1 - plain), atol=1e-6, rtol=0)


def size_batched(spec):  # 48 x 48 output from the 32 x 32 images, blurred with the 48 px default kernel: 5 x 5
    p, out = batched(spec)  # (2 * (48 // 20) + 1; the run's 32 px would give 3 x 3)
    sharp = batched(spec, blur=True)[1]
    assert out.shape == (ROW_N, 3, 48, 48)
    assert all((out[i] - F.gaussian_blur(sharp[i], [5, 5], [p["sigma"][i].item()] * 2)).abs().max() <= 1e-5
               for i in range(8))


def size_torchvision(spec):  # the crop resizes to 48 x 48 with the 5 x 5 default blur, and the output is 48 px
    out = torchvision_view(spec, SIDE, PLAIN)(F.to_pil_image(ROW_IMAGES[0]))
    assert tv_op(spec, T.RandomResizedCrop)[0].size == (48, 48) and tv_op(spec, T.GaussianBlur)[0].kernel_size == (5, 5)
    assert out.shape == (3, 48, 48)


SPEC_ROWS = {  # field: (value, the other fields it needs, batched check, torchvision check)
    "crop_scale": ((0.25, 0.25), {}, crop_scale_batched,
                   lambda s: tv_op(s, T.RandomResizedCrop)[0].scale == (0.25, 0.25) or fail()),
    "crop_ratio": ((2.0, 2.0), {}, crop_ratio_batched,
                   lambda s: tv_op(s, T.RandomResizedCrop)[0].ratio == (2.0, 2.0) or fail()),
    "flip_p": (1.0, {}, flip_batched, lambda s: tv_op(s, T.RandomHorizontalFlip)[0].p == 1.0 or fail()),
    "jitter": ((0.5, 0.3, 0.2, 0.1), dict(jitter_p=1.0), jitter_batched,
               lambda s: [getattr(tv_op(s, T.ColorJitter)[0], k) for k in ("brightness", "contrast", "saturation",
                          "hue")] == [(0.5, 1.5), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)] or fail()),
    "jitter_p": (1.0, dict(jitter=(0.4, 0.4, 0.4, 0.1)), jitter_p_batched,
                 lambda s: tv_op(s, T.ColorJitter)[1] == 1.0 or fail()),
    "gray_p": (1.0, {}, gray_batched, lambda s: tv_op(s, T.RandomGrayscale)[0].p == 1.0 or fail()),
    "blur_p": (1.0, {}, blur_batched, lambda s: tv_op(s, T.GaussianBlur)[1] == 1.0 or fail()),
    "blur_sigma": ((1.5, 1.5), dict(blur_p=1.0), blur_sigma_batched,
                   lambda s: list(tv_op(s, T.GaussianBlur)[0].sigma) == [1.5, 1.5] or fail()),
    "blur_kernel": (5, dict(blur_p=1.0), blur_kernel_batched,
                    lambda s: tv_op(s, T.GaussianBlur)[0].kernel_size == (5, 5) or fail()),
    "solarize_p": (1.0, {}, solarize_batched,
                   lambda s: (tv_op(s, T.RandomSolarize)[0].p, tv_op(s, T.RandomSolarize)[0].threshold) == (1.0, 128)
                   or fail()),
    "size": (48, dict(blur_p=1.0), size_batched, size_torchvision),
}


def fail():
    raise AssertionError("the torchvision pipeline does not carry the spec's value")


def test_every_viewspec_field_has_a_row():
    fields = {f.name: f.default for f in dataclasses.fields(ViewSpec)}
    assert set(SPEC_ROWS) == set(fields), f"fields without a row: {sorted(set(fields) - set(SPEC_ROWS))}"
    assert all(value != fields[name] for name, (value, *_) in SPEC_ROWS.items())


@pytest.mark.parametrize("field", list(SPEC_ROWS))
def test_viewspec_field_reaches_the_sampled_parameters_and_both_pipelines(field):
    value, needs, batched_check, torchvision_check = SPEC_ROWS[field]
    spec, without = ViewSpec(**needs, **{field: value}), ViewSpec(**needs)
    batched_check(spec)
    torchvision_check(spec)
    for check in (batched_check, torchvision_check):  # each check looks at the field: it fails at the default
        with pytest.raises(AssertionError):
            check(without)
    p, out = batched(spec)  # and apply_view applies what was drawn, as torchvision's ops would
    for i in range(4):
        assert (out[i] - reference_view(ROW_IMAGES[i], p, i, spec, SIDE, PLAIN)).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- DeviceViews

class PILData(torch.utils.data.Dataset):
    def __init__(self, n, sizes=((20, 20),)):
        self.x = [images(1, *sizes[i % len(sizes)], seed=i)[0] for i in range(n)]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return F.to_pil_image(self.x[i]), i % 5


def collect(dv, epoch, start_step=0):
    dv.set_epoch(epoch, start_step)
    return list(dv)


SPECS = [BYOL, ViewSpec(crop_scale=(0.5, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=1.0)]
# multi-crop as SMoG's (https://arxiv.org/abs/2207.06167 Sec. 3.4: large views with crop scale [0.2, 1], small ones
# with [0.05, 0.2]): views at the run's size and small crops at their own size, with blur (each view's own default
# kernel), in an order that interleaves the sizes
MULTI = [BYOL, dataclasses.replace(BYOL, crop_scale=(0.05, 0.2), size=8),
         dataclasses.replace(BYOL, solarize_p=0.0), ViewSpec(crop_scale=(0.05, 0.2), blur_p=1.0, size=24)]


@pytest.mark.parametrize("specs,sides", [(SPECS, [16, 16]), (MULTI, [16, 8, 16, 24])], ids=["one-size", "multi-size"])
def test_device_views_two_processes_equal_one(specs, sides):
    data = PILData(20)
    one = DeviceViews(data, specs, 16, MEAN_STD, 8, 1, 0, "cpu", seed=3)
    two = [DeviceViews(data, specs, 16, MEAN_STD, 8, 2, r, "cpu", seed=3) for r in range(2)]
    assert len(one) == len(two[0]) == 2  # 20 // 8, drop_last
    a, b0, b1 = collect(one, 0), collect(two[0], 0), collect(two[1], 0)
    for (va, la, ia), (v0, l0, i0), (v1, l1, i1) in zip(a, b0, b1):
        assert torch.equal(ia, torch.cat([i0, i1])) and torch.equal(la, torch.cat([l0, l1]))
        assert torch.equal(la, ia % 5)
        assert [x.shape for x in va] == [(8, 3, s, s) for s in sides]  # one view per spec, in order, at its size
        for x, x0, x1 in zip(va, v0, v1):
            assert torch.equal(x, torch.cat([x0, x1]))
    seen = torch.cat([i for _, _, i in a])
    assert len(seen.unique()) == 16  # a permutation: no image twice in an epoch


def test_device_views_multi_size_has_no_host_sync():
    """The device path with views of several sizes: nothing in an epoch's batches would make the host wait for a
    CUDA device (tests/sync_detector.py; parameters are drawn on the CPU and copied without blocking)."""
    dv = DeviceViews(PILData(20), MULTI, 16, MEAN_STD, 8, 2, 1, "cpu", seed=3)
    dv.set_epoch(1)
    with SyncDetector() as syncs:
        batches = list(dv)
    assert len(batches) == 2 and syncs.ops == [], syncs.ops


def test_viewspec_size_must_be_a_whole_number_of_pixels():
    assert ViewSpec(size=96).output_size(224) == 96 and ViewSpec().output_size(224) == 224
    for bad in (-1, 12.5, True):
        with pytest.raises(ValueError, match="ViewSpec.size"):
            ViewSpec(size=bad)


def test_device_views_resume_and_epochs():
    dv = DeviceViews(PILData(20), SPECS, 16, MEAN_STD, 4, 1, 0, "cpu")
    full, resumed = collect(dv, 1), collect(dv, 1, start_step=3)
    assert len(full) == 5 and len(resumed) == 2
    for (va, la, ia), (vb, lb, ib) in zip(full[3:], resumed):
        assert torch.equal(ia, ib) and all(torch.equal(x, y) for x, y in zip(va, vb))
    other = collect(dv, 2)
    assert not torch.equal(torch.cat([i for _, _, i in full]), torch.cat([i for _, _, i in other]))
    assert not torch.equal(full[0][0][0], collect(dv, 1)[0][0][1])  # the two views of a batch differ
    dv2 = DeviceViews(PILData(20), SPECS, 16, MEAN_STD, 4, 1, 0, "cpu")
    again = collect(dv2, 2)
    assert torch.equal(other[0][0][0], again[0][0][0])  # same (seed, epoch, step): same views
    # the same image in two epochs gets different views
    pos = {int(i): (s, j) for s, (_, _, idx) in enumerate(full) for j, i in enumerate(idx)}
    s2, j2 = next((s, j) for s, (_, _, idx) in enumerate(other) for j, i in enumerate(idx) if int(i) in pos)
    s1, j1 = pos[int(other[s2][2][j2])]
    assert not torch.allclose(full[s1][0][0][j1], other[s2][0][0][j2])


def test_device_views_fits_mixed_sizes_and_errors():
    assert DeviceViews.fits(1000, (32, 32), "cpu", 1000 * 3 * 32 * 32)
    assert not DeviceViews.fits(1001, (32, 32), "cpu", 1000 * 3 * 32 * 32)
    with pytest.warns(UserWarning, match="resized to 16x16"):
        dv = DeviceViews(PILData(8, sizes=((20, 20), (24, 18))), SPECS[:1], 16, MEAN_STD, 4, 1, 0, "cpu")
    assert dv.images.shape == (8, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DeviceViews(PILData(8), SPECS[:1], 16, MEAN_STD, 4, 1, 0, "cpu").images.shape == (8, 3, 20, 20)
    with pytest.raises(UserError, match="--batch-size 16"):
        DeviceViews(PILData(8), SPECS[:1], 16, MEAN_STD, 16, 1, 0, "cpu")
    with pytest.raises(UserError, match="divide evenly"):
        DeviceViews(PILData(8), SPECS[:1], 16, MEAN_STD, 6, 4, 0, "cpu")


# ----------------------------------------------------------------------------- MultiView in persistent workers

def test_multiview_persistent_workers_see_set_epoch():
    tfs = [torchvision_view(s, 16, MEAN_STD) for s in SPECS]

    def epochs(ds, loader, which):
        out = []
        for e in which:
            ds.set_epoch(e)
            out.append(torch.cat([v[0] for v, _, _ in loader]))
        return out

    ds = MultiView(PILData(8), tfs, seed=1)
    loader = DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True)
    e0, e1 = epochs(ds, loader, [0, 1])
    assert not torch.allclose(e0, e1)
    fresh = MultiView(PILData(8), tfs, seed=1)
    (f1,) = epochs(fresh, DataLoader(fresh, batch_size=4, num_workers=0), [1])
    assert torch.equal(e1, f1)


def test_params_reach_the_device_in_one_packed_copy_with_their_values_and_dtypes(monkeypatch):
    """DeviceViews moves each view's parameters with ONE host-to-device copy: packed into float64 columns, unpacked on
    the device. The round trip is exact for every parameter kind (bools, int64 crop boxes, (n, 4) orders, floats)."""
    from common import views as V
    spec = ViewSpec(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5, solarize_p=0.2)
    params = V.sample_view_params(spec, 9, (300, 400), 32, torch.Generator().manual_seed(0), "cpu")
    back = V._unpack(V._pack(params), params)
    assert list(back) == list(params)
    for k, v in params.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    copies = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: copies.append(a) or real_to(t, *a, **k))
    moved = V.params_to(params, "meta")  # a non-CPU device without a GPU: shapes and dtypes only
    assert sum(1 for a in copies if a and str(a[0]) == "meta") == 1  # one copy to the device for all parameters
    assert {k: (v.dtype, v.shape, v.device.type) for k, v in moved.items()} == {
        k: (v.dtype, v.shape, "meta") for k, v in params.items()}
