"""The Triton kernels of :mod:`bnkit.kernels.gpu`, as plain functions until :func:`build`.

Triton decides when a function is decorated whether it will be compiled for the GPU or
run by its interpreter (``TRITON_INTERPRET=1``): decorating at import would fix that
choice whenever this module happens to be imported first (test collection, say). So the
functions below are undecorated, and :func:`build` replaces each of them in this module's
namespace by its ``triton.jit`` form on first use; the kernels then find the decorated
helpers under the same names.

Every kernel walks the tensor as rows of a 2-D array (see :mod:`bnkit.kernels.gpu`):

- ``CL`` False (NCHW-like, "ncl"): rows are samples n, columns the L spatial positions
  of one channel; program axis 0 is the channel, program axis 1 a block of
  (row range, column range). Loads are contiguous along the columns.
- ``CL`` True (channels-last and 2D, "nc"): rows are the N * spatial positions,
  columns the channels; program axis 0 is a block of ``BLOCK_K`` channels, axis 1 a
  range of rows. Loads are contiguous along the channels.

A program covers rows [r_lo, r_hi) and columns [k_lo, k_hi) in tiles of
(BLOCK_R, BLOCK_K) values. Per-channel values of a tile are reduced over its rows and
columns (``CL`` False: the whole tile is one channel) or over its rows only (``CL``
True: one value per column).

Ghost batches run in the same launch: program axis 2 is the ghost batch j, R the rows
of one, and the rows of ghost batch j are [j * R, (j + 1) * R). Its per-channel values
(shift, statistics, coefficients, partial sums) sit at [j * NC, (j + 1) * NC) of
vectors of ghosts * NC values (NC: the channels); with one ghost batch (the whole batch)
j is 0 and R all rows.

Activation codes (``ACT``): 0 identity, 1 relu, 2 leaky_relu, 3 elu. The activation's
parameter (and, for the ELU inverse, the stand-in for a saturated pre-activation) come
from a two-element tensor in the compute dtype, so float64 keeps its precision.
"""

# Triton kernels are untyped by nature: mypy skips this module's bodies (see pyproject).

from __future__ import annotations

import inspect
from typing import Any

tl: Any = None

#: The names :func:`build` decorates, helpers first.
_NAMES = (
    "_program",
    "_tile",
    "_valid",
    "_vec",
    "_csum",
    "_cb",
    "_store_part",
    "_act",
    "_grad",
    "_batch_moments",
    "stats_kernel",
    "affine_kernel",
    "reduce_kernel",
    "input_kernel",
    "merge_kernel",
    "update_kernel",
)
_BUILT = False
#: Sizes a kernel is not recompiled for (Triton specializes integer arguments on being
#: 1 or a multiple of 16 otherwise). L and stride_r stay specialized: they decide whether
#: the loads along a row can be vectorized.
_NOT_SPECIALIZED = ("R", "K", "C", "NC", "B", "KB", "ROWS_PER", "COLS_PER")


def build() -> None:
    """Decorate the kernels with ``triton.jit`` (once; reads ``TRITON_INTERPRET`` now)."""
    global _BUILT, tl
    if _BUILT:
        return
    import triton
    import triton.language as language

    tl = language
    namespace = globals()
    for name in _NAMES:
        fn = namespace[name]
        params = inspect.signature(fn).parameters
        fixed = [p for p in _NOT_SPECIALIZED if p in params] if name.endswith("_kernel") else []
        namespace[name] = triton.jit(fn, do_not_specialize=fixed)
    _BUILT = True


# ---- helpers -------------------------------------------------------------------------


def _program(R, K, KB, ROWS_PER, COLS_PER, CL: tl.constexpr, BLOCK_K: tl.constexpr):
    """(g, b, r_lo, r_hi, k_lo, k_hi, j) of this program: its channel (block) g, its block
    b along axis 1, the rows and columns it covers, and its ghost batch j (axis 2), whose
    rows are [j * R, (j + 1) * R)."""
    g = tl.program_id(0)
    b = tl.program_id(1)
    j = tl.program_id(2).to(tl.int64)
    rb = b // KB
    kb = b % KB
    r_lo = j * R + rb * ROWS_PER
    r_hi = tl.minimum(r_lo + ROWS_PER, (j + 1) * R)
    if CL:
        k_lo = g * BLOCK_K
        k_hi = tl.minimum(k_lo + BLOCK_K, K)
    else:
        k_lo = kb * COLS_PER
        k_hi = tl.minimum(k_lo + COLS_PER, K)
    return g, b, r_lo, r_hi, k_lo, k_hi, j


def _tile(r0, k0, r_hi, k_hi, base, stride_r, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """(offsets, in-bounds, rows, cols) of the tile at (r0, k0): rows r0 .. r0 + BLOCK_R,
    columns k0 .. k0 + BLOCK_K, element (r, k) at base + r * stride_r + k."""
    rows = r0 + tl.arange(0, BLOCK_R)
    cols = k0 + tl.arange(0, BLOCK_K)
    inb = (rows < r_hi)[:, None] & (cols < k_hi)[None, :]
    off = base + rows.to(tl.int64)[:, None] * stride_r + cols[None, :]
    return off, inb, rows, cols


def _valid(mask_ptr, rows, cols, inb, r_hi, L, CL: tl.constexpr):
    """In-bounds and valid under the (N, *spatial) mask, read as bytes (nonzero = valid):
    one byte per row (CL) or per (n, l)."""
    if CL:
        v = tl.load(mask_ptr + rows.to(tl.int64), mask=rows < r_hi, other=0)
        ok = inb & (v != 0)[:, None]
    else:
        moff = rows.to(tl.int64)[:, None] * L + cols[None, :]
        v = tl.load(mask_ptr + moff, mask=inb, other=0)
        ok = inb & (v != 0)
    return ok


def _vec(ptr, g, k_lo, k_hi, CL: tl.constexpr, BLOCK_K: tl.constexpr):
    """A per-channel vector's value(s) for this program: (1, BLOCK_K) (CL) or a scalar."""
    if CL:
        cols = k_lo + tl.arange(0, BLOCK_K)
        v = tl.load(ptr + cols, mask=cols < k_hi, other=0.0)[None, :]
    else:
        v = tl.load(ptr + g)
    return v


def _csum(v, CL: tl.constexpr):
    """Per-channel sum of a tile: over its rows (CL) or over all of it."""
    s = tl.sum(v, axis=0) if CL else tl.sum(tl.sum(v, axis=1), axis=0)
    return s


def _cb(v, CL: tl.constexpr):
    """A per-channel value of :func:`_csum`'s shape, broadcastable against a tile."""
    out = v[None, :] if CL else v
    return out


def _store_part(ptr, val, g, b, B, k_lo, k_hi, CL: tl.constexpr, BLOCK_K: tl.constexpr):
    """Store a program's per-channel partial at [channel, b] of a (C, B) array."""
    if CL:
        cols = k_lo + tl.arange(0, BLOCK_K)
        tl.store(ptr + cols.to(tl.int64) * B + b, val, mask=cols < k_hi)
    else:
        tl.store(ptr + g.to(tl.int64) * B + b, val)


def _act(z, p, ACT: tl.constexpr):
    """y = act(z). relu keeps NaN (as torch.relu); elu's exp is taken of min(z, 0) so that
    the branch not taken cannot overflow."""
    if ACT == 1:
        z = tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * p)
    elif ACT == 3:
        z = tl.where(z > 0, z, (tl.exp(tl.minimum(z, 0.0)) - 1.0) * p)
    return z


def _grad(g, src, s, za, zb, p, zfloor, ACT: tl.constexpr, FROM_Y: tl.constexpr):
    """(g', v): g' = g * act'(z), and v = z recovered from the output (FROM_Y, src = y)
    or v = src (src = x; z = (x - s) * za + zb recomputed for the slope).

    From the output of an ELU, where y + alpha <= 0 or y / alpha rounds to -1 (the output
    saturated: z = log1p(y / alpha) would be -inf), the slope y + alpha is 0 and g' is
    set to exactly 0, and v takes the finite stand-in ``zfloor`` (the pre-activation at
    which the output saturates): the reductions get no contribution there, never NaN.
    """
    v = src
    gp = g
    if FROM_Y:
        if ACT == 2:
            pos = src > 0
            v = tl.where(pos, src, src / p)
            gp = tl.where(pos, g, g * p)
        elif ACT == 3:
            pos = src > 0
            slope = src + p
            w = 1.0 + tl.where(pos, 0.0, src / p)
            live = (slope > 0) & (w > 0)
            z = tl.log(tl.where(live, w, 1.0))
            v = tl.where(pos, src, tl.where(live, z, zfloor))
            gp = tl.where(pos, g, tl.where(live, g * slope, 0.0))
    elif ACT != 0:
        z = (src - s) * za + zb
        if ACT == 1:
            gp = tl.where(z > 0, g, 0.0)
        elif ACT == 2:
            gp = tl.where(z > 0, g, g * p)
        else:
            y = (tl.exp(tl.minimum(z, 0.0)) - 1.0) * p
            gp = tl.where(z > 0, g, g * (y + p))
    return gp, v


# ---- kernels -------------------------------------------------------------------------


def stats_kernel(
    x_ptr,
    mask_ptr,
    first_ptr,
    shift_ptr,
    part_n,
    part_mean,
    part_m2,
    R,
    K,
    L,
    stride_r,
    NC,
    B,
    KB,
    ROWS_PER,
    COLS_PER,
    CL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per-(channel, block) count, mean of x - shift, and M2, in one read of the block.

    The shift is x at the first valid position (``first_ptr`` holds its index in the
    mask's order; position 0 without a mask). Each tile is reduced exactly in registers
    (its mean, then its squared deviations from that mean) and merged into the program's
    running (count, mean, M2) with Chan's update, so neither cancellation in E[x^2] -
    E[x]^2 nor a second read of memory ever occurs.
    """
    g, b, r_lo, r_hi, k_lo, k_hi, j = _program(R, K, KB, ROWS_PER, COLS_PER, CL, BLOCK_K)
    acc_t = shift_ptr.dtype.element_ty
    vo = j * NC  # this ghost batch's per-channel values: [j * NC, (j + 1) * NC)
    if CL:
        base = 0
        cols = k_lo + tl.arange(0, BLOCK_K)
        s_off = tl.load(first_ptr + j) * stride_r if HAS_MASK else j * R * stride_r
        s = tl.load(x_ptr + s_off + cols, mask=cols < k_hi, other=0.0).to(acc_t)
        tl.store(shift_ptr + vo + cols, s, mask=(cols < k_hi) & (cols * 0 + b == 0))
        s = s[None, :]
    else:
        base = g.to(tl.int64) * L
        if HAS_MASK:
            first = tl.load(first_ptr + j)
            s_off = (first // L) * stride_r + first % L
        else:
            s_off = j * R * stride_r
        s = tl.load(x_ptr + base + s_off).to(acc_t)
        tl.store(shift_ptr + vo + g, s, mask=b == 0)
    zero = _csum(tl.zeros([BLOCK_R, BLOCK_K], acc_t), CL)
    n_a = zero
    mean_a = zero
    m2_a = zero
    for r0 in range(r_lo, r_hi, BLOCK_R):
        for k0 in range(k_lo, k_hi, BLOCK_K):
            off, inb, rows, cols = _tile(r0, k0, r_hi, k_hi, base, stride_r, BLOCK_R, BLOCK_K)
            x = tl.load(x_ptr + off, mask=inb, other=0.0).to(acc_t)
            ok = _valid(mask_ptr, rows, cols, inb, r_hi, L, CL) if HAS_MASK else inb
            d = tl.where(ok, x - s, 0.0)
            n_t = _csum(ok.to(acc_t), CL)
            mean_t = _csum(d, CL) / tl.maximum(n_t, 1.0)
            e = tl.where(ok, d - _cb(mean_t, CL), 0.0)
            m2_t = _csum(e * e, CL)
            n = n_a + n_t
            delta = mean_t - mean_a
            frac = n_t / tl.maximum(n, 1.0)
            mean_a = mean_a + delta * frac
            m2_a = m2_a + m2_t + delta * delta * n_a * frac
            n_a = n
    _store_part(part_n + vo * B, n_a, g, b, B, k_lo, k_hi, CL, BLOCK_K)
    _store_part(part_mean + vo * B, mean_a, g, b, B, k_lo, k_hi, CL, BLOCK_K)
    _store_part(part_m2 + vo * B, m2_a, g, b, B, k_lo, k_hi, CL, BLOCK_K)


def affine_kernel(
    x_ptr,
    y_ptr,
    s_ptr,
    a_ptr,
    b_ptr,
    prm_ptr,
    R,
    K,
    L,
    stride_r,
    NC,
    KB,
    ROWS_PER,
    COLS_PER,
    CL: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y = act((x - s) * a + b) per channel (and ghost batch): one read of x, one write
    of y."""
    g, _b, r_lo, r_hi, k_lo, k_hi, j = _program(R, K, KB, ROWS_PER, COLS_PER, CL, BLOCK_K)
    acc_t = s_ptr.dtype.element_ty
    base = 0 if CL else g.to(tl.int64) * L
    vo = j * NC
    s = _vec(s_ptr + vo, g, k_lo, k_hi, CL, BLOCK_K)
    a = _vec(a_ptr + vo, g, k_lo, k_hi, CL, BLOCK_K)
    c = _vec(b_ptr + vo, g, k_lo, k_hi, CL, BLOCK_K)
    p = tl.load(prm_ptr)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        for k0 in range(k_lo, k_hi, BLOCK_K):
            off, inb, _rows, _cols = _tile(r0, k0, r_hi, k_hi, base, stride_r, BLOCK_R, BLOCK_K)
            x = tl.load(x_ptr + off, mask=inb, other=0.0).to(acc_t)
            y = _act((x - s) * a + c, p, ACT)
            tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=inb)


def reduce_kernel(
    g_ptr,
    src_ptr,
    s_ptr,
    m_ptr,
    za_ptr,
    zb_ptr,
    prm_ptr,
    part_g,
    part_gc,
    R,
    K,
    L,
    stride_r,
    NC,
    B,
    KB,
    ROWS_PER,
    COLS_PER,
    CL: tl.constexpr,
    ACT: tl.constexpr,
    FROM_Y: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per-(channel, block) sums of g' and g' * ((v - s) - m), one read of g and src.

    Accumulated per lane over the program's tiles, reduced once at the end.
    """
    g, b, r_lo, r_hi, k_lo, k_hi, j = _program(R, K, KB, ROWS_PER, COLS_PER, CL, BLOCK_K)
    acc_t = s_ptr.dtype.element_ty
    base = 0 if CL else g.to(tl.int64) * L
    vo = j * NC
    s = _vec(s_ptr + vo, g, k_lo, k_hi, CL, BLOCK_K)
    m = _vec(m_ptr + vo, g, k_lo, k_hi, CL, BLOCK_K)
    za = _vec(za_ptr + vo, g, k_lo, k_hi, CL, BLOCK_K)
    zb = _vec(zb_ptr + vo, g, k_lo, k_hi, CL, BLOCK_K)
    p = tl.load(prm_ptr)
    zfloor = tl.load(prm_ptr + 1)
    acc_g = tl.zeros([BLOCK_R, BLOCK_K], acc_t)
    acc_gc = tl.zeros([BLOCK_R, BLOCK_K], acc_t)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        for k0 in range(k_lo, k_hi, BLOCK_K):
            off, inb, _rows, _cols = _tile(r0, k0, r_hi, k_hi, base, stride_r, BLOCK_R, BLOCK_K)
            gv = tl.load(g_ptr + off, mask=inb, other=0.0).to(acc_t)
            sv = tl.load(src_ptr + off, mask=inb, other=0.0).to(acc_t)
            gp, v = _grad(gv, sv, s, za, zb, p, zfloor, ACT, FROM_Y)
            gp = tl.where(inb, gp, 0.0)
            acc_g += gp
            acc_gc += gp * ((v - s) - m)
    _store_part(part_g + vo * B, _csum(acc_g, CL), g, b, B, k_lo, k_hi, CL, BLOCK_K)
    _store_part(part_gc + vo * B, _csum(acc_gc, CL), g, b, B, k_lo, k_hi, CL, BLOCK_K)


def input_kernel(
    g_ptr,
    src_ptr,
    dx_ptr,
    s_ptr,
    a_ptr,
    k1_ptr,
    k0_ptr,
    za_ptr,
    zb_ptr,
    prm_ptr,
    mask_ptr,
    R,
    K,
    L,
    stride_r,
    NC,
    KB,
    ROWS_PER,
    COLS_PER,
    CL: tl.constexpr,
    ACT: tl.constexpr,
    FROM_Y: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dx = g' * a + ((v - s) * k1 + k0), the second term at valid positions only: one
    read of g and src, one write of dx."""
    g, _b, r_lo, r_hi, k_lo, k_hi, j = _program(R, K, KB, ROWS_PER, COLS_PER, CL, BLOCK_K)
    acc_t = s_ptr.dtype.element_ty
    base = 0 if CL else g.to(tl.int64) * L
    vo = j * NC
    s = _vec(s_ptr + vo, g, k_lo, k_hi, CL, BLOCK_K)
    a = _vec(a_ptr + vo, g, k_lo, k_hi, CL, BLOCK_K)
    k1 = _vec(k1_ptr + vo, g, k_lo, k_hi, CL, BLOCK_K)
    k0 = _vec(k0_ptr + vo, g, k_lo, k_hi, CL, BLOCK_K)
    za = _vec(za_ptr + vo, g, k_lo, k_hi, CL, BLOCK_K)
    zb = _vec(zb_ptr + vo, g, k_lo, k_hi, CL, BLOCK_K)
    p = tl.load(prm_ptr)
    zfloor = tl.load(prm_ptr + 1)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        for k0_ in range(k_lo, k_hi, BLOCK_K):
            off, inb, rows, cols = _tile(r0, k0_, r_hi, k_hi, base, stride_r, BLOCK_R, BLOCK_K)
            gv = tl.load(g_ptr + off, mask=inb, other=0.0).to(acc_t)
            sv = tl.load(src_ptr + off, mask=inb, other=0.0).to(acc_t)
            gp, v = _grad(gv, sv, s, za, zb, p, zfloor, ACT, FROM_Y)
            through = (v - s) * k1 + k0
            if HAS_MASK:
                ok = _valid(mask_ptr, rows, cols, inb, r_hi, L, CL)
                through = tl.where(ok, through, 0.0)
            dx = gp * a + through
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=inb)


def merge_kernel(
    part_a,
    part_b,
    part_c,
    out_a,
    out_b,
    out_c,
    C,
    B,
    CHAN: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Merge (C, B) per-block partials into (C,) results, BLOCK_C channels per program.

    CHAN: (count, mean, M2) partials into (count, mean, biased variance) by Chan's
    parallel update, two passes over the partials: count = sum n_b, mean = sum n_b mean_b /
    count, M2 = sum M2_b + sum n_b (mean_b - mean)^2. Otherwise: the sums of a and of b.
    """
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = ch < C
    acc_t = out_a.dtype.element_ty
    sa = tl.zeros([BLOCK_C, BLOCK_B], acc_t)
    sb = tl.zeros([BLOCK_C, BLOCK_B], acc_t)
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        m = cm[:, None] & (bs < B)[None, :]
        off = ch.to(tl.int64)[:, None] * B + bs[None, :]
        a = tl.load(part_a + off, mask=m, other=0.0)
        b = tl.load(part_b + off, mask=m, other=0.0)
        sa += a
        sb += a * b if CHAN else b
    n = tl.sum(sa, axis=1)
    s = tl.sum(sb, axis=1)
    if CHAN:
        mean = s / n
        sq = tl.zeros([BLOCK_C, BLOCK_B], acc_t)
        for b0 in range(0, B, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            m = cm[:, None] & (bs < B)[None, :]
            off = ch.to(tl.int64)[:, None] * B + bs[None, :]
            a = tl.load(part_a + off, mask=m, other=0.0)
            b = tl.load(part_b + off, mask=m, other=0.0)
            c = tl.load(part_c + off, mask=m, other=0.0)
            e = b - mean[:, None]
            sq += tl.where(m, c + a * e * e, 0.0)
        m2 = tl.sum(sq, axis=1)
        tl.store(out_a + ch, n, mask=cm)
        tl.store(out_b + ch, mean, mask=cm)
        tl.store(out_c + ch, m2 / n, mask=cm)
    else:
        tl.store(out_a + ch, n, mask=cm)
        tl.store(out_b + ch, s, mask=cm)


def _batch_moments(count_ptr, shift_ptr, smean_ptr, var_ptr, ch, cm, UNBIASED: tl.constexpr):
    """The batch mean and the variance to record, in float64, of channels ``ch``."""
    mean = tl.load(shift_ptr + ch, mask=cm, other=0.0).to(tl.float64)
    mean += tl.load(smean_ptr + ch, mask=cm, other=0.0).to(tl.float64)
    var = tl.load(var_ptr + ch, mask=cm, other=0.0).to(tl.float64)
    if UNBIASED:
        n = tl.load(count_ptr + ch, mask=cm, other=2.0).to(tl.float64)
        var = var * n / (n - 1.0)
    return mean, var


def update_kernel(
    count_ptr,
    shift_ptr,
    smean_ptr,
    var_ptr,
    rmean_ptr,
    rvar_ptr,
    tracked_ptr,
    momentum_ptr,
    recorded_ptr,
    C,
    HAS_MEAN: tl.constexpr,
    HAS_VAR: tl.constexpr,
    HAS_TRACKED: tl.constexpr,
    UNBIASED: tl.constexpr,
    SKIP: tl.constexpr,
    CUMULATIVE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The update of the running statistics, one program for all C channels, in float64
    as :func:`bnkit.kernels.portable.update_running_stats`: batch mean = shift + shifted
    mean, batch variance = var (* n / (n - 1) if UNBIASED); with SKIP, nothing changes
    unless every one of them is finite (a first pass); the counter is incremented (by
    whether the batch was recorded); new = batch * f + old * (1 - f) with f the momentum
    (a float64 value at ``momentum_ptr``) or, CUMULATIVE, 1 / counter. Writes whether the
    batch was recorded to ``recorded_ptr``."""
    ok = tl.full((), 1, tl.int32)
    if SKIP:
        bad = tl.zeros([BLOCK], tl.int32)
        for c0 in range(0, C, BLOCK):
            ch = c0 + tl.arange(0, BLOCK)
            cm = ch < C
            mean, var = _batch_moments(count_ptr, shift_ptr, smean_ptr, var_ptr, ch, cm, UNBIASED)
            finite = (tl.abs(mean) < float("inf")) & (tl.abs(var) < float("inf"))
            bad += tl.where(cm & ~finite, 1, 0)
        ok = (tl.sum(bad, axis=0) == 0).to(tl.int32)
    tl.store(recorded_ptr, ok != 0)
    if HAS_TRACKED:
        tracked = tl.load(tracked_ptr) + ok
        tl.store(tracked_ptr, tracked)
    if CUMULATIVE:  # noqa: SIM108 (a statement: only the taken branch is compiled)
        factor = 1.0 / tracked.to(tl.float64)
    else:
        factor = tl.load(momentum_ptr)
    keep = 1.0 - factor
    if ok != 0:
        for c0 in range(0, C, BLOCK):
            ch = c0 + tl.arange(0, BLOCK)
            cm = ch < C
            mean, var = _batch_moments(count_ptr, shift_ptr, smean_ptr, var_ptr, ch, cm, UNBIASED)
            if HAS_MEAN:
                old = tl.load(rmean_ptr + ch, mask=cm).to(tl.float64)
                new = mean * factor + old * keep
                tl.store(rmean_ptr + ch, new.to(rmean_ptr.dtype.element_ty), mask=cm)
            if HAS_VAR:
                old = tl.load(rvar_ptr + ch, mask=cm).to(tl.float64)
                new = var * factor + old * keep
                tl.store(rvar_ptr + ch, new.to(rvar_ptr.dtype.element_ty), mask=cm)
