"""PSNR and SSIM of videos, the quality figures the paper reports against the full-precision model.

SSIM follows Wang et al. (2004) as most video-generation papers compute it: per frame and per colour
channel, an 11 x 11 Gaussian window of sigma 1.5 applied without padding ("valid"), K1 = 0.01,
K2 = 0.03, constants scaled by the data range, the map averaged, then averaged over channels and
frames. PSNR is taken over all pixels of a video at once (one mean squared error per video).
Inputs are ``[C, F, H, W]`` (one video) or ``[B, C, F, H, W]`` (a batch: one figure per video).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:
        return x[None]
    if x.dim() != 5:
        raise ValueError(f"a video must be [C, F, H, W] or [B, C, F, H, W], got {list(x.shape)}")
    return x


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per video (``inf`` where the two are equal), float64."""
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {list(x.shape)} vs {list(ref.shape)}")
    xb, rb = _as_batch(x).double(), _as_batch(ref).double()
    mse = (xb - rb).square().flatten(1).mean(1)
    out = 10.0 * torch.log10(data_range ** 2 / mse)
    out = torch.where(mse == 0, torch.full_like(out, math.inf), out)
    return out[0] if x.dim() == 4 else out


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian, float64 (the 2-D window is its outer product)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma * sigma))
    return g / g.sum()


def _filter(img: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable valid-mode Gaussian filter of ``[N, 1, H, W]``."""
    img = F.conv2d(img, g.view(1, 1, -1, 1))
    return F.conv2d(img, g.view(1, 1, 1, -1))


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float) -> torch.Tensor:
    """Mean SSIM per video over frames and channels (float64)."""
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {list(x.shape)} vs {list(ref.shape)}")
    xb, rb = _as_batch(x).double(), _as_batch(ref).double()
    b, c, f, h, w = xb.shape
    if h < WINDOW or w < WINDOW:
        raise ValueError(f"frames of {h} x {w} are smaller than the {WINDOW} x {WINDOW} SSIM window")
    g = gaussian_window().to(xb.device)
    a = xb.permute(0, 2, 1, 3, 4).reshape(b * f * c, 1, h, w)
    r = rb.permute(0, 2, 1, 3, 4).reshape(b * f * c, 1, h, w)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mu_a, mu_r = _filter(a, g), _filter(r, g)
    var_a = _filter(a * a, g) - mu_a.square()
    var_r = _filter(r * r, g) - mu_r.square()
    cov = _filter(a * r, g) - mu_a * mu_r
    smap = ((2 * mu_a * mu_r + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_r.square() + c1) * (var_a + var_r + c2))
    out = smap.flatten(1).mean(1).view(b, f * c).mean(1)
    return out[0] if x.dim() == 4 else out
