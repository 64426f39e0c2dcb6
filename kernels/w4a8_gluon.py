"""W4A8 GEMM for Hopper written in Gluon: packed INT4 weights unpacked in registers, async wgmma.

Why: in the plain Triton W4A8 kernel (:mod:`.w4a8`) the unpacked weight feeds wgmma from
registers and every wgmma ends up synchronous, so the unpack, the loads and the tensor cores
take turns (about 700 TOPS on the H100). Here the skeleton of :mod:`.w8a8_gluon` (persistent
grid, one TMA producer warp, a ring of shared-memory stages, scales and bias staged by TMA)
feeds 8 consumer warps that compute the output tile transposed, ``out^T = W X^T``: the packed
[BN, 64] weight tile (half the bytes of INT8) is loaded from shared memory straight into the
wgmma register-operand layout, split into its two nibble halves by three 32-bit integer
instructions per eight weights, and multiplied against the low and high 64 K-columns of the
activation tile, which wgmma reads from shared memory. The groups of one stage stay in
flight while the next stage is unpacked; the main loop is unrolled by two so their register
operands are never overwritten (otherwise ptxas serializes the wgmmas). The epilogue
transposes through shared memory (stmatrix.trans) into TMA stores of the [tokens, channels]
output.

Only per-channel weight scales (group_size=0). Contract and reference:
:func:`.w4a8.w4a8_gemm_reference`. CUDA compute capability 9.0 only.
"""

from __future__ import annotations

import torch

from ._checks import check_scaled_gemm
from .int4 import HALF
from .w8a8_gluon import (
    HAS_GLUON, _SMEM_LIMIT, GluonGemmConfig, _sm_count, _smem_layout, as_config, check_shape, require_hopper,
    vector_descriptors, vectors_bytes,
)

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )

    from .w8a8_gluon import _alloc_vectors, _instr_n, _release, _split_cols, _tile_coords, _tma_producer

# bm = token tile (the wgmma N dimension, two n=128 halves), bn = weight-channel tile (the wgmma
# M dimension, 16 rows per consumer warp), bk = unpacked K per stage (the packed tile is bk/2
# bytes wide), epi_n = tokens per epilogue chunk. 4 stages of 32 + 8 KB, two 16 KB staging
# buffers and the scale/bias vectors use 194 KB. Not yet tuned on the H100
# (benchmarks/gluon_check.py sweeps it).
W4A8_GLUON_CONFIG = GluonGemmConfig(bm=256, bn=128, bk=128, group_m=8, stages=4, epi_n=64, epi_bufs=2,
                                    a_regs=True, split=False)
_PRODUCER_REGS = 40
_MAX_K = (2**31 - 1) // (16 * 128 * 8) // 128 * 128  # |x| <= 128, |w| <= 8, x16

# Per 32-bit register of packed bytes: each byte's low and high nibble, as int8 values times 16
# (the nibble moved to the top of its byte, the rest zero), which is exact and takes three
# integer instructions for eight weights. The accumulator is then 16 x the true sum; the
# epilogue folds 1/16 into the weight scale (exact, a power of two). 16 * 128 * 8 * K stays
# below 2**31 for K up to 130944, which the launcher checks.
_UNPACK_ASM_TEXT = """{
.reg .b32 t;
shl.b32 t, $2, 4;
and.b32 $1, $2, 0xF0F0F0F0;
and.b32 $0, t, 0xF0F0F0F0;
}"""


if HAS_GLUON:
    _UNPACK_ASM = gl.constexpr(_UNPACK_ASM_TEXT)

    @gluon.jit
    def _unpack_nibbles(packed):
        return gl.inline_asm_elementwise(_UNPACK_ASM, "=r,=r,r", [packed], dtype=(gl.int8, gl.int8),
                                         is_pure=True, pack=4)

    @gluon.jit
    def _w4a8_k_step(x_bufs, w_bufs, ready, empty, acc, it, prev, started: gl.constexpr):
        STAGES: gl.constexpr = x_bufs.type.shape[0]
        HALF_K: gl.constexpr = w_bufs.type.shape[2]
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=4)
        s = it % STAGES
        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
        w_lo, w_hi = _unpack_nibbles(w_bufs.index(s).load(a_layout))
        x_tile = x_bufs.index(s)
        x_lo = x_tile.slice(0, HALF_K, dim=1).permute((1, 0))
        x_hi = x_tile.slice(HALF_K, HALF_K, dim=1).permute((1, 0))
        acc = warpgroup_mma(w_lo, x_lo, acc, use_acc=started, is_async=True)
        acc = warpgroup_mma(w_hi, x_hi, acc, is_async=True)
        # Both groups of this step stay in flight while the next stage is waited for and
        # unpacked; the previous step's are complete, so its stage goes back to the producer.
        acc = warpgroup_mma_wait(2, deps=(acc, x_tile))[0]
        if started:
            _release(empty.index(prev), True)
        return acc, it + 1, s

    @gluon.jit
    def _w4a8_consumer(x_desc, w_desc, o_desc, x_bufs, w_bufs, ready, empty, vecs, M, N, K,
                       HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, EPI_BUFS: gl.constexpr):
        BM: gl.constexpr = x_desc.block_type.shape[0]  # tokens
        BK: gl.constexpr = x_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[0]  # weight channels
        EPI_M: gl.constexpr = o_desc.block_type.shape[0]
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                             instr_shape=[16, _instr_n(BM), 32])
        epi_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                             instr_shape=[16, _instr_n(EPI_M), 32])
        chan_layout: gl.constexpr = gl.SliceLayout(1, epi_layout)
        tok_layout: gl.constexpr = gl.SliceLayout(0, epi_layout)
        o_bufs = gl.allocate_shared_memory(o_desc.dtype, [EPI_BUFS, EPI_M, BN], o_desc.layout)

        num_m = gl.cdiv(M, BM)
        num_n = gl.cdiv(N, BN)
        k_steps = K // BK
        xs_buf, ws_buf, b_buf, vec_ready, vec_empty = vecs
        acc = gl.zeros([BN, BM], gl.int32, acc_layout)
        it = 0
        t = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
            # Unrolled by two: the unpacked operands of two consecutive steps live in different
            # registers, so the in-flight groups' operands are never overwritten.
            acc, it, prev = _w4a8_k_step(x_bufs, w_bufs, ready, empty, acc, it, 0, False)
            for _ in range((k_steps - 1) // 2):
                acc, it, prev = _w4a8_k_step(x_bufs, w_bufs, ready, empty, acc, it, prev, True)
                acc, it, prev = _w4a8_k_step(x_bufs, w_bufs, ready, empty, acc, it, prev, True)
            if (k_steps - 1) % 2:
                acc, it, prev = _w4a8_k_step(x_bufs, w_bufs, ready, empty, acc, it, prev, True)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            _release(empty.index(prev), True)

            # Epilogue on the transposed tile: rows are channels, columns tokens.
            off_m = pid_m * BM
            off_n = pid_n * BN
            mbarrier.wait(vec_ready, t & 1)
            ws = ws_buf.load(chan_layout) * 0.0625  # undo the unpack's x16
            if HAS_BIAS:
                bias = b_buf.load(chan_layout).to(gl.float32)
            parts = _split_cols(acc, BM // EPI_M)
            for c in gl.static_range(BM // EPI_M):
                part = gl.convert_layout(parts[c], epi_layout, assert_trivial=True)
                xs = xs_buf.slice(c * EPI_M, EPI_M).load(tok_layout)
                if c == BM // EPI_M - 1:
                    _release(vec_empty, True)
                val = part.to(gl.float32) * ws[:, None] * xs[None, :]
                if HAS_BIAS:
                    val = val + bias[:, None]
                buf = o_bufs.index(c % EPI_BUFS)
                tma.store_wait(EPI_BUFS - 1)
                buf.store(gl.permute(val.to(o_desc.dtype), (1, 0)))
                fence_async_shared()
                tma.async_copy_shared_to_global(o_desc, [off_m + c * EPI_M, off_n], buf)
            t += 1
        tma.store_wait(0)

    @gluon.jit
    def _w4a8_gluon_kernel(x_desc, w_desc, o_desc, xs_desc, ws_desc, b_desc, M, N, K,
                           HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                           EPI_BUFS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        BM: gl.constexpr = x_desc.block_type.shape[0]
        BK: gl.constexpr = x_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        HALF_K: gl.constexpr = w_desc.block_type.shape[1]
        gl.static_assert(2 * HALF_K == BK, "the packed weight tile must cover the activation tile's K")
        x_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BM, BK], x_desc.layout)
        w_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, HALF_K], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        vecs = _alloc_vectors(xs_desc, ws_desc, b_desc, 1)
        fence_async_shared()
        vec_descs = (xs_desc, ws_desc, b_desc)
        gl.warp_specialize([
            (_w4a8_consumer, (x_desc, w_desc, o_desc, x_bufs, w_bufs, ready, empty, vecs, M, N, K,
                              HAS_BIAS, GROUP_M, EPI_BUFS)),
            (_tma_producer, (x_desc, w_desc, x_bufs, w_bufs, ready, empty, vec_descs, vecs, M, N, K,
                             GROUP_M, HAS_BIAS)),
        ], [1], [PRODUCER_REGS])


def w4a8_gluon_config(k: int, n: int) -> GluonGemmConfig:
    """Per-shape choice from the H100 sweep (benchmarks/results/gluon_h100.json, M = 118,800):
    4 epilogue buffers won at K=12288 (1549 vs 1428 TOPS) and N=21504 (1466 vs 1464); 5 stages
    with one buffer at K=N=3072 (1448 vs 1412); the default elsewhere."""
    if k >= 8192 or n >= 16384:
        return W4A8_GLUON_CONFIG._replace(stages=4, epi_bufs=4)
    if n <= 4096:
        return W4A8_GLUON_CONFIG._replace(stages=5, epi_bufs=1)
    return W4A8_GLUON_CONFIG


def w4a8_smem_bytes(cfg: GluonGemmConfig) -> int:
    """Pipeline ring (activation tile + packed weight tile) + epilogue staging + vectors (+ barriers)."""
    return cfg.stages * (cfg.bm * cfg.bk + cfg.bn * cfg.bk // 2) + cfg.epi_bufs * cfg.epi_n * cfg.bn * 2 \
        + vectors_bytes(cfg) + 16 * cfg.stages + 64


def w4a8_output_descriptor(out: torch.Tensor, cfg: GluonGemmConfig):
    """TMA descriptor of one epilogue chunk: epi_n tokens x bn channels."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    block = [cfg.epi_n, cfg.bn]
    return TensorDescriptor.from_tensor(out, block, _smem_layout(block, out.dtype))


def w4a8_gemm_gluon(x_q, x_scale, w_packed, w_scale, bias=None, out_dtype=torch.bfloat16, group_size=0, config=None):
    """Gluon kernel for Hopper, same contract as :func:`.w4a8.w4a8_gemm_reference` (group_size=0 only)."""
    m, n, k = check_scaled_gemm("w4a8_gemm", x_q, x_scale, w_packed, w_scale, bias, packed=True, group_size=group_size)
    if group_size != 0:
        raise ValueError("w4a8_gemm_gluon: only per-channel weight scales (group_size=0) are implemented")
    require_hopper("w4a8_gemm_gluon", x_q)
    cfg = as_config(config, W4A8_GLUON_CONFIG)
    check_shape("w4a8_gemm_gluon", k, n, cfg.bk, out_dtype)
    if k > _MAX_K:
        raise ValueError(f"w4a8_gemm_gluon: K={k} could overflow the x16 INT32 accumulator (at most {_MAX_K})")
    # bn = 128: 16 weight rows per consumer warp; more would make ptxas serialize the wgmmas.
    if cfg.bk != 2 * HALF or cfg.split or cfg.bn != 128 or cfg.bm not in (64, 128, 256) or cfg.bm % cfg.epi_n \
            or cfg.epi_bufs < 1:
        raise ValueError(f"w4a8_gemm_gluon: unsupported config {tuple(cfg)} (needs bk={2 * HALF}, bn=128, "
                         "split=False, bm in 64/128/256 divisible by epi_n)")
    if w4a8_smem_bytes(cfg) > _SMEM_LIMIT:
        raise ValueError(f"w4a8_gemm_gluon: config {tuple(cfg)} needs {w4a8_smem_bytes(cfg)} bytes of shared "
                         f"memory, more than the {_SMEM_LIMIT} a CTA may use")
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0:
        return out
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    x_q, w_packed = x_q.contiguous(), w_packed.contiguous()
    x_desc = TensorDescriptor.from_tensor(x_q, [cfg.bm, cfg.bk], _smem_layout([cfg.bm, cfg.bk], torch.int8))
    w_desc = TensorDescriptor.from_tensor(w_packed, [cfg.bn, HALF], _smem_layout([cfg.bn, HALF], torch.int8))
    o_desc = w4a8_output_descriptor(out, cfg)
    xs_desc, ws_desc, b_desc = vector_descriptors(x_scale, w_scale, bias, cfg.bm, cfg.bn)
    grid = (min(-(-m // cfg.bm) * -(-n // cfg.bn), _sm_count(x_q.device)),)
    _w4a8_gluon_kernel[grid](x_desc, w_desc, o_desc, xs_desc, ws_desc, b_desc, m, n, k,
                             HAS_BIAS=bias is not None, GROUP_M=cfg.group_m, STAGES=cfg.stages,
                             EPI_BUFS=cfg.epi_bufs, PRODUCER_REGS=_PRODUCER_REGS, num_warps=8)
    return out
