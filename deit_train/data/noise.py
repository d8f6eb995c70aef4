"""Standard normal noise from a counter-based generator: the n-th number of a stream is a function of (key, n) alone,
computed with integer and IEEE-754 basic operations only, so every device gives the same bits.

torch's own generators cannot serve a view on any device: CPU's normal_ is a Mersenne twister whose vector kernel
differs by the CPU's instruction set, CUDA's is Philox with a launch grid that follows the GPU. Here:

- **Bits.** word(key, n) = mix(mix(k0 + n * GOLDEN) xor k1), mix being hash-prospector's 32-bit integer hash
  [16 21f0aaad 15 735a2d97 15] (Wellons, github.com/skeeto/hash-prospector; the splitmix32 finaliser), on uint32
  values held in int64 tensors. Both multipliers are below 2^31, so a 32-bit value times one stays below 2^63: no
  overflow, exact on every device.
- **Normal.** Box-Muller, (z, z') = sqrt(-2 ln u1) (cos 2 pi u2, sin 2 pi u2), as torch's normal_ computes it:
  two numbers from two words, with 24-bit uniforms (u1 in (0, 1]: |z| <= 5.77). ln, cos and sin are not correctly
  rounded functions (CUDA's, glibc's and SLEEF's differ in the last bit), so they are computed here from frexp and
  polynomials, in float64, with +, -, *, / and sqrt alone, each a separate op (IEEE-754 rounds each the same
  everywhere), to about 1e-12; then rounded to float32.

Every function is a fixed sequence of tensor ops, whatever the number of streams or numbers asked for.
"""

import functools
import math

import torch

# The generator's name, as the teacher cache's fingerprint records it: change it whenever a number changes.
GENERATOR = "hash32x2-boxmuller-f64poly-v1"

MASK = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive counters over the words before mixing
MAX_COUNTER = 2**30  # k0 + n * GOLDEN < 2^63

# 2 atanh(f) = 2 (f + f^3/3 + f^5/5 + ...), |f| <= 3 - 2 sqrt(2) = 0.1716: 6 terms leave 2 f^13 / 13 < 2e-11.
_ATANH_SERIES = [1 / (2 * k + 1) for k in range(6)]
# cos x and sin x / x in s = x^2 on |x| <= pi/4, evaluated together: degree 6 in s leaves (pi/4)^14 / 14! < 4e-13.
_COS_SIN_SERIES = [[(-1) ** k / math.factorial(2 * k + odd) for k in range(7)] for odd in (0, 1)]
_LN2 = math.log(2)


def mix(x: torch.Tensor) -> torch.Tensor:
    """hash-prospector's [16 21f0aaad 15 735a2d97 15] on uint32 values held in int64."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK
    return x ^ (x >> 15)


def stream_keys(seeds: torch.Tensor) -> torch.Tensor:
    """(N, 2) 32-bit keys (k0, k1) of N streams: the low and high halves of N non-negative 63-bit seeds (int64)."""
    return torch.stack([seeds & MASK, seeds >> 32], dim=-1)


def words(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """The uint32 word number `counters` (int64, below MAX_COUNTER) of the streams `keys` (k0, k1 in the last
    dimension, broadcast against counters). k0 offsets the counter, k1 is mixed in between the two hashes, so that
    keys a bit apart give unrelated words (the second hash's avalanche)."""
    return mix(mix((keys[..., 0] + counters * GOLDEN) & MASK) ^ keys[..., 1])


def standard_normal_pairs(keys: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Numbers 2n and 2n + 1, n = `pairs` (below MAX_COUNTER / 2), of the standard normal streams `keys`, as
    (..., 2) float32: Box-Muller on the stream's words 2n and 2n + 1, (r cos theta, r sin theta) as torch's normal_
    pairs them."""
    counters = pairs.unsqueeze(-1) * 2 + torch.arange(2, device=pairs.device)
    bits = words(keys.unsqueeze(-2), counters) >> 8  # 24 bits: the uniforms below are exact in float64 and float32
    log_u1 = _log_of_integer((bits[..., 0] + 1).to(torch.float64)) - 24 * _LN2  # u1 = (bits + 1) 2^-24, in (0, 1]
    radius = torch.sqrt(log_u1 * -2.0)
    return (radius.unsqueeze(-1) * _cos_sin_two_pi(bits[..., 1].to(torch.float64) * 2.0**-24)).to(torch.float32)


@functools.cache
def _cos_sin_coefficients(device: torch.device) -> list[torch.Tensor]:
    """_COS_SIN_SERIES as (2, 1) float64 columns on `device`, one per power, copied there once."""
    with torch.inference_mode(False):
        table = torch.tensor(_COS_SIN_SERIES, dtype=torch.float64, device=device)
        return list(table.T.unsqueeze(-1))


def _horner(coefficients: list, s: torch.Tensor) -> torch.Tensor:
    """sum_k c_k s^k (c_k numbers, or columns evaluating several series at once), one multiply and one add per term,
    never a fused multiply-add (its rounding is another)."""
    result = s * coefficients[-1]
    for coefficient in reversed(coefficients[1:-1]):
        result = (result + coefficient) * s
    return result + coefficients[0]


def _log_of_integer(a: torch.Tensor) -> torch.Tensor:
    """ln a for float64 integers a >= 1: a = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh((m - 1) / (m + 1))."""
    mantissa, exponent = torch.frexp(a)  # m in [1/2, 1), exact
    low = mantissa < math.sqrt(0.5)
    mantissa = torch.where(low, mantissa * 2.0, mantissa)
    exponent = (exponent - low.to(exponent.dtype)).to(torch.float64)
    f = (mantissa - 1.0) / (mantissa + 1.0)
    return exponent * _LN2 + f * 2.0 * _horner(_ATANH_SERIES, f * f)


def _cos_sin_two_pi(u: torch.Tensor) -> torch.Tensor:
    """(cos 2 pi u, sin 2 pi u) in the last dimension, for u in [0, 1): u = q/4 + t with |t| <= 1/8 (exact); cos x
    and sin x of x = 2 pi t by their series, then turned by the quadrant q: by q pi / 2."""
    quarter = torch.round(u * 4.0)
    x = (u - quarter * 0.25) * (2 * math.pi)
    cos, sin_over_x = _horner(_cos_sin_coefficients(u.device), x * x)
    turned = torch.stack([cos, sin_over_x * x], dim=-1)
    quadrant = (quarter.to(torch.int64) & 3).unsqueeze(-1)  # q odd: (cos, sin) -> (-sin, cos) up to the signs
    turned = torch.where((quadrant & 1).bool(), turned.flip(-1), turned)
    # signs of (cos, sin) of x + q pi / 2 over (cos x, sin x), swapped where q is odd: q 0 (+, +), 1 (-, +),
    # 2 (-, -), 3 (+, -)
    negative = torch.cat([(quadrant == 1) | (quadrant == 2), quadrant >= 2], dim=-1)
    return torch.where(negative, -turned, turned)
