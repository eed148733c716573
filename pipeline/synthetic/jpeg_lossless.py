"""A JPEG Lossless (process 14, selection value 1) encoder for synthetic DICOM test series.

Written here because no maintained Python package encodes this transfer syntax; pylibjpeg decodes it, which is
how ingest reads such exports. Only the synthetic series writer (:mod:`pipeline.synthetic.dicom`) uses it.
"""
from __future__ import annotations

import numpy as np


def encode_jpeg_lossless_sv1(pixels: np.ndarray, precision: int) -> bytes:
    """Encode a 2D greyscale frame as a JPEG Lossless SV1 codestream (ITU T.81 Annex H, predictor 1).

    Signed pixels are coded as their ``precision``-bit two's-complement pattern, as DICOM requires.
    The Huffman table is optimised for the frame (Annex K.2).
    """
    rows, cols = pixels.shape
    mask = (1 << precision) - 1
    samples = (pixels.astype(np.int64) & mask)
    prediction = np.empty_like(samples)
    prediction[:, 1:] = samples[:, :-1]          # predictor 1: the sample to the left
    prediction[1:, 0] = samples[:-1, 0]          # first column: the sample above
    prediction[0, 0] = 1 << (precision - 1)      # first sample: half range
    difference = (samples - prediction) & 0xFFFF
    difference = np.where(difference >= 0x8000, difference - 0x10000, difference).ravel()
    magnitude = np.abs(difference)
    category = np.zeros(magnitude.shape, dtype=np.int64)
    nonzero = magnitude > 0
    category[nonzero] = np.floor(np.log2(magnitude[nonzero])).astype(np.int64) + 1
    category[difference == -0x8000] = 16  # ±32768 both code as category 16 without extra bits
    extra = np.where(difference < 0, difference - 1, difference) & ((1 << category) - 1)
    extra[category == 16] = 0
    extra_bits = np.where(category == 16, 0, category)

    lengths = _huffman_code_lengths(np.bincount(category, minlength=17))
    codes = _canonical_codes(lengths)
    value = (codes[category] << extra_bits) | extra
    nbits = lengths[category] + extra_bits
    entropy = _stuff_bytes(_pack_bits(value, nbits))

    symbols = [s for length in range(1, 17) for s in range(17) if lengths[s] == length]
    counts = [int((lengths == length).sum()) for length in range(1, 17)]
    header = bytearray(b"\xFF\xD8")
    header += b"\xFF\xC3" + _u16(11) + bytes([precision]) + _u16(rows) + _u16(cols) + bytes([1, 1, 0x11, 0])
    header += b"\xFF\xC4" + _u16(2 + 1 + 16 + len(symbols)) + bytes([0x00]) + bytes(counts) + bytes(symbols)
    header += b"\xFF\xDA" + _u16(8) + bytes([1, 1, 0x00, 1, 0, 0])
    return bytes(header) + entropy + b"\xFF\xD9"


def _u16(value: int) -> bytes:
    return int(value).to_bytes(2, "big")


def _huffman_code_lengths(frequencies: np.ndarray) -> np.ndarray:
    """Code length per symbol (0 = unused), limited to 16 bits, per ITU T.81 Annex K.2."""
    freq = [int(f) for f in frequencies] + [1]  # a reserved symbol keeps any code from being all ones
    n = len(freq)
    codesize = [0] * n
    others = [-1] * n
    while True:
        live = [s for s in range(n) if freq[s] > 0]
        if len(live) < 2:
            break
        v1 = min(live, key=lambda s: (freq[s], -s))
        v2 = min((s for s in live if s != v1), key=lambda s: (freq[s], -s))
        freq[v1] += freq[v2]
        freq[v2] = 0
        for chain_start in (v1, v2):
            node = chain_start
            codesize[node] += 1
            while others[node] >= 0:
                node = others[node]
                codesize[node] += 1
            if chain_start == v1:
                others[node] = v2
    bits = [0] * 40
    for size in codesize:
        if size:
            bits[size] += 1
    for i in range(len(bits) - 1, 16, -1):  # K.2 "adjust bits": move codes longer than 16 bits up
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
    i = 16
    while bits[i] == 0:
        i -= 1
    bits[i] -= 1  # drop the reserved symbol
    # assign the adjusted lengths to real symbols, most frequent first
    order = sorted(range(17), key=lambda s: (-int(frequencies[s]), s))
    lengths = np.zeros(17, dtype=np.int64)
    used = [s for s in order if frequencies[s] > 0]
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    position = 0
    for size in range(1, 17):
        for _ in range(bits[size]):
            lengths[used[position]] = size
            position += 1
    return lengths


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    codes = np.zeros(17, dtype=np.int64)
    code = 0
    for size in range(1, 17):
        for symbol in (s for s in range(17) if lengths[s] == size):  # symbols listed in DHT order
            codes[symbol] = code
            code += 1
        code <<= 1
    return codes


def _pack_bits(value: np.ndarray, nbits: np.ndarray) -> bytes:
    shifts = np.arange(31, -1, -1, dtype=np.int64)
    bits = ((value[:, None] >> shifts[None, :]) & 1).astype(np.uint8)
    keep = shifts[None, :] < nbits[:, None]
    stream = bits[keep]
    pad = (-len(stream)) % 8
    stream = np.concatenate([stream, np.ones(pad, dtype=np.uint8)])  # pad with 1-bits (T.81 F.1.2.3)
    return np.packbits(stream).tobytes()


def _stuff_bytes(data: bytes) -> bytes:
    return data.replace(b"\xFF", b"\xFF\x00")


# ---------------------------------------------------------------------------------------------
# RTSTRUCT
# ---------------------------------------------------------------------------------------------
