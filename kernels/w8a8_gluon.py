"""W8A8 GEMM for Hopper written in Gluon: persistent, warp-specialized, asynchronous wgmma.

Why a second W8A8 kernel: plain Triton issues the TMA loads, the wgmma and the epilogue from
the same warps and splits the 256-wide integer wgmma into two halves that both re-read the
activation tile from shared memory; on the H100 it tops out near 1.2-1.3 POPS at video sizes.
Here one producer warp only streams X and W tiles through a ring of shared-memory stages
(mbarrier-synchronized), and the two consumer warpgroups split every 128 x 256 output tile by
rows, load their X rows into registers once per stage (so shared memory carries the weight
tile twice and the activations once per stage, the least this tile shape allows) and keep one
wgmma group in flight while they wait for the next stage. The grid is one CTA per SM walking
the tiles in the grouped order of :mod:`.w8a8`, so the producer runs ahead into the next tile
while the consumers are in their epilogue. The epilogue scales, casts and writes BF16/FP16
through shared memory and TMA stores, which clip the ragged M and N edges (TMA loads
zero-fill them).

Contract and reference: :func:`.w8a8.w8a8_gemm_reference`. CUDA compute capability 9.0 only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import check_scaled_gemm
from ._triton import HAS_TRITON

try:  # Gluon ships with Triton >= 3.4 as an experimental module; the pack must import without it.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )

    HAS_GLUON = HAS_TRITON
except Exception:  # noqa: BLE001 - any import failure means "no Gluon"
    HAS_GLUON = False


class GluonGemmConfig(NamedTuple):
    """Tile and pipeline parameters (a tuple, so it prints and serializes like the Triton configs).

    bm x bn is the output tile (two consumer warpgroups take bm/2 rows each), bk the K depth of
    one pipeline stage, stages the ring depth, epi_n x epi_bufs the width and count of the
    epilogue's shared-memory staging buffers, group_m the grouped tile order. a_regs: the
    X rows go to wgmma from registers (loaded once per stage) rather than from shared memory
    (read once per n=128 half). split: the two consumer warpgroups run as separate 4-warp
    partitions, each handing a stage back as soon as its own wgmma is done with it, rather
    than as one 8-warp partition. ptxas (CUDA 12.8/13 of Triton 3.6) serializes every
    register-operand wgmma (C7512, "insufficient register resources") when a_regs is
    combined with split or with 128 rows per warpgroup (bm=256), so those are rejected.
    """

    bm: int = 128
    bn: int = 256
    bk: int = 128
    group_m: int = 8
    stages: int = 4
    epi_n: int = 64
    epi_bufs: int = 2
    a_regs: bool = True
    split: bool = False


# 128 x 256 output tiles, each consumer warpgroup 64 x 256 (128 INT32 accumulators per thread,
# as many as fit beside the operands), which moves the fewest shared-memory bytes per MAC;
# 4 stages of 48 KB plus 2 x 16 KB of epilogue staging fit in the 227 KB a CTA may use.
# Not yet tuned on the H100 (benchmarks/gluon_check.py sweeps it).
W8A8_GLUON_CONFIG = GluonGemmConfig()


def w8a8_gluon_config(k: int, n: int) -> GluonGemmConfig:
    """Per-shape choice from the H100 sweep (benchmarks/results/gluon_h100.json, M = 118,800):
    X from shared memory won at K=3072/N=3072 (1412 vs 1388 TOPS) and K=12288 (1511 vs 1436);
    at N=21504 the split consumer partitions added more (1441 vs 1325)."""
    if n >= 16384:
        return W8A8_GLUON_CONFIG._replace(a_regs=False, split=True)
    return W8A8_GLUON_CONFIG._replace(a_regs=False)
_CONSUMER_REGS = 232  # 2 consumer warpgroups x 128 threads x 232 + 1 producer warpgroup x 40 <= 64K
_PRODUCER_REGS = 40


if HAS_GLUON:

    @gluon.constexpr_function
    def _instr_n(bn):
        # Triton 3.6 lowers integer wgmma only up to n=224 (PTX allows 256), so a 256-wide
        # tile is issued as two n=128 halves.
        for n in (224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16):
            if bn % n == 0:
                return n
        raise ValueError(f"no integer wgmma shape divides BN={bn}")

    @gluon.jit
    def _tile_coords(tile, num_m, num_n, GROUP_M: gl.constexpr):
        # Grouped order: GROUP_M row-tiles share each weight column-tile while it is in L2.
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        rows = gl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % rows
        pid_n = (tile % per_group) // rows
        return pid_m, pid_n

    @gluon.jit
    def _tma_producer(x_desc, w_desc, x_bufs, w_bufs, ready, empty, vec_descs, vecs, M, N, K,
                      GROUP_M: gl.constexpr, HAS_BIAS: gl.constexpr):
        # One warp: the whole partition is this loop, so a TMA is issued the moment a stage
        # frees up, whatever the consumers are doing (the next tile's loads overlap their
        # epilogue). Shared with the W4A8 kernel, whose W tile is half as wide in K.
        BM: gl.constexpr = x_desc.block_type.shape[0]
        BKX: gl.constexpr = x_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        BKW: gl.constexpr = w_desc.block_type.shape[1]
        STAGES: gl.constexpr = x_bufs.type.shape[0]
        xs_desc, ws_desc, b_desc = vec_descs
        xs_buf, ws_buf, b_buf, vec_ready, vec_empty = vecs
        num_m = gl.cdiv(M, BM)
        num_n = gl.cdiv(N, BN)
        k_steps = K // BKX
        it = 0
        t = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
            for ki in range(k_steps):
                s = it % STAGES
                # A fresh mbarrier counts its (virtual) previous phase as complete, so the
                # first lap over the ring passes without waiting.
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(x_desc, [pid_m * BM, ki * BKX], bar, x_bufs.index(s))
                tma.async_copy_global_to_shared(w_desc, [pid_n * BN, ki * BKW], bar, w_bufs.index(s))
                it += 1
            # The tile's scale and bias vectors go to shared memory too, so the epilogue never
            # waits on a global load. One buffer suffices: it is refilled after this tile's
            # stages are issued, by which time the consumers finished the previous epilogue.
            mbarrier.wait(vec_empty, (t & 1) ^ 1)
            if HAS_BIAS:
                mbarrier.expect(vec_ready, xs_desc.block_type.nbytes + ws_desc.block_type.nbytes
                                + b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(b_desc, [pid_n * BN], vec_ready, b_buf)
            else:
                mbarrier.expect(vec_ready, xs_desc.block_type.nbytes + ws_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(xs_desc, [pid_m * BM], vec_ready, xs_buf)
            tma.async_copy_global_to_shared(ws_desc, [pid_n * BN], vec_ready, ws_buf)
            t += 1

    @gluon.jit
    def _split_cols(x, PARTS: gl.constexpr):
        # [R, C] -> PARTS tensors [R, C / PARTS]; in the wgmma accumulator layout the high
        # column bits live in registers, so this renames registers and moves no data.
        xs = (x,)
        for _ in gl.static_range(PARTS.bit_length() - 1):
            nxt = ()
            for j in gl.static_range(len(xs)):
                y = xs[j]
                nxt += y.reshape(y.shape[0], 2, y.shape[1] // 2).permute(0, 2, 1).split()
            xs = nxt
        return xs

    @gluon.jit
    def _release(bar, READ_BY_THREADS: gl.constexpr):
        # Hand a stage back to the producer. Lowered as a barrier over this partition's warps
        # and one arrival. If threads read the stage with ordinary loads, fence them against
        # the TMA (async proxy) writes that the producer issues next into the same bytes.
        if READ_BY_THREADS:
            fence_async_shared()
        mbarrier.arrive(bar)

    @gluon.jit
    def _w8a8_k_step(x_bufs, w_bufs, ready, empty, acc, it, prev, started: gl.constexpr, ROW0: gl.constexpr,
                     A_REGS: gl.constexpr):
        STAGES: gl.constexpr = x_bufs.type.shape[0]
        ROWS: gl.constexpr = acc.type.shape[0]
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=4)
        s = it % STAGES
        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
        b = w_bufs.index(s).permute((1, 0))
        if ROWS == x_bufs.type.shape[1]:
            a_smem = x_bufs.index(s)
        else:
            a_smem = x_bufs.index(s).slice(ROW0, ROWS)
        if A_REGS:
            # Triton 3.6 splits a 256-wide integer wgmma into two n=128 halves that would
            # each read the X rows from shared memory; loading them into registers once
            # halves that traffic.
            a = a_smem.load(a_layout)
        else:
            a = a_smem
        acc = warpgroup_mma(a, b, acc, use_acc=started, is_async=True)
        # Keep this group in flight; the previous one is now complete, so its stage can be
        # refilled while the tensor cores work on this one. (Triton cannot list an int8
        # register operand as a wait dependency; the unrolled caller keeps it intact.)
        if A_REGS:
            acc = warpgroup_mma_wait(1, deps=(acc, b))[0]
        else:
            acc = warpgroup_mma_wait(1, deps=(acc, a, b))[0]
        if started:
            _release(empty.index(prev), A_REGS)
        return acc, it + 1, s

    @gluon.jit
    def _scaled_store(acc, o_desc, o_bufs, vecs, t, off_m, off_n, ROW0: gl.constexpr, HAS_BIAS: gl.constexpr):
        # acc[r, c] * x_scale[off_m + r] * w_scale[off_n + c] + bias, in EPI_N-column chunks so
        # that only one chunk of scales and bias is live beside the accumulator; each chunk
        # goes out by TMA (which clips the ragged edges) while the next is computed.
        ROWS: gl.constexpr = acc.type.shape[0]
        BN: gl.constexpr = acc.type.shape[1]
        EPI_N: gl.constexpr = o_desc.block_type.shape[1]
        EPI_BUFS: gl.constexpr = o_bufs.type.shape[0]
        xs_buf, ws_buf, b_buf, vec_ready, vec_empty = vecs
        epi_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=acc.type.layout.warps_per_cta, instr_shape=[16, _instr_n(EPI_N), 32])
        row_layout: gl.constexpr = gl.SliceLayout(1, epi_layout)
        col_layout: gl.constexpr = gl.SliceLayout(0, epi_layout)
        mbarrier.wait(vec_ready, t & 1)
        xs = xs_buf.slice(ROW0, ROWS).load(row_layout)
        parts = _split_cols(acc, BN // EPI_N)
        for c in gl.static_range(BN // EPI_N):
            part = gl.convert_layout(parts[c], epi_layout, assert_trivial=True)
            ws = ws_buf.slice(c * EPI_N, EPI_N).load(col_layout)
            val = part.to(gl.float32) * xs[:, None] * ws[None, :]
            if HAS_BIAS:
                val = val + b_buf.slice(c * EPI_N, EPI_N).load(col_layout).to(gl.float32)[None, :]
            if c == BN // EPI_N - 1:
                _release(vec_empty, True)
            buf = o_bufs.index(c % EPI_BUFS)
            # Only the read of this buffer's previous chunk, issued EPI_BUFS chunks ago, has
            # to be complete (a .read wait) before it is overwritten.
            tma.store_wait(EPI_BUFS - 1)
            buf.store(val.to(o_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(o_desc, [off_m, off_n + c * EPI_N], buf)

    @gluon.jit
    def _w8a8_consumer(x_desc, w_desc, o_desc, x_bufs, w_bufs, ready, empty, vecs, M, N, K,
                       ROW0: gl.constexpr, HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr,
                       EPI_BUFS: gl.constexpr, A_REGS: gl.constexpr):
        # Rows ROW0 .. ROW0 + ROWS of every BM x BN tile; ROWS = BM (one 8-warp partition) or
        # BM / 2 (one 4-warp partition per warpgroup).
        BM: gl.constexpr = x_desc.block_type.shape[0]
        BK: gl.constexpr = x_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        ROWS: gl.constexpr = o_desc.block_type.shape[0]
        EPI_N: gl.constexpr = o_desc.block_type.shape[1]
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                             instr_shape=[16, _instr_n(BN), 32])
        o_bufs = gl.allocate_shared_memory(o_desc.dtype, [EPI_BUFS, ROWS, EPI_N], o_desc.layout)

        num_m = gl.cdiv(M, BM)
        num_n = gl.cdiv(N, BN)
        k_steps = K // BK
        acc = gl.zeros([ROWS, BN], gl.int32, acc_layout)
        it = 0
        t = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
            # Unrolled by two so that consecutive steps load their register operand into
            # different registers: in a rolled loop the next step would overwrite the operand
            # of the wgmma still in flight, and ptxas would serialize every wgmma.
            acc, it, prev = _w8a8_k_step(x_bufs, w_bufs, ready, empty, acc, it, 0, False, ROW0, A_REGS)
            for _ in range((k_steps - 1) // 2):
                acc, it, prev = _w8a8_k_step(x_bufs, w_bufs, ready, empty, acc, it, prev, True, ROW0, A_REGS)
                acc, it, prev = _w8a8_k_step(x_bufs, w_bufs, ready, empty, acc, it, prev, True, ROW0, A_REGS)
            if (k_steps - 1) % 2:
                acc, it, prev = _w8a8_k_step(x_bufs, w_bufs, ready, empty, acc, it, prev, True, ROW0, A_REGS)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            _release(empty.index(prev), A_REGS)
            _scaled_store(acc, o_desc, o_bufs, vecs, t, pid_m * BM + ROW0, pid_n * BN, ROW0, HAS_BIAS)
            t += 1
        tma.store_wait(0)

    @gluon.jit
    def _alloc_vectors(xs_desc, ws_desc, b_desc, consumers: gl.constexpr):
        # Shared-memory copies of one tile's x_scale, w_scale and bias, and their barriers.
        xs_buf = gl.allocate_shared_memory(xs_desc.dtype, xs_desc.block_type.shape, xs_desc.layout)
        ws_buf = gl.allocate_shared_memory(ws_desc.dtype, ws_desc.block_type.shape, ws_desc.layout)
        b_buf = gl.allocate_shared_memory(b_desc.dtype, b_desc.block_type.shape, b_desc.layout)
        vec_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        vec_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(vec_ready, count=1)
        mbarrier.init(vec_empty, count=consumers)
        return xs_buf, ws_buf, b_buf, vec_ready, vec_empty

    @gluon.jit
    def _w8a8_gluon_kernel(x_desc, w_desc, o_desc, xs_desc, ws_desc, b_desc, M, N, K,
                           HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                           EPI_BUFS: gl.constexpr, A_REGS: gl.constexpr,
                           CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        BM: gl.constexpr = x_desc.block_type.shape[0]
        BK: gl.constexpr = x_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        SPLIT: gl.constexpr = o_desc.block_type.shape[0] < BM
        CONSUMERS: gl.constexpr = 2 if SPLIT else 1  # consumer partitions, one arrival each per release
        x_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BM, BK], x_desc.layout)
        w_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BK], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=CONSUMERS)
        vecs = _alloc_vectors(xs_desc, ws_desc, b_desc, CONSUMERS)
        fence_async_shared()

        vec_descs = (xs_desc, ws_desc, b_desc)
        # Tuple "+" would unwrap the constexprs, so each partition gets its own literal tuple.
        if SPLIT:
            gl.warp_specialize([
                (_w8a8_consumer, (x_desc, w_desc, o_desc, x_bufs, w_bufs, ready, empty, vecs, M, N, K,
                                  gl.constexpr(0), HAS_BIAS, GROUP_M, EPI_BUFS, A_REGS)),
                (_w8a8_consumer, (x_desc, w_desc, o_desc, x_bufs, w_bufs, ready, empty, vecs, M, N, K,
                                  gl.constexpr(BM // 2), HAS_BIAS, GROUP_M, EPI_BUFS, A_REGS)),
                (_tma_producer, (x_desc, w_desc, x_bufs, w_bufs, ready, empty, vec_descs, vecs, M, N, K,
                                 GROUP_M, HAS_BIAS)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_w8a8_consumer, (x_desc, w_desc, o_desc, x_bufs, w_bufs, ready, empty, vecs, M, N, K,
                                  gl.constexpr(0), HAS_BIAS, GROUP_M, EPI_BUFS, A_REGS)),
                (_tma_producer, (x_desc, w_desc, x_bufs, w_bufs, ready, empty, vec_descs, vecs, M, N, K,
                                 GROUP_M, HAS_BIAS)),
            ], [1], [PRODUCER_REGS])


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def require_hopper(name: str, t: torch.Tensor) -> None:
    """The Gluon kernels use wgmma, TMA and setmaxnreg, which exist on sm_90 only."""
    if not HAS_GLUON:
        raise RuntimeError(f"{name}: needs Triton with Gluon (triton.experimental.gluon), which is not importable")
    if not t.is_cuda:
        raise RuntimeError(f"{name}: the Gluon kernel runs on CUDA tensors only, got device {t.device}")
    cap = torch.cuda.get_device_capability(t.device)
    if cap != (9, 0):
        raise RuntimeError(f"{name}: the Gluon kernel is written for Hopper (sm_90), this GPU is sm_{cap[0]}{cap[1]}")


def w8a8_gemm_gluon(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16, config=None):
    """Gluon kernel for Hopper, same contract as :func:`.w8a8.w8a8_gemm_reference`."""
    m, n, k = check_scaled_gemm("w8a8_gemm", x_q, x_scale, w_q, w_scale, bias, packed=False, group_size=0)
    require_hopper("w8a8_gemm_gluon", x_q)
    cfg = as_config(config, W8A8_GLUON_CONFIG)
    check_config("w8a8_gemm_gluon", cfg, k, n, out_dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0:
        return out
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    x_q, w_q = x_q.contiguous(), w_q.contiguous()
    x_desc = TensorDescriptor.from_tensor(x_q, [cfg.bm, cfg.bk], _smem_layout([cfg.bm, cfg.bk], torch.int8))
    w_desc = TensorDescriptor.from_tensor(w_q, [cfg.bn, cfg.bk], _smem_layout([cfg.bn, cfg.bk], torch.int8))
    o_desc = output_descriptor(out, cfg)
    xs_desc, ws_desc, b_desc = vector_descriptors(x_scale, w_scale, bias, cfg.bm, cfg.bn)
    grid = (min(-(-m // cfg.bm) * -(-n // cfg.bn), _sm_count(x_q.device)),)
    _w8a8_gluon_kernel[grid](x_desc, w_desc, o_desc, xs_desc, ws_desc, b_desc, m, n, k,
                             HAS_BIAS=bias is not None, GROUP_M=cfg.group_m, STAGES=cfg.stages,
                             EPI_BUFS=cfg.epi_bufs, A_REGS=bool(cfg.a_regs),
                             CONSUMER_REGS=_CONSUMER_REGS, PRODUCER_REGS=_PRODUCER_REGS,
                             num_warps=4 if cfg.split else 8)
    return out


_GL_DTYPES = {}


def _smem_layout(block, torch_dtype):
    if not _GL_DTYPES:
        _GL_DTYPES.update({torch.int8: gl.int8, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16,
                           torch.float32: gl.float32})
    return gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[torch_dtype])


def vector_descriptors(x_scale, w_scale, bias, bm: int, bn: int):
    """1-D TMA descriptors of x_scale (bm per tile), w_scale and bias (bn per tile); without
    a bias the w_scale descriptor stands in (never read)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    def desc(t, block):
        t = t.contiguous()
        if t.data_ptr() % 16:  # a view at an odd offset: TMA needs 16-byte aligned bases
            t = t.clone()
        return TensorDescriptor(t, [t.shape[0]], [1], [block], _smem_layout([block], t.dtype))

    ws = desc(w_scale, bn)
    return desc(x_scale, bm), ws, (desc(bias, bn) if bias is not None else ws)


def output_descriptor(out: torch.Tensor, cfg: GluonGemmConfig):
    """TMA descriptor of one epilogue chunk: the rows of one consumer partition x epi_n columns."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    block = [cfg.bm // 2 if cfg.split else cfg.bm, cfg.epi_n]
    return TensorDescriptor.from_tensor(out, block, _smem_layout(block, out.dtype))


def as_config(config, default: GluonGemmConfig) -> GluonGemmConfig:
    if config is None:
        return default
    if isinstance(config, dict):
        return default._replace(**config)
    return GluonGemmConfig(*config)


def check_shape(name: str, k: int, n: int, bk: int, out_dtype) -> None:
    """What any of the Gluon kernels needs of the problem, checked before Triton fails obscurely."""
    if out_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: out_dtype must be bfloat16 or float16, got {out_dtype}")
    if k % bk:
        raise ValueError(f"{name}: K={k} is not a multiple of the K tile {bk}")
    if n % 8:
        raise ValueError(f"{name}: N={n} must be a multiple of 8 (TMA stores need 16-byte output rows)")


def check_config(name: str, cfg: GluonGemmConfig, k: int, n: int, out_dtype) -> None:
    check_shape(name, k, n, cfg.bk, out_dtype)
    if cfg.bm not in (128, 256) or cfg.bn not in (64, 128, 256) or cfg.bn % cfg.epi_n or cfg.epi_bufs < 1:
        raise ValueError(f"{name}: unsupported config {tuple(cfg)}")
    if cfg.a_regs and (cfg.split or cfg.bm > 128):
        raise ValueError(f"{name}: config {tuple(cfg)}: a_regs needs split=False and bm=128 "
                         "(otherwise ptxas serializes the wgmmas)")
    if smem_bytes(cfg) > _SMEM_LIMIT:
        raise ValueError(f"{name}: config {tuple(cfg)} needs {smem_bytes(cfg)} bytes of shared memory, "
                         f"more than the {_SMEM_LIMIT} a CTA may use")


_SMEM_LIMIT = 232448  # 227 KB, the opt-in maximum per CTA on sm_90


def smem_bytes(cfg: GluonGemmConfig) -> int:
    """Pipeline ring + epilogue staging + scale/bias vectors (+ barriers), as the kernel allocates them."""
    return cfg.stages * (cfg.bm + cfg.bn) * cfg.bk + cfg.epi_bufs * cfg.bm * cfg.epi_n * 2 + vectors_bytes(cfg) \
        + 16 * cfg.stages + 64


def vectors_bytes(cfg: GluonGemmConfig) -> int:
    return 4 * cfg.bm + 4 * cfg.bn + 4 * cfg.bn  # bias counted as FP32, the widest it can be
