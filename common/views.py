"""Augmentation views, written once as a spec and run two ways.

A method script states each view as a `ViewSpec` that reads like its paper's augmentation table. The spec becomes
  (a) `torchvision_view`: a per-sample torchvision pipeline for DataLoader workers on the CPU, or
  (b) `batched_view` / `DeviceViews`: the same random augmentations on a whole batch of uint8 tensors at once, on
      any device, every sample drawing its own parameters from torchvision's distributions, with no Python loop
      over samples and no host synchronisation.
The batched path computes in float32 from the uint8 input; torchvision's per-sample pipeline rounds to uint8 after
each operation, so the two differ by up to about one grey level per operation (tests/test_views.py states each
bound). Its resampling and blur are batched matrix products, so they follow torch's float32 matmul precision
(TF32, 10 mantissa bits, where a script enables it).

Read from the top: `ViewSpec` (what a method script writes), `torchvision_view` (the per-sample pipeline), then the
batched engine: random parameters (`sample_view_params`), the operations, and `apply_view` / `batched_view`.
"""
import math
from dataclasses import dataclass

import torch
from torchvision.transforms import v2 as T

from .config import seed_for


_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class ViewSpec:
    """One view's random augmentations, in torchvision's order: crop, flip, jitter, grayscale, blur, solarize.

    Views come out square, `size` x `size` (multi-crop: specs of several sizes in one list); size 0 takes the run's
    pretraining size, which is what every function below receives as its `size` argument.
    """
    crop_scale: tuple = (0.08, 1.0)    # RandomResizedCrop area range; (1.0, 1.0) with crop_ratio (1, 1) = no crop
    crop_ratio: tuple = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio (width / height) range
    flip_p: float = 0.5                # horizontal flip probability
    jitter: tuple = (0.0, 0.0, 0.0, 0.0)  # colour-jitter strengths: brightness, contrast, saturation, hue
    jitter_p: float = 0.0              # probability of applying colour jitter (as T.RandomApply)
    gray_p: float = 0.0                # random grayscale probability
    blur_p: float = 0.0                # Gaussian blur probability
    blur_sigma: tuple = (0.1, 2.0)     # blur sigma range (uniform, per sample)
    blur_kernel: int = 0               # blur kernel size; 0: about 10 % of the view's side, 2 * (side // 20) + 1
    solarize_p: float = 0.0            # solarisation probability (threshold 0.5 on [0, 1] images)
    size: int = 0                      # output side in pixels; 0: the run's pretraining size

    def __post_init__(self):
        b, c, s, h = self.jitter
        if min(b, c, s, h) < 0 or h > 0.5:
            raise ValueError(f"ViewSpec.jitter {self.jitter}: strengths must be >= 0 and hue <= 0.5.")
        if not (0 < self.crop_scale[0] <= self.crop_scale[1] and 0 < self.crop_ratio[0] <= self.crop_ratio[1]):
            raise ValueError(f"ViewSpec crop_scale {self.crop_scale}, crop_ratio {self.crop_ratio}: "
                             f"need 0 < min <= max.")
        if self.blur_kernel and self.blur_kernel % 2 == 0:
            raise ValueError(f"ViewSpec.blur_kernel {self.blur_kernel} must be odd (or 0 for the default).")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"ViewSpec.blur_sigma {self.blur_sigma}: need 0 < min <= max.")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ValueError(f"ViewSpec.size {self.size!r} must be an int >= 0 (0: the run's pretraining size).")

    def output_size(self, size):
        """The view's side in pixels: its own size, else `size` (the run's); the same given either."""
        return self.size or size

    def kernel_size(self, size):
        """The blur kernel: blur_kernel, else about 10 % of the view's own side."""
        return self.blur_kernel or 2 * (self.output_size(size) // 20) + 1

    def has_jitter(self):
        return self.jitter_p > 0 and any(v > 0 for v in self.jitter)


def torchvision_view(spec, size, mean_std):
    """Per-sample torchvision.transforms.v2 pipeline (PIL image -> normalised float32 tensor) of a spec, at
    spec.output_size(size) (`size`: the run's pretraining size).

    Operations whose probability is 0 are left out of the Compose.
    """
    side = spec.output_size(size)
    ops = [T.ToImage(), T.RandomResizedCrop(side, scale=spec.crop_scale, ratio=spec.crop_ratio, antialias=True)]
    if spec.flip_p > 0:
        ops.append(T.RandomHorizontalFlip(spec.flip_p))
    if spec.has_jitter():
        ops.append(T.RandomApply([T.ColorJitter(*spec.jitter)], p=spec.jitter_p))
    if spec.gray_p > 0:
        ops.append(T.RandomGrayscale(spec.gray_p))
    if spec.blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(spec.kernel_size(side), spec.blur_sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:  # the image is uint8 here: v >= 128 is v / 255 >= 0.5
        ops.append(T.RandomSolarize(threshold=128, p=spec.solarize_p))
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(*mean_std)]
    return T.Compose(ops)


# --- random parameters

def _uniform(n, lo, hi, g):
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _fallback_crop(in_hw, ratio):
    """torchvision's RandomResizedCrop fallback: the centre crop, clamped to the ratio bounds."""
    height, width = in_hw
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _sample_crops(spec, n, in_hw, g, attempts=10):
    """RandomResizedCrop.get_params for n samples at once: the first of 10 attempts that fits, else the fallback."""
    height, width = in_hw
    area = _uniform((n, attempts), *spec.crop_scale, g) * (height * width)
    log_r = _uniform((n, attempts), math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]), g)
    w = torch.sqrt(area * torch.exp(log_r)).round()  # round half to even, as Python's round()
    h = torch.sqrt(area / torch.exp(log_r)).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (n, attempts)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # index of the first True (0 when none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    u_top, u_left = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    top = torch.minimum(torch.floor(u_top * (height - h + 1)), height - h)  # randint(0, height - h + 1)
    left = torch.minimum(torch.floor(u_left * (width - w + 1)), width - w)
    found = fits.any(1)
    f_top, f_left, f_h, f_w = _fallback_crop(in_hw, spec.crop_ratio)
    pick = lambda a, b: torch.where(found, a, torch.full_like(a, b)).long()
    return dict(top=pick(top, f_top), left=pick(left, f_left), height=pick(h, f_h), width=pick(w, f_w),
                fallback=~found)


def sample_view_params(spec, n, in_hw, size, generator, device):
    """Per-sample random parameters of a spec for n images of height/width in_hw, as tensors on `device`.

    Everything is drawn on the CPU with `generator`, in a fixed order and whatever the spec's probabilities, so one
    generator state gives the same parameters on any device. Distributions are torchvision's: the crop rule of
    RandomResizedCrop.get_params; flip / jitter / grayscale / blur / solarize applied when U(0,1) < p; jitter factors
    brightness, contrast, saturation ~ U(max(0, 1-s), 1+s), hue ~ U(-h, h), and a uniformly random order of the four
    (as ColorJitter's randperm(4)); blur sigma ~ U(blur_sigma). Crop boxes are in input pixels, so no parameter
    depends on the output size (`size` or spec.size).
    """
    g = generator
    p = _sample_crops(spec, n, in_hw, g)
    p["flip"] = torch.rand(n, generator=g) < spec.flip_p
    p["jitter"] = torch.rand(n, generator=g) < spec.jitter_p
    for name, s in zip(("brightness", "contrast", "saturation"), spec.jitter[:3]):
        p[name] = _uniform(n, max(0.0, 1.0 - s), 1.0 + s, g).float()
    p["hue"] = _uniform(n, -spec.jitter[3], spec.jitter[3], g).float()
    p["order"] = torch.rand(n, 4, generator=g).argsort(1)  # (n, 4) a random permutation of 0..3 per sample
    p["gray"] = torch.rand(n, generator=g) < spec.gray_p
    p["blur"] = torch.rand(n, generator=g) < spec.blur_p
    p["sigma"] = _uniform(n, *spec.blur_sigma, g).float()
    p["solarize"] = torch.rand(n, generator=g) < spec.solarize_p
    return params_to(p, device)


def params_to(params, device):
    """A dict of per-sample parameter tensors (n, ...) moved to `device` in ONE host-to-device copy: packed as float64
    columns (exact for the bool, int64 crop boxes below 2^53 and float32 values they hold) into one buffer, pinned on
    CUDA so that the copy does not block the host, and unpacked on the device. On the CPU: unchanged."""
    device = torch.device(device)
    if device.type == "cpu":
        return params
    return _unpack(_pack(params, pin=device.type == "cuda").to(device, non_blocking=True), params)


def _pack(params, pin=False):
    packed = torch.cat([v.reshape(len(v), -1).to(torch.float64) for v in params.values()], dim=1)
    return packed.pin_memory() if pin else packed


def _unpack(packed, like):
    """The columns of `packed` back into tensors of the dtypes and shapes of `like` (the dict that was packed)."""
    out, col = {}, 0
    for k, v in like.items():
        width = math.prod(v.shape[1:])
        out[k] = packed[:, col:col + width].to(v.dtype).reshape(v.shape)
        col += width
    return out


def params_slice(params, start, stop):
    return {k: v[start:stop] for k, v in params.items()}


# --- batched operations on (n, 3, H, W) float tensors in [0, 1]; per-sample parameters are (n,) tensors

def _per_sample(v):
    return v.view(-1, 1, 1, 1)


def _resample_matrix(start, length, in_len, out_len, flip=None):
    """(n, out_len, in_len) weights of a crop [start, start + length) resized to out_len along one axis, the output
    reversed where `flip`.

    torchvision's resized_crop with bilinear antialiasing (PyTorch's upsample_bilinear2d_aa): output pixel i is
    centred at start + (i + 0.5) * scale in input pixels, scale = length / out_len; input pixel j (centre j + 0.5)
    weighs max(0, 1 - |j + 0.5 - centre| / max(scale, 1)), only pixels inside the crop, normalised to sum 1. When
    upsampling this is plain bilinear with half-pixel centres and the crop's edge pixels repeated.
    """
    dev = start.device
    start, length = start.float().view(-1, 1, 1), length.float().view(-1, 1, 1)
    scale = length / out_len
    i = torch.arange(out_len, device=dev, dtype=torch.float32).view(1, -1, 1)
    if flip is not None:  # output pixel i of a flipped sample is pixel out_len - 1 - i of the unflipped one
        i = torch.lerp(i, out_len - 1 - i, flip.view(-1, 1, 1).to(i.dtype))  # (n, out, 1)
    centre = (i + 0.5) * scale + start  # (n, out, 1)
    j = torch.arange(in_len, device=dev, dtype=torch.float32).view(1, 1, -1)
    w = (j + 0.5 - centre).abs_().mul_(1 / scale.clamp(min=1)).neg_().add_(1).clamp_(min=0)  # (n, out, in)
    w.mul_(((j >= start) & (j < start + length)).to(w.dtype))  # only pixels inside the crop
    return w.div_(w.sum(-1, keepdim=True))


def _separable(x, rows, cols):
    """x (n, c, H, W) -> rows @ x @ cols^T for each sample: rows (n, H', H), cols (n, W', W); -> (n, c, H', W')."""
    n, c, h, w = x.shape
    x = torch.bmm(x.reshape(n, c * h, w), cols.transpose(1, 2)).view(n * c, h, -1)  # (n*c, H, W')
    x = torch.bmm(rows.repeat_interleave(c, 0), x)  # (n*c, H', W'); bmm: broadcasting matmul is slower on the CPU
    return x.view(n, c, rows.shape[1], cols.shape[1])


def _crop_resize_flip(images_uint8, top, left, height, width, flip, size):
    """resized_crop + optional hflip for every sample with two batched matrix products; -> floats in [0, 1]."""
    n, c, H, W = images_uint8.shape
    rows = _resample_matrix(top, height, H, size).div_(255)  # the uint8 -> [0, 1] scale folded in
    cols = _resample_matrix(left, width, W, size, flip)
    return _separable(images_uint8.float(), rows, cols)


def _grayscale(x):
    r, g, b = x.unbind(1)
    return r.mul(_GRAY_WEIGHTS[0]).add_(g, alpha=_GRAY_WEIGHTS[1]).add_(b, alpha=_GRAY_WEIGHTS[2]).unsqueeze(1)


def _blend_op(x, op, brightness, contrast, saturation):
    """One colour-jitter slot: per sample op 0 brightness, 1 contrast, 2 saturation, anything else identity.

    All three are torchvision's blend f * x + (1 - f) * target, clamped to [0, 1], with target 0 (brightness), the
    image's mean grey level (contrast) or its grey image (saturation). Identity is f = 1, which lerp keeps exact.
    """
    f = torch.where(op == 0, brightness, torch.where(op == 1, contrast, torch.where(op == 2, saturation, 1.0)))
    gray = _grayscale(x)  # (n, 1, H, W)
    is_con, is_sat = (_per_sample(op == k).to(x.dtype) for k in (1, 2))
    target = torch.addcmul(gray.mean((1, 2, 3), keepdim=True) * is_con, gray, is_sat)
    return torch.lerp(target, x, _per_sample(f)).clamp_(0, 1)


def _adjust_hue(x, hue):
    """torchvision's adjust_hue (RGB -> HSV, h += hue mod 1, HSV -> RGB) for a per-sample hue, in closed form.

    A hue shift keeps value (max) and chroma C (max - min). With h6 = 6 * h in [0, 6), each channel is
    max - C * clamp(2 - d, 0, 1), d the distance around the hue circle from h6 to the channel's opposite hue
    (R 3, G 5, B 1): torchvision's six-case HSV -> RGB table in closed form. Selections are lerps with 0/1 weights
    (exact) rather than torch.where, which is ten times slower on the CPU.
    """
    r, g, b = x.unbind(1)
    maxc = x.amax(1)  # (n, H, W)
    chroma = maxc - x.amin(1)
    at_r = (maxc == r).to(x.dtype)
    at_g = (maxc == g).to(x.dtype).mul_(1 - at_r)
    # hue in sixths as torchvision: (g - b) / C if max is r, else 2 + (b - r) / C if max is g, else 4 + (r - g) / C
    num = torch.lerp(torch.lerp(r - g, b - r, at_g), g - b, at_r)
    offset = (6 * hue.view(-1, 1, 1) + 4).sub(at_g, alpha=2).sub_(at_r, alpha=4)
    h6 = offset.addcdiv_(num, chroma.clamp(min=1e-8))  # chroma 0 means num 0: h6 = offset
    h6 -= 6 * torch.floor(h6 * (1 / 6))  # mod 6
    opposite = (torch.arange(3, device=x.device, dtype=x.dtype) * 2 + 3).remainder_(6)  # R 3, G 5, B 1; no copy
    d = (h6.unsqueeze(1) - opposite.view(1, 3, 1, 1)).abs_()  # (n, 3, H, W)
    shade = d.sub_(3).abs_().sub_(1).clamp_(0, 1)  # 2 - min(d, 6 - d) = |d - 3| - 1, clamped
    return torch.addcmul(maxc.unsqueeze(1), chroma.unsqueeze(1), shade, value=-1)


def _color_jitter(x, params, spec):
    """ColorJitter on the samples with params['jitter'], each in its own random order of the four operations.

    Loops over order positions, never over samples. Hue is the costly one, so it runs once: each sample's ops before
    its hue go into three 'before' slots and those after into three 'after' slots (identity where a slot is empty),
    which applies exactly its own order.
    """
    on = params["jitter"]
    bri, con, sat = (torch.where(on, params[k], 1.0) for k in ("brightness", "contrast", "saturation"))
    order = params["order"]  # (n, 4): 0 brightness, 1 contrast, 2 saturation, 3 hue
    if spec.jitter[3] == 0:  # no hue: the order's four positions, hue's position being identity
        for pos in range(4):
            x = _blend_op(x, order[:, pos], bri, con, sat)
        return x
    hue_pos = (order == 3).to(torch.uint8).argmax(1)  # (n,)
    for slot in range(3):
        op = torch.where(slot < hue_pos, order[:, slot], -1)
        x = _blend_op(x, op, bri, con, sat)
    x = _adjust_hue(x, torch.where(on, params["hue"], 0.0))
    for slot in range(3):
        pos = hue_pos + 1 + slot
        op = torch.where(pos < 4, order.gather(1, pos.clamp(max=3).unsqueeze(1)).squeeze(1), -1)
        x = _blend_op(x, op, bri, con, sat)
    return x


def _blur_matrix(sigma, apply, kernel_size, size):
    """(n, size, size): Gaussian blur with reflect padding along one axis (torchvision's gaussian_blur); identity
    for the samples that are not blurred."""
    dev, half = sigma.device, kernel_size // 2
    if half >= size:
        raise ValueError(f"blur kernel {kernel_size} is too large for {size} px views (reflect padding needs "
                         f"kernel // 2 < size); set ViewSpec.blur_kernel.")
    t = torch.arange(-half, half + 1, device=dev, dtype=torch.float32)  # (k,)
    w = torch.softmax(-0.5 * (t / sigma.view(-1, 1)) ** 2, dim=1)  # (n, k) normalised Gaussian taps
    idx = torch.arange(size, device=dev).view(-1, 1) + torch.arange(-half, half + 1, device=dev)  # (S, k)
    idx = idx.abs()  # reflect at 0: -m -> m
    idx = torch.where(idx > size - 1, 2 * (size - 1) - idx, idx)  # reflect at size - 1
    n = sigma.shape[0]
    m = torch.zeros(n, size, size, device=dev).scatter_add_(
        2, idx.expand(n, size, -1), w.unsqueeze(1).expand(n, size, -1))
    return torch.where(apply.view(-1, 1, 1), m, torch.eye(size, device=dev))


def _gaussian_blur(x, sigma, apply, kernel_size):
    """Separable per-sample Gaussian blur as two batched matrix products."""
    m = _blur_matrix(sigma, apply, kernel_size, x.shape[-1])  # square views: one matrix for rows and columns
    return _separable(x, m, m)


def _solarize(x, apply):
    """x -> 1 - x where x >= 0.5, i.e. min(x, 1 - x), for the samples in `apply` (a lerp with 0/1 weights: an exact
    selection)."""
    return torch.lerp(x, torch.minimum(x, 1 - x), _per_sample(apply).to(x.dtype))


def apply_view(images_uint8, params, spec, size, mean_std):
    """(n, 3, H, W) uint8 on any device -> (n, 3, S, S) float32, normalised, S = spec.output_size(size) (`size`: the
    run's pretraining size), with per-sample `params` (from sample_view_params, on the images' device). No loop over
    samples, no host synchronisation."""
    size = spec.output_size(size)
    x = _crop_resize_flip(images_uint8, params["top"], params["left"], params["height"], params["width"],
                          params["flip"], size)
    if spec.has_jitter():
        x = _color_jitter(x, params, spec)
    if spec.gray_p > 0:
        x = torch.lerp(x, _grayscale(x).expand_as(x), _per_sample(params["gray"]).to(x.dtype))
    if spec.blur_p > 0:
        x = _gaussian_blur(x, params["sigma"], params["blur"], spec.kernel_size(size))
    if spec.solarize_p > 0:
        x = _solarize(x, params["solarize"])
    for c, (mean, std) in enumerate(zip(*mean_std)):  # Python numbers: no host-to-device copy
        x[:, c].sub_(mean).div_(std)
    return x


def batched_view(spec, images_uint8, size, mean_std, generator):
    """One view of a batch: per-sample parameters from `generator` (a CPU torch.Generator), then apply_view."""
    params = sample_view_params(spec, images_uint8.shape[0], images_uint8.shape[-2:], size, generator,
                                images_uint8.device)
    return apply_view(images_uint8, params, spec, size, mean_std)


def view_generator(seed, epoch, step, view_index):
    """CPU generator whose state depends only on (seed, epoch, step, view_index)."""
    return torch.Generator().manual_seed(seed_for(seed, "views", epoch, step, view_index))
