"""Server-side downsampling of the step axis, keeping extremes. Pure numpy.

A heatmap of 20,000 recorded steps cannot show 20,000 columns, and a page
that asked for all of them would wait for megabytes it cannot draw. So the
step axis is cut into at most `columns` contiguous buckets of recorded steps,
and each bucket is reduced to one value that keeps what a reader must not
miss:

| statistic                                  | bucket value                                   |
|--------------------------------------------|------------------------------------------------|
| `grad_norm`, `grad_max_abs`,               | max; a NaN or inf anywhere in the bucket wins   |
| `grad_nonfinite`, `weight_norm`            | (NaN over inf)                                  |
| `update_ratio`, `dead_fraction`,           | max over defined values; NaN only when every    |
| `saturation_fraction`                      | value is NaN                                    |

`update_ratio` is NaN where it is undefined (zero weights before the update),
and the per-layer fractions are NaN where a layer had no record; neither is a
non-finite gradient, so there NaN must not win a bucket. A one-step spike or
a single NaN gradient therefore survives any amount of downsampling.

The region classification is reduced the same way, the most serious class
winning by the precedence of `keras_vg.detect`
(`keras_vg.heatmap_marks.worst_in_runs`).

Values travel as log10 quantised to int16 (see `encode_log16`): a
1,000 x 640 heatmap is then 1.7 MB of base64 instead of ~6 MB of JSON numbers.
"""

import base64

import numpy as np

from keras_vg.heatmap_marks import NAN_IS_ABSENT

LOG16_SCALE = 700
"""int16 units per decade: 0.0014 decade (0.33 %) steps, and ±46.8 decades
cover every positive float32 (1.4e-45 ... 3.4e38) without clamping."""

# Codes outside the range of finite logs (|q| <= 31,400 for float32).
CODE_MISSING = -32768
CODE_ZERO = -32767
CODE_NEGATIVE = -32766
CODE_NEGINF = 32765
CODE_POSINF = 32766
CODE_NAN = 32767
SPECIAL_CODES = {
    "missing": CODE_MISSING,
    "zero": CODE_ZERO,
    "negative": CODE_NEGATIVE,
    "neg_inf": CODE_NEGINF,
    "pos_inf": CODE_POSINF,
    "nan": CODE_NAN,
}


def bucket_starts(num_steps, columns):
    """Splits `num_steps` recorded steps into at most `columns` contiguous buckets.

    Args:
        num_steps: Number of recorded steps `T`.
        columns: Largest number of buckets wanted (>= 1).

    Returns:
        An int64 array of the first index of each bucket, strictly
        increasing, starting at 0. Its length is `min(T, columns)`.

    Example:

    >>> bucket_starts(10, 4).tolist()
    [0, 2, 5, 7]
    """
    count = max(1, min(int(num_steps), int(columns)))
    if num_steps <= count:
        return np.arange(num_steps, dtype=np.int64)
    return np.linspace(0, num_steps, count + 1)[:-1].astype(np.int64)


def reduce_values(values, starts, stat):
    """Reduces `[N, T]` values to `[N, len(starts)]` buckets, keeping extremes.

    Args:
        values: float32 array `[N, T]` (one row per variable or layer).
        starts: Bucket starts from `bucket_starts`.
        stat: Statistic name, which decides whether NaN wins a bucket.

    Returns:
        float32 array `[N, len(starts)]`.

    Example:

    >>> v = np.array([[1, 9, 1, 1], [1, np.nan, 1, 1]], np.float32)
    >>> reduce_values(v, bucket_starts(4, 2), "grad_norm").tolist()
    [[9.0, 1.0], [nan, 1.0]]
    """
    if values.shape[1] == 0 or len(starts) == values.shape[1]:
        return values
    # np.maximum propagates NaN and orders inf above finite values; np.fmax skips NaN.
    ufunc = np.fmax if stat in NAN_IS_ABSENT else np.maximum
    reduced = ufunc.reduceat(values, starts, axis=1)
    if ufunc is np.maximum:
        # np.maximum keeps whichever NaN/inf it met first; make NaN win over inf.
        has_nan = np.logical_or.reduceat(np.isnan(values), starts, axis=1)
        reduced[has_nan] = np.nan
    return reduced


def encode_log16(values):
    """Quantises values to int16 log10 codes and returns them as base64.

    A finite positive `v` becomes `round(log10(v) * LOG16_SCALE)`; zero,
    negative, NaN, +inf and -inf get the codes in `SPECIAL_CODES`. The bytes
    are little-endian int16, row-major.

    Args:
        values: float array `[N, C]`.

    Returns:
        The base64 text of the `N * C * 2` bytes.

    Example:

    >>> v = np.array([[1.0, 1e-3, 0.0, np.nan]])
    >>> np.allclose(decode_log16(encode_log16(v), (1, 4)), v, equal_nan=True)
    True
    """
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.rint(np.log10(np.abs(values)) * LOG16_SCALE)
    codes = np.clip(np.nan_to_num(codes, nan=0.0, posinf=0.0, neginf=0.0), -32000, 32000)
    codes = codes.astype("<i2")
    codes[values == 0] = CODE_ZERO
    codes[values < 0] = CODE_NEGATIVE
    codes[np.isnan(values)] = CODE_NAN
    codes[values == np.inf] = CODE_POSINF
    codes[values == -np.inf] = CODE_NEGINF
    return base64.b64encode(codes.tobytes()).decode("ascii")


def decode_log16(text, shape):
    """Inverse of `encode_log16` (for tests and tools): float64 array of `shape`."""
    codes = np.frombuffer(base64.b64decode(text), dtype="<i2").reshape(shape)
    values = 10.0 ** (codes.astype(np.float64) / LOG16_SCALE)
    values[codes == CODE_ZERO] = 0.0
    values[(codes == CODE_NAN) | (codes == CODE_MISSING) | (codes == CODE_NEGATIVE)] = np.nan
    values[codes == CODE_POSINF] = np.inf
    values[codes == CODE_NEGINF] = -np.inf
    return values


def encode_regions(codes):
    """Encodes region codes `[N, C]` compactly: runs where regions are few, bytes otherwise.

    Regions are contiguous in steps, so a row usually holds a few runs of one
    code: a 1,000 x 640 heatmap then costs a few kB instead of 850 kB.

    Args:
        codes: int8 array `[N, C]`, 0 meaning healthy.

    Returns:
        `{"runs": [row, first_column, last_column, code, ...]}` (flat, non-zero
        codes only, row-major), or `{"bytes": <base64 of the int8 array>}`
        when that is shorter.

    Example:

    >>> codes = np.zeros((2, 40), np.int8)
    >>> codes[0, 5:30] = 1
    >>> codes[1, 39] = 2
    >>> encode_regions(codes)
    {'runs': [0, 5, 29, 1, 1, 39, 39, 2]}
    """
    codes = np.asarray(codes, dtype=np.int8)
    padded = np.pad(codes, ((0, 0), (1, 1)), constant_values=-1)
    nonzero = codes != 0
    rows, firsts = np.nonzero(nonzero & (codes != padded[:, :-2]))
    _, lasts = np.nonzero(nonzero & (codes != padded[:, 2:]))
    # About 16 characters of JSON per run against 4/3 of base64 per cell.
    if len(rows) * 16 > codes.size * 4 / 3:
        return {"bytes": base64.b64encode(np.ascontiguousarray(codes).tobytes()).decode("ascii")}
    runs = np.stack([rows, firsts, lasts, codes[rows, firsts]], axis=1)
    return {"runs": runs.ravel().tolist()}
