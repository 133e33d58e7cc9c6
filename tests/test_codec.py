"""Codec tests: pinned bit vectors from docs/formats.md, and hypothesis round trips against a big-int decoder."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from repack import codec
from tests.helpers import decode_bigint


def _one_code(index: int, value: int) -> list[int]:
    c = np.zeros((32, 1), dtype=np.uint8)
    c[index] = value
    return [int(w) for w in codec.pack(c, 3, axis=0).view(np.uint32)[:, 0]]


def test_code_10_straddles_w0_w1():
    # docs/formats.md: code 10 has its 2 low bits at w0 bits 30-31 and its high bit at w1 bit 0
    assert _one_code(10, 0b111) == [0xC0000000, 0x00000001, 0]
    assert _one_code(10, 0b001) == [0x40000000, 0, 0]
    assert _one_code(10, 0b100) == [0, 0x00000001, 0]


def test_code_21_straddles_w1_w2():
    # docs/formats.md: code 21 has its low bit at w1 bit 31 and bits 1-2 at w2 bits 0-1
    assert _one_code(21, 0b111) == [0, 0x80000000, 0x00000003]
    assert _one_code(21, 0b001) == [0, 0x80000000, 0]
    assert _one_code(21, 0b110) == [0, 0, 0x00000003]


def test_unpack_reads_hand_built_straddling_words():
    words = np.array([[0x40000000], [0x80000001], [0x00000002]], dtype=np.uint32).view(np.int32)
    codes = codec.unpack(words, 3, axis=0)[:, 0]
    assert codes[10] == 0b101 and codes[21] == 0b101
    assert int(codes.sum()) == 10


def test_symmetric_zero_patterns():
    assert codec.sym_zero_words(3) == (0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D)
    assert codec.sym_zero_word(4) == 0x77777777
    assert codec.sym_zero_word(8) == 0x7F7F7F7F
    assert codec.sym_zero_word(2) == 0x55555555
    z = codec.sym_qzeros(2, 64, 3).view(np.uint32)
    assert z.shape == (2, 6) and list(z[1]) == [0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D] * 2


def test_4bit_codes_are_plain_nibbles():
    c = np.arange(8, dtype=np.uint8).reshape(8, 1)
    assert int(codec.pack(c, 4, axis=0).view(np.uint32)[0, 0]) == 0x76543210


@st.composite
def packed(draw, bits):
    blocks = draw(st.integers(1, 6))
    n = draw(st.integers(1, 40))
    rows = blocks * codec.words_per_block(bits)
    return draw(hnp.arrays(np.uint32, (rows, n), elements=st.integers(0, 2**32 - 1))).view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_unpack_matches_bigint_and_pack_inverts(bits, data):
    w = data.draw(packed(bits))
    codes = codec.unpack(w, bits, axis=0)
    assert np.array_equal(codes.astype(np.int64), decode_bigint(w.tobytes(), list(w.shape), bits))
    assert np.array_equal(codec.pack(codes, bits, axis=0), w)


@pytest.mark.parametrize("bits", [2, 3])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_transcode_to4_adds_offset_and_inverts(bits, data):
    w = data.draw(packed(bits))
    w4 = codec.transcode_to4(w, bits)
    q = decode_bigint(w.tobytes(), list(w.shape), bits)
    q4 = decode_bigint(w4.tobytes(), list(w4.shape), 4)
    assert np.array_equal(q4, q + 8 - (1 << (bits - 1)))
    back, ok = codec.transcode_from4(w4, bits)
    assert ok and np.array_equal(back, w)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_transcode_from4_flags_codes_no_3bit_source_has(data):
    w4 = codec.transcode_to4(data.draw(packed(3)), 3).view(np.uint32).copy()
    r = data.draw(st.integers(0, w4.shape[0] - 1))
    c = data.draw(st.integers(0, w4.shape[1] - 1))
    nib = data.draw(st.integers(0, 7))
    bad = data.draw(st.sampled_from([0, 1, 2, 3, 12, 13, 14, 15]))
    w4[r, c] = (w4[r, c] & ~np.uint32(0xF << (4 * nib))) | np.uint32(bad << (4 * nib))
    _, ok = codec.transcode_from4(w4.view(np.int32), 3)
    assert not ok


def test_transcode_large_chunked_path_matches_generic():
    rng = np.random.default_rng(1)
    w = rng.integers(0, 2**32, size=(3 * 300, 1000), dtype=np.uint32).view(np.int32)
    w4 = codec.transcode_to4(w, 3)
    assert np.array_equal(codec.unpack(w4, 4, axis=0), codec.unpack(w, 3, axis=0) + 4)
    out = np.empty(w4.nbytes + 16, dtype=np.uint8)
    assert np.array_equal(codec.transcode_to4(w, 3, out=out), w4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_is_exact(bits):
    rng = np.random.default_rng(bits)
    k, n, g = 64, 32, 32
    codes = rng.integers(0, 1 << bits, size=(k, n), dtype=np.uint8)
    scales = (rng.standard_normal((k // g, n)) * 0.01).astype(np.float16)
    w = codec.dequantize(codec.pack(codes, bits, 0), codec.sym_qzeros(k // g, n, bits), scales, bits, g)
    ref = (codes.astype(np.float64) - (1 << (bits - 1))) * scales.astype(np.float64)[np.arange(k) // g]
    assert w.dtype == np.float32 and w.shape == (n, k)
    assert np.array_equal(w.astype(np.float64), ref.T)
    assert np.array_equal(codec.decode(codec.pack(codes, bits, 0), bits), codes)


def test_rejects_unsupported_widths():
    for bits in (5, 6, 7):
        with pytest.raises(ValueError):
            codec.unpack(np.zeros((3, 1), np.int32), bits)


@pytest.mark.parametrize("pos", range(8))
@pytest.mark.parametrize("nibble", range(16))
def test_transcode_from4_range_check_every_nibble_value_and_position(nibble, pos):
    """Only 4..11 (a 3-bit code plus 4) is accepted, whatever the neighbours hold."""
    for fill in (0x44444444, 0xBBBBBBBB, 0x7B4A5869):
        w = np.full((4, 2), fill, dtype=np.uint32)
        w[2, 1] = (fill & ~(0xF << (4 * pos))) | (nibble << (4 * pos))
        _, ok = codec.transcode_from4(w.view(np.int32), 3)
        assert ok == (4 <= nibble <= 11), (hex(fill), nibble, pos)
