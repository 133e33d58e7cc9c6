"""Pure codecs for GPTQ-style integer packing (numpy in, numpy out, no I/O).

Layout (AutoGPTQ / AutoRound / GPTQModel): along the packed axis the codes form one little-endian
bit stream; code ``i`` occupies bits ``[bits*i, bits*i + bits)`` of the concatenated uint32 words.

* ``qweight``: int32 ``[K*bits/32, N]``, packed along axis 0 (K).
* ``qzeros``: int32 ``[K/group, N*bits/32]``, packed along axis 1 (N), storing ``zero - 1``.

``pack``/``unpack`` are the generic reference (any width in SUPPORTED_BITS, any axis). ``transcode_to4``
and ``transcode_from4`` are the fast paths used on real data: every 3 bytes of a 3-bit stream hold 8
codes, which become one uint32 of 8 nibbles.
"""

from __future__ import annotations

import contextlib

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)
WORD_BITS = 32


def words_per_block(bits: int) -> int:
    """Words in the smallest run of whole codes: 3 for 3-bit (32 codes), 1 otherwise."""
    return 3 if bits == 3 else 1


def codes_per_block(bits: int) -> int:
    return 32 if bits == 3 else WORD_BITS // bits


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; supported: {SUPPORTED_BITS}")


def unpack(words: np.ndarray, bits: int, axis: int = 0) -> np.ndarray:
    """Decode packed int32/uint32 words into uint8 codes; the packed axis grows by ``32/bits``.

    Contract: ``words.shape[axis]`` is a multiple of ``words_per_block(bits)``.
    """
    _check_bits(bits)
    w = np.ascontiguousarray(np.moveaxis(np.asarray(words), axis, -1)).view(np.uint32)
    if w.shape[-1] % words_per_block(bits):
        raise ValueError(f"packed axis length {w.shape[-1]} is not a multiple of {words_per_block(bits)}")
    le = w.astype("<u4", copy=False)
    bitstream = np.unpackbits(le.view(np.uint8), axis=-1, bitorder="little")
    ncodes = w.shape[-1] * WORD_BITS // bits
    b = bitstream.reshape(*w.shape[:-1], ncodes, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    codes = (b.astype(np.uint16) * weights).sum(axis=-1).astype(np.uint8)
    return np.moveaxis(codes, -1, axis)


def pack(codes: np.ndarray, bits: int, axis: int = 0) -> np.ndarray:
    """Encode codes (each ``< 2**bits``) into int32 words; inverse of :func:`unpack`.

    Contract: ``codes.shape[axis]`` is a multiple of ``codes_per_block(bits)``.
    """
    _check_bits(bits)
    c = np.ascontiguousarray(np.moveaxis(np.asarray(codes), axis, -1))
    if c.shape[-1] % codes_per_block(bits):
        raise ValueError(f"code axis length {c.shape[-1]} is not a multiple of {codes_per_block(bits)}")
    if c.size and int(c.max()) >= (1 << bits):
        raise ValueError(f"code {int(c.max())} does not fit in {bits} bits")
    c = c.astype(np.uint8)
    b = ((c[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    bitstream = b.reshape(*c.shape[:-1], c.shape[-1] * bits)
    by = np.packbits(bitstream, axis=-1, bitorder="little")
    words = np.ascontiguousarray(by).view("<u4").astype(np.uint32).view(np.int32)
    return np.moveaxis(words, -1, axis)


def sym_zero_word(bits: int) -> int:
    """The uint32 word that stores symmetric zero points (``2**(bits-1) - 1`` in every slot)."""
    _check_bits(bits)
    if bits == 3:
        raise ValueError("3-bit zero points repeat over 3 words; use sym_zero_words(3)")
    stored = (1 << (bits - 1)) - 1
    word = 0
    for i in range(WORD_BITS // bits):
        word |= stored << (bits * i)
    return word


def sym_zero_words(bits: int) -> tuple[int, ...]:
    """One block of words (3 for 3-bit, else 1) that stores symmetric zero points."""
    if bits != 3:
        return (sym_zero_word(bits),)
    stored = np.full((1, 32), 3, dtype=np.uint8)
    return tuple(int(x) for x in pack(stored, 3, axis=1).view(np.uint32)[0])


def sym_qzeros(groups: int, n: int, bits: int) -> np.ndarray:
    """Symmetric qzeros tensor ``[groups, n*bits/32]`` (int32)."""
    block = np.array(sym_zero_words(bits), dtype=np.uint32)
    nwords = n * bits // WORD_BITS
    row = np.tile(block, nwords // len(block))
    return np.ascontiguousarray(np.broadcast_to(row, (groups, nwords)), dtype=np.uint32).view(np.int32)


CHUNK_WORDS = 1 << 17  # 512 KiB of uint32 per step: the step and its temporary stay in L2


@contextlib.contextmanager
def _row_buffers(n: int):
    """Ufunc buffers of at most one row (``n`` words, this thread only).

    The fast paths work on ``[blocks, n]`` views with a row stride larger than ``n``. With numpy's default
    8192-element buffer such operands are copied through the buffer (about half the codec's time at n = 2048);
    with buffers no longer than a row, the strided loop runs in place.
    """
    old = np.setbufsize(max(16, min(8192, n // 16 * 16)))
    try:
        yield
    finally:
        np.setbufsize(old)


def _blocks(w: np.ndarray, rows_per_block: int) -> np.ndarray:
    n = int(np.prod(w.shape[1:])) if w.ndim > 1 else 1
    if w.shape[0] % rows_per_block:
        raise ValueError(f"packed rows {w.shape[0]} not a multiple of {rows_per_block}")
    return w.reshape(w.shape[0] // rows_per_block, rows_per_block, n)


def _spread3(t: np.ndarray, tmp: np.ndarray) -> None:
    """In place: 8 3-bit codes in bits 0..23 -> 8 nibbles holding code + 4.

    Three halvings move the upper half of each field up by s bits: ``t += (t & upper) * (2**s - 1)``
    (12 -> 16 bits, 6 -> 8, 3 -> 4); the fields never overlap, so the adds never carry.
    """
    np.bitwise_and(t, 0xFFF000, out=tmp); tmp *= 15; t += tmp
    np.bitwise_and(t, 0x0FC00FC0, out=tmp); tmp *= 3; t += tmp
    np.bitwise_and(t, 0x38383838, out=tmp); t += tmp
    t += 0x44444444


def _squeeze3(t: np.ndarray, tmp: np.ndarray) -> bool:
    """In place inverse of :func:`_spread3`; False if a nibble lies outside 4..11.

    Range test without isolating nibbles: with ``lo = v & 7``, ``v`` is in 4..11 exactly when bit 3 of ``v``
    differs from bit 3 of ``lo + 4`` (no carry leaves a nibble, as ``lo + 4 <= 11``).
    """
    np.bitwise_and(t, 0x77777777, out=tmp); tmp += 0x44444444; tmp ^= t; tmp &= 0x88888888
    ok = bool((tmp == 0x88888888).all())
    t -= 0x44444444
    np.right_shift(t, 1, out=tmp); tmp &= 0x38383838; t &= 0x07070707; t |= tmp
    np.right_shift(t, 2, out=tmp); tmp &= 0x0FC00FC0; t &= 0x003F003F; t |= tmp
    np.right_shift(t, 4, out=tmp); tmp &= 0xFFF000; t &= 0xFFF; t |= tmp
    return ok


def _to4_blocks(blocks: np.ndarray, out: np.ndarray, tmp: np.ndarray, step: int) -> None:
    """``blocks [nb, 3, n]`` -> ``out [nb, 4, n]``, ``step`` blocks at a time: out word m = stream bits ``24m..24m+23``, spread."""
    for b0 in range(0, blocks.shape[0], step):
        src, t = blocks[b0 : b0 + step], out[b0 : b0 + step]
        tt = tmp[: t.shape[0]]
        w0, w1, w2 = src[:, 0], src[:, 1], src[:, 2]
        np.bitwise_and(w0, 0xFFFFFF, out=t[:, 0])
        np.right_shift(w0, 24, out=t[:, 1]); np.left_shift(w1, 8, out=tt[:, 1]); tt[:, 1] &= 0xFFFF00; t[:, 1] |= tt[:, 1]
        np.right_shift(w1, 16, out=t[:, 2]); np.left_shift(w2, 16, out=tt[:, 2]); tt[:, 2] &= 0xFF0000; t[:, 2] |= tt[:, 2]
        np.right_shift(w2, 8, out=t[:, 3])
        _spread3(t, tt)


def transcode_to4(qweight: np.ndarray, bits: int, out: np.ndarray | None = None) -> np.ndarray:
    """Repack a ``bits``-wide symmetric qweight ``[K*bits/32, N]`` into 4-bit ``[K/8, N]``, ``q4 = q + 8 - 2**(bits-1)``.

    3-bit: each block of 3 words (32 codes) becomes 4 words; word m takes stream bits ``24m..24m+23``
    and spreads its 8 codes into nibbles (SWAR, cache-sized chunks). ``out``: optional byte buffer to fill.
    """
    w = np.ascontiguousarray(qweight).view(np.uint32)
    if bits == 3:
        blocks = _blocks(w, 3)
        nb, n = blocks.shape[0], blocks.shape[2]
        if out is None:
            out = np.empty((nb, 4, n), dtype=np.uint32)
        else:
            out = out.reshape(-1).view(np.uint8)[: nb * 4 * n * 4].view(np.uint32).reshape(nb, 4, n)
        step = max(1, CHUNK_WORDS // (4 * n))
        tmp = np.empty((min(step, nb), 4, n), dtype=np.uint32)
        with _row_buffers(n):
            _to4_blocks(blocks, out, tmp, step)
        return out.reshape(nb * 4, *w.shape[1:]).view(np.int32)
    if bits == 2:
        return pack(unpack(w, 2, axis=0) + 6, 4, axis=0)
    if bits == 4:
        return w.view(np.int32).copy()
    raise ValueError(f"cannot transcode {bits}-bit to 4-bit")


def transcode_from4(qweight4: np.ndarray, bits: int) -> tuple[np.ndarray, bool]:
    """Inverse of :func:`transcode_to4`: returns ``(qweight_bits, ok)``.

    ``ok`` is False when some 4-bit code lies outside ``[8 - 2**(bits-1), 7 + 2**(bits-1)]``, i.e. the
    4-bit tensor could not have come from a ``bits``-wide one.
    """
    w = np.ascontiguousarray(qweight4).view(np.uint32)
    if bits == 3:
        blocks = _blocks(w, 4)
        nb, n = blocks.shape[0], blocks.shape[2]
        out = np.empty((nb, 3, n), dtype=np.uint32)
        step = max(1, CHUNK_WORDS // (4 * n))
        t_buf = np.empty((min(step, nb), 4, n), dtype=np.uint32)
        tmp = np.empty_like(t_buf)
        ok = True
        with _row_buffers(n):
            for b0 in range(0, nb, step):
                src, o = blocks[b0 : b0 + step], out[b0 : b0 + step]
                t, tt = t_buf[: src.shape[0]], tmp[: src.shape[0]]
                t[...] = src
                ok &= _squeeze3(t, tt)
                v0, v1, v2, v3 = t[:, 0], t[:, 1], t[:, 2], t[:, 3]
                np.left_shift(v1, 24, out=o[:, 0]); o[:, 0] |= v0
                np.left_shift(v2, 16, out=o[:, 1]); np.right_shift(v1, 8, out=tt[:, 0]); o[:, 1] |= tt[:, 0]
                np.left_shift(v3, 8, out=o[:, 2]); np.right_shift(v2, 16, out=tt[:, 0]); o[:, 2] |= tt[:, 0]
        return out.reshape(nb * 3, *w.shape[1:]).view(np.int32), ok
    if bits == 2:
        nib = unpack(w, 4, axis=0).astype(np.int16) - 6
        ok = bool(nib.size == 0 or (nib.min() >= 0 and nib.max() <= 3))
        return pack(np.clip(nib, 0, 3).astype(np.uint8), 2, axis=0), ok
    if bits == 4:
        return w.view(np.int32).copy(), True
    raise ValueError(f"cannot transcode 4-bit to {bits}-bit")


def decode(qweight: np.ndarray, bits: int) -> np.ndarray:
    """Codes of a qweight packed along axis 0, as uint8 ``[K, N]`` (fast shift path; 3-bit via 4-bit)."""
    w = np.ascontiguousarray(qweight).view(np.uint32)
    if bits == 3:
        return decode(transcode_to4(w, 3), 4) - np.uint8(4)
    _check_bits(bits)
    per = WORD_BITS // bits
    out = np.empty((w.shape[0], per, *w.shape[1:]), dtype=np.uint8)
    mask = (1 << bits) - 1
    for i in range(per):
        out[:, i] = (w >> (bits * i)) & mask
    return out.reshape(w.shape[0] * per, *w.shape[1:])


def dequantize(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """Dense float32 weight ``[N, K]`` (torch Linear layout): ``scales[k//g, n] * (q[k, n] - (z_stored + 1))``.

    Exact in float32 for float16/bfloat16 scales and widths <= 8 (at most 11 + 9 significant bits).
    """
    q = unpack(qweight, bits, axis=0).astype(np.int32)
    z = unpack(qzeros, bits, axis=1).astype(np.int32) + 1
    k = q.shape[0]
    s = np.asarray(scales).astype(np.float32)
    groups = np.arange(k) // group_size
    w = (q - z[groups]).astype(np.float32) * s[groups]
    return np.ascontiguousarray(w.T)
