"""Procedural videos, prompts, text embeddings and a fixed latent code for the proxy HunyuanVideo.

Real HunyuanVideo weights, its VAE and its text encoders cannot be downloaded here, and a random-weight
model has no attention structure for sparse attention or calibration to keep. The proxy is a tiny
HunyuanVideo of the real architecture trained on the videos made here, so everything it needs must be
deterministic and cheap:

- **Videos** (:func:`render_video`): one textured shape (circle, square, triangle, ring) of one colour
  moving (left, right, up, down) or rotating over a two-colour gradient background. The *prompt* fixes
  shape, colour and motion; the *seed* fixes everything else (position, size, speed, background,
  texture phase), so equal (prompt, seed) give equal pixels on any machine.
- **Text** (:func:`encode_prompt`): no text encoder exists for the proxy, so each vocabulary word maps
  to a fixed random token embedding of the proxy's context width (seeded by the word's index in the
  vocabulary) and the pooled 768-vector (CLIP-L's slot, ``vector_in``) is the mean of fixed random
  per-word vectors. Conditioning is then deterministic and carries exactly the prompt's information.
- **Latents** (:func:`encode_video` / :func:`decode_latent`): no VAE either. HunyuanVideo's causal VAE
  maps ``4(T-1)+1`` RGB frames of ``8H x 8W`` to 16 channels x ``T`` x ``H`` x ``W``; we keep that layout
  with a fixed *linear* code: the first frame is repeated to a group of four, later frames are grouped
  by four, each (4 frames x 8 x 8 pixels x RGB) cube is projected on 16 orthonormal, separable
  Haar-like basis functions (colour x spatial x temporal: means, left/right, top/bottom and
  first-half/second-half differences; see ``_basis``), then normalised per channel. Decoding is the transpose: a
  blocky but faithful low-pass preview (shape, colour, position and motion survive; texture finer than
  8 pixels does not). It is not a VAE and makes no claim to be one; it only gives the proxy latents of
  the right shape whose content is the video's.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

# ---------------------------------------------------------------------------------------------- prompts

COLOURS = {  # RGB in [0, 1]
    "red": (0.9, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.1), "white": (0.95, 0.95, 0.95), "purple": (0.6, 0.15, 0.8),
}
SHAPES = ("circle", "square", "triangle", "ring")
MOTIONS = ("left", "right", "up", "down", "clockwise", "anticlockwise")
FILLER = ("a", "moving", "rotating")
VOCAB: tuple[str, ...] = FILLER + tuple(COLOURS) + SHAPES + MOTIONS
TEXT_TOKENS = 4  # "a <colour> <shape> <moving|rotating> <motion>" minus the article: see prompt_words

LATENT_FRAMES, LATENT_SIZE = 5, 16  # proxy default: 17 frames of 128 x 128 pixels
SPATIAL, TEMPORAL = 8, 4  # HunyuanVideo's VAE compression
LATENT_CHANNELS = 16
# Per-channel normalisation, like a VAE's scale factor: the basis coefficients' mean and standard deviation
# over 256 training videos (``training_batch(12345, 256, 64, data_seed=99)``, two significant digits), so
# that every latent channel has mean ~0 and std ~1 whatever its order.
LATENT_MEAN = (-13.0, -0.25, -0.21) + (0.0,) * 13
LATENT_STD = (4.5, 4.3, 4.3, 0.67, 0.69, 0.28, 0.5, 0.49, 0.42, 0.41, 0.82, 0.65, 0.53, 0.38, 0.37, 0.19)
WORD_SEED = 0x5EED_7E47


@dataclass(frozen=True)
class Prompt:
    colour: str
    shape: str
    motion: str

    def __post_init__(self) -> None:
        for value, allowed in ((self.colour, COLOURS), (self.shape, SHAPES), (self.motion, MOTIONS)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not in the proxy's vocabulary {list(allowed)}")

    @property
    def text(self) -> str:
        verb = "rotating" if self.motion in ("clockwise", "anticlockwise") else "moving"
        return f"a {self.colour} {self.shape} {verb} {self.motion}"

    @classmethod
    def parse(cls, text: str) -> "Prompt":
        """Inverse of ``text``; any order of the three content words is accepted."""
        words = text.lower().split()
        unknown = [w for w in words if w not in VOCAB]
        if unknown:
            raise ValueError(f"words {unknown} are not in the proxy's vocabulary {list(VOCAB)}")
        pick = lambda pool: [w for w in words if w in pool]  # noqa: E731
        c, s, m = pick(COLOURS), pick(SHAPES), pick(MOTIONS)
        if len(c) != 1 or len(s) != 1 or len(m) != 1:
            raise ValueError(f"prompt {text!r} must name one colour, one shape and one motion")
        return cls(c[0], s[0], m[0])


ALL_PROMPTS: tuple[Prompt, ...] = tuple(Prompt(c, s, m) for c, s, m in itertools.product(COLOURS, SHAPES, MOTIONS))


def prompt_for(index: int) -> Prompt:
    """A fixed enumeration of the 144 prompts (index modulo their count)."""
    return ALL_PROMPTS[index % len(ALL_PROMPTS)]


def benchmark_prompts(n: int) -> list[Prompt]:
    """``n`` prompts spread over the vocabulary (stride coprime to 144), for the benchmark and the demo."""
    return [prompt_for(i * 37 + 5) for i in range(n)]


# ---------------------------------------------------------------------------------------------- text

def _word_vectors(dim: int, salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(WORD_SEED + 7919 * salt + dim)
    return torch.randn(len(VOCAB), dim, generator=g)


def prompt_words(prompt: Prompt) -> list[str]:
    """The text tokens: every word but the article (``TEXT_TOKENS`` of them)."""
    return prompt.text.split()[1:]


def encode_prompt(prompt: Prompt, context_dim: int, pooled_dim: int = 768) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context [TEXT_TOKENS, context_dim], pooled [pooled_dim])`` float32: fixed random word embeddings.

    Word vectors have unit variance per entry like a normalised encoder's hidden states; the pooled
    vector averages per-word vectors of another table, so it also identifies colour, shape and motion.
    """
    table, pooled_table = _word_vectors(context_dim, 1), _word_vectors(pooled_dim, 2)
    idx = torch.tensor([VOCAB.index(w) for w in prompt_words(prompt)])
    return table[idx].clone(), pooled_table[idx].mean(0)


def null_condition(context_dim: int, pooled_dim: int = 768) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt (zeros, as ComfyUI's ConditioningZeroOut gives): used for text dropout and CFG."""
    return torch.zeros(TEXT_TOKENS, context_dim), torch.zeros(pooled_dim)


# ---------------------------------------------------------------------------------------------- videos

def pixel_frames(latent_frames: int) -> int:
    return TEMPORAL * (latent_frames - 1) + 1


def _shape_sdf(shape: str, x: torch.Tensor, y: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance (pixels, < 0 inside) of ``shape`` of radius ``r`` centred at the origin."""
    if shape == "circle":
        return torch.sqrt(x * x + y * y) - r
    if shape == "ring":
        return (torch.sqrt(x * x + y * y) - 0.72 * r).abs() - 0.28 * r
    if shape == "square":
        s = 0.85 * r
        return torch.maximum(x.abs(), y.abs()) - s
    if shape == "triangle":  # equilateral, pointing up (y grows downwards)
        k = math.sqrt(3.0)
        d1 = (k * x - y) / 2 - r / 2
        d2 = (-k * x - y) / 2 - r / 2
        d3 = y - r / 2
        return torch.maximum(torch.maximum(d1, d2), d3)
    raise ValueError(f"unknown shape {shape!r}")


def render_video(prompt: Prompt, seed: int, *, frames: int = pixel_frames(LATENT_FRAMES),
                 size: int = SPATIAL * LATENT_SIZE) -> torch.Tensor:
    """``[3, frames, size, size]`` float32 in [-1, 1]: the prompt's shape over a gradient, deterministic by seed."""
    g = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
    u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))  # noqa: E731
    bg_a, bg_b = torch.rand(3, generator=g) * 0.5, torch.rand(3, generator=g) * 0.5
    bg_angle = u(0, 2 * math.pi)
    r = u(0.13, 0.2) * size
    speed = u(0.025, 0.045) * size  # pixels per frame
    spin = u(0.12, 0.2)  # radians per frame
    phase, stripe = u(0, 2 * math.pi), u(0.25, 0.5)
    travel = speed * (frames - 1)
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}.get(prompt.motion, (0, 0))
    # start so that the whole path stays inside the frame
    lo_x, hi_x = r - min(dx, 0) * travel, size - r - max(dx, 0) * travel
    lo_y, hi_y = r - min(dy, 0) * travel, size - r - max(dy, 0) * travel
    cx0, cy0 = u(lo_x, hi_x), u(lo_y, hi_y)
    turn = {"clockwise": 1.0, "anticlockwise": -1.0}.get(prompt.motion, 0.0)
    angle0 = u(0, 2 * math.pi)

    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    ramp = (math.cos(bg_angle) * (xx - size / 2) + math.sin(bg_angle) * (yy - size / 2)) / size + 0.5
    background = bg_a[:, None, None] * (1 - ramp) + bg_b[:, None, None] * ramp  # [3, S, S]
    colour = torch.tensor(COLOURS[prompt.colour])[:, None, None]
    out = torch.empty(3, frames, size, size)
    for f in range(frames):
        cx, cy = cx0 + dx * speed * f, cy0 + dy * speed * f
        a = angle0 + turn * spin * f
        x, y = xx - cx, yy - cy
        xr, yr = math.cos(a) * x + math.sin(a) * y, -math.sin(a) * x + math.cos(a) * y
        cover = (0.5 - _shape_sdf(prompt.shape, xr, yr, r)).clamp(0, 1)  # 1-pixel anti-aliased edge
        texture = 0.75 + 0.25 * torch.sin(xr * stripe + phase)  # stripes turn with the shape
        out[:, f] = background * (1 - cover) + colour * texture * cover
    return out * 2 - 1


# ---------------------------------------------------------------------------------------------- latents

def _basis() -> torch.Tensor:
    """``[16, 3 * TEMPORAL * SPATIAL * SPATIAL]`` orthonormal rows over a (colour, frame, y, x) cube.

    Products of orthonormal factors: colour (luma, red-blue, green-magenta), time (mean, first half minus
    second half), space (mean, left-right, top-bottom, diagonal). 16 of the 3 x 2 x 4 = 24 products,
    lowest order first: the order a VAE's channels would spend their capacity on.
    """
    colour = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, -1.0], [1.0, -2.0, 1.0]])
    colour = colour / colour.norm(dim=1, keepdim=True)
    time = torch.tensor([[1.0] * TEMPORAL, [1.0] * (TEMPORAL // 2) + [-1.0] * (TEMPORAL // 2)])
    time = time / time.norm(dim=1, keepdim=True)
    half = SPATIAL // 2
    sign = torch.tensor([1.0] * half + [-1.0] * half)
    ones = torch.ones(SPATIAL)
    space = torch.stack([torch.outer(ones, ones), torch.outer(ones, sign), torch.outer(sign, ones),
                         torch.outer(sign, sign)]).reshape(4, -1)
    space = space / space.norm(dim=1, keepdim=True)
    order = [(c, 0, 0) for c in range(3)] + [(0, 0, s) for s in (1, 2, 3)] + [(c, 0, s) for c in (1, 2) for s in (1, 2)]
    order += [(c, 1, 0) for c in range(3)] + [(0, 1, s) for s in (1, 2, 3)]
    rows = [torch.einsum("c,t,s->cts", colour[c], time[t], space[s]).reshape(-1) for c, t, s in order]
    return torch.stack(rows)


_BASIS = _basis()


def _groups(video: torch.Tensor) -> torch.Tensor:
    """``[3, 4(T-1)+1, H, W]`` -> ``[3, T, 4, H, W]``: the first frame repeated to a group of four."""
    c, f, h, w = video.shape
    if (f - 1) % TEMPORAL:
        raise ValueError(f"a video must have 4(T-1)+1 frames (HunyuanVideo's VAE layout); got {f}")
    first = video[:, :1].expand(c, TEMPORAL, h, w)
    rest = video[:, 1:].reshape(c, (f - 1) // TEMPORAL, TEMPORAL, h, w)
    return torch.cat([first[:, None], rest], dim=1)


def encode_video(video: torch.Tensor) -> torch.Tensor:
    """``[3, 4(T-1)+1, 8H, 8W]`` pixels in [-1, 1] -> ``[16, T, H, W]`` latent (model space, std ~1)."""
    if video.dim() != 4 or video.shape[0] != 3 or video.shape[2] % SPATIAL or video.shape[3] % SPATIAL:
        raise ValueError(f"video must be [3, frames, 8H, 8W], got {list(video.shape)}")
    g = _groups(video.float())  # [3, T, 4, 8H, 8W]
    c, t, k, h8, w8 = g.shape
    h, w = h8 // SPATIAL, w8 // SPATIAL
    cubes = g.reshape(c, t, k, h, SPATIAL, w, SPATIAL).permute(1, 3, 5, 0, 2, 4, 6).reshape(t, h, w, -1)
    lat = (cubes @ _BASIS.T - torch.tensor(LATENT_MEAN)) / torch.tensor(LATENT_STD)  # [T, H, W, 16]
    return lat.permute(3, 0, 1, 2).contiguous()


def decode_latent(latent: torch.Tensor) -> torch.Tensor:
    """``[16, T, H, W]`` -> ``[3, 4(T-1)+1, 8H, 8W]`` in [-1, 1] (transpose of the code, clamped); a preview."""
    if latent.dim() != 4 or latent.shape[0] != LATENT_CHANNELS:
        raise ValueError(f"latent must be [16, T, H, W], got {list(latent.shape)}")
    _, t, h, w = latent.shape
    coef = latent.float().permute(1, 2, 3, 0) * torch.tensor(LATENT_STD) + torch.tensor(LATENT_MEAN)
    cubes = coef @ _BASIS  # [T, H, W, 768]
    g = cubes.reshape(t, h, w, 3, TEMPORAL, SPATIAL, SPATIAL).permute(3, 0, 4, 1, 5, 2, 6)
    g = g.reshape(3, t, TEMPORAL, h * SPATIAL, w * SPATIAL)
    first = g[:, 0].mean(1, keepdim=True)
    rest = g[:, 1:].reshape(3, (t - 1) * TEMPORAL, h * SPATIAL, w * SPATIAL)
    return torch.cat([first, rest], dim=1).clamp(-1, 1)


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """``[3, F, H, W]`` in [-1, 1] -> ``[F, H, W, 3]`` uint8 frames."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()


# ---------------------------------------------------------------------------------------------- batches

@dataclass
class Batch:
    latent: torch.Tensor  # [B, 16, T, H, W]
    context: torch.Tensor  # [B, TEXT_TOKENS, context_dim]
    pooled: torch.Tensor  # [B, 768]
    prompts: list[Prompt]
    seeds: list[int]


def sample(prompts: Sequence[Prompt], seeds: Sequence[int], context_dim: int, *,
           latent_frames: int = LATENT_FRAMES, latent_size: int = LATENT_SIZE) -> Batch:
    """Render, encode and condition one (prompt, seed) pair per batch row."""
    lats, ctxs, pools = [], [], []
    for p, s in zip(prompts, seeds):
        lats.append(encode_video(render_video(p, s, frames=pixel_frames(latent_frames),
                                              size=SPATIAL * latent_size)))
        c, y = encode_prompt(p, context_dim)
        ctxs.append(c)
        pools.append(y)
    return Batch(torch.stack(lats), torch.stack(ctxs), torch.stack(pools), list(prompts), list(seeds))


def training_batch(step: int, batch_size: int, context_dim: int, *, data_seed: int = 0,
                   latent_frames: int = LATENT_FRAMES, latent_size: int = LATENT_SIZE) -> Batch:
    """Batch ``step`` of the training stream: prompts and video seeds drawn from ``(data_seed, step)``.

    Video seeds of training live in [2^40, 2^41); the benchmark's seeds are small integers, so no
    evaluation video is ever a training video.
    """
    g = torch.Generator().manual_seed(data_seed * 1_000_003 + step)
    idx = torch.randint(0, len(ALL_PROMPTS), (batch_size,), generator=g).tolist()
    seeds = (torch.randint(0, 2**40, (batch_size,), generator=g) + 2**40).tolist()
    return sample([ALL_PROMPTS[i] for i in idx], seeds, context_dim, latent_frames=latent_frames,
                  latent_size=latent_size)
