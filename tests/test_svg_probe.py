"""svg's probe kernel (sampled rows: spatial and temporal band errors against dense) against its eager
reference, and svg_mask's choice through it.

On the CPU the kernel runs under TRITON_INTERPRET=1 with FP16 operands (the interpreter's tl.dot is
wrong on BF16); the `gpu` test repeats it compiled, in BF16, at a few thousand tokens.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_quantsparse.kernels._triton import HAS_TRITON
from comfyui_quantsparse.kernels.svg_probe import svg_probe_reference, svg_probe_triton
from comfyui_quantsparse.quantsparse.sparse.masks import band_blocks, sample_rows, temporal_permutation

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


def structured_qkv(b, h, txt, grid, dtype, device, seed):
    """q, k with spatial heads (keys similar within a frame) and temporal heads (similar across frames
    at one position), so that the two bands' errors differ and the choice is meaningful."""
    gen = torch.Generator().manual_seed(seed)
    t, hh, ww = grid
    n = t * hh * ww
    frame = torch.randn(t, 128, generator=gen).repeat_interleave(hh * ww, 0)
    place = torch.randn(hh * ww, 128, generator=gen).repeat(t, 1)
    q, k, v = (torch.randn(b, h, txt + n, 128, generator=gen) for _ in range(3))
    for head in range(h):
        shared = frame if head % 2 == 0 else place
        q[:, head, txt:] += 2.0 * shared
        k[:, head, txt:] += 2.0 * shared
    return (x.to(device=device, dtype=dtype) for x in (q, k, v))


def probe_args(grid, txt, block_q, block_k, keep, count, device):
    n = grid[0] * grid[1] * grid[2]
    band = band_blocks(n, block_q, block_k, keep, device=device)
    rows = sample_rows(n, count, device=device)
    _, inverse = temporal_permutation(grid, device=device)
    return rows, band[rows // block_q, 0], band[inverse[rows] // block_q, 0]


def check_close(err, ref):
    assert torch.isfinite(err).all()
    rel = float(((err - ref).abs() / ref.abs().clamp_min(1e-3)).max())
    assert rel < 3e-2, f"relative error {rel}"


@pytest.mark.parametrize("txt,grid", [(0, (4, 4, 8)), (13, (3, 5, 7)), (40, (5, 6, 6))])
def test_probe_matches_reference(kernel_device, txt, grid):
    dtype = torch.float16 if kernel_device == "cpu" else torch.bfloat16
    q, k, v = structured_qkv(2, 2, txt, grid, dtype, kernel_device, seed=txt)
    n = grid[0] * grid[1] * grid[2]
    nkb = -(-n // 16)
    rows, lo_s, lo_t = probe_args(grid, txt, 32, 16, max(1, nkb // 4), 16, kernel_device)
    pad = torch.ones(2, txt + n, dtype=torch.bool, device=kernel_device)
    if txt:
        pad[1, txt // 2:txt] = False  # batch 1: padded text keys
    kw = dict(txt_len=txt, grid=grid, band_block=16, keep=max(1, nkb // 4), key_padding=pad)
    err = svg_probe_triton(q, k, v, rows, lo_s, lo_t, **kw)
    ref = svg_probe_reference(q, k, v, rows, lo_s, lo_t, **kw)
    assert err.shape == (2, 2, 2)
    check_close(err, ref)
    # The structure decides: even heads are spatial (frame-shared), odd heads temporal (place-shared).
    choice = err[1] < err[0]
    assert torch.equal(choice, ref[1] < ref[0])
    assert not choice[:, 0].any() and choice[:, 1].all(), (err, ref)


def test_probe_padding_changes_the_result(kernel_device):
    """Padded keys are dropped: padding a text key changes the errors, as in the reference."""
    dtype = torch.float16 if kernel_device == "cpu" else torch.bfloat16
    grid, txt = (3, 4, 8), 24
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, txt + 96, 128, generator=gen) for _ in range(3))
    k[:, :, :txt] += q[:, :, txt:txt + 1]  # text keys pull some of every row's mass
    q, k, v = (x.to(device=kernel_device, dtype=dtype) for x in (q, k, v))
    rows, lo_s, lo_t = probe_args(grid, txt, 32, 16, 2, 16, kernel_device)
    kw = dict(txt_len=txt, grid=grid, band_block=16, keep=2)
    pad = torch.ones(1, txt + 96, dtype=torch.bool, device=kernel_device)
    pad[0, :txt] = False
    plain = svg_probe_triton(q, k, v, rows, lo_s, lo_t, **kw)
    padded = svg_probe_triton(q, k, v, rows, lo_s, lo_t, key_padding=pad, **kw)
    check_close(padded, svg_probe_reference(q, k, v, rows, lo_s, lo_t, key_padding=pad, **kw))
    assert float((plain - padded).abs().max()) > 1e-3 * float(plain.abs().max())


def test_probe_rejects_bad_rows():
    q = torch.zeros(1, 1, 40, 128, dtype=torch.float16)
    rows = torch.arange(16)
    lo = torch.zeros(16, dtype=torch.int32)
    with pytest.raises(ValueError, match="power-of-two"):
        svg_probe_triton(q, q, q, rows[:12], lo[:12], lo[:12], txt_len=8, grid=(2, 4, 4), band_block=16, keep=1)
    with pytest.raises(ValueError, match="video positions"):
        svg_probe_reference(q, q, q, rows + 30, lo, lo, txt_len=8, grid=(2, 4, 4), band_block=16, keep=1)
    with pytest.raises(ValueError, match="grid"):
        svg_probe_reference(q, q, q, rows, lo, lo, txt_len=8, grid=(2, 4, 5), band_block=16, keep=1)


@pytest.mark.gpu
def test_gpu_probe_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the H100 with `pytest -m gpu`)")
    grid, txt = (9, 30, 53), 256
    q, k, v = structured_qkv(1, 4, txt, grid, torch.bfloat16, "cuda", seed=7)
    n = grid[0] * grid[1] * grid[2]
    keep = -(-n // 64) * 15 // 100
    rows, lo_s, lo_t = probe_args(grid, txt, 128, 64, keep, 64, "cuda")
    pad = torch.ones(1, txt + n, dtype=torch.bool, device="cuda")
    pad[0, 200:txt] = False
    kw = dict(txt_len=txt, grid=grid, band_block=64, keep=keep, key_padding=pad)
    err = svg_probe_triton(q, k, v, rows, lo_s, lo_t, **kw)
    ref = svg_probe_reference(q, k, v, rows, lo_s, lo_t, **kw)
    check_close(err, ref)
    assert torch.equal(err[1] < err[0], ref[1] < ref[0])
