// Portable SIMD building blocks for the native kernel: a 16-lane float vector (GCC/Clang vector
// extensions), an exp and a log1p of our own with explicit -inf/NaN handling, and conversions
// between float32 and the bfloat16/float16 bit patterns.
//
// Why not libm: glibc's vector expf is only declared under -ffast-math, and fast-math assumes there
// is no inf or NaN, which breaks the -inf contract of SPEC §5. Everything here is compiled without
// fast-math; the vector width is fixed at 16 floats and the compiler splits it into 4 SSE, 2 AVX2 or
// 1 AVX-512 register per operation depending on the clone being compiled (see row_kernel.cpp).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace aropd {

constexpr int kLanes = 16;
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint32_t VecU __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t VecH __attribute__((vector_size(kLanes * sizeof(uint16_t))));

#define AROPD_INLINE inline __attribute__((always_inline))

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();

AROPD_INLINE VecF splat(float value) { return VecF{} + value; }
AROPD_INLINE VecU splat_u(uint32_t value) { return VecU{} + value; }

AROPD_INLINE VecF load(const float* source) {
  VecF value;
  std::memcpy(&value, source, sizeof value);
  return value;
}

AROPD_INLINE void store(float* target, VecF value) { std::memcpy(target, &value, sizeof value); }

// 0 where mask is set, value elsewhere: the "0 * log 0 = 0" rule for terms weighted by a zero
// probability. A NaN weight is not 0, so NaN still propagates.
AROPD_INLINE VecF zero_where(VecI mask, VecF value) { return mask ? splat(0.0f) : value; }

// Lane-wise max. It drops NaN; online softmax does not need it to keep NaN, because every value
// also goes through exp(x - max) into the lane's sum, and a NaN there makes the sum NaN. (A
// NaN-keeping form, `(x > m) | (x != x)`, makes GCC scalarize the select.)
AROPD_INLINE VecF lane_max(VecF running, VecF x) { return x > running ? x : running; }

// clamp to [-bound, bound] that keeps NaN; bound may be +inf.
AROPD_INLINE VecF clamp_symmetric(VecF x, float bound) {
  return x < splat(-bound) ? splat(-bound) : (x > splat(bound) ? splat(bound) : x);
}

// e^r for |r| <= ln2 / 2 and n = round(x / ln 2) with r = x - n ln 2 (Cody-Waite: ln 2 in two parts,
// so r is accurate with or without FMA), so that exp(x) = 2^n e^r.
struct ExpParts {
  VecF mantissa;  // e^r in [0.7, 1.42]
  VecI exponent;  // n
};

AROPD_INLINE ExpParts exp_parts(VecF x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2High = 0.693145751953125f;  // few mantissa bits: n * kLn2High is exact
  constexpr float kLn2Low = 1.42860682030941723e-6f;
  constexpr float kRoundToInt = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to an integer
  const VecF n = (x * kLog2e + kRoundToInt) - kRoundToInt;
  const VecF r = (x - n * kLn2High) - n * kLn2Low;
  // Degree-6 fit of e^r on |r| <= ln2 / 2 (Chebyshev interpolation): 0.75e-7 relative error in float32.
  VecF poly = splat(1.3941108481958508e-3f);
  poly = poly * r + 8.37512593716383e-3f;
  poly = poly * r + 4.166635125875473e-2f;
  poly = poly * r + 1.6666415333747864e-1f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  return {poly * r + 1.0f, __builtin_convertvector(n, VecI)};
}

AROPD_INLINE VecF pow2(VecI exponent) { return (VecF)((exponent + 127) << 23); }

// exp(x) with float32 accuracy (about 1 ulp) for the arguments this kernel has: log-probabilities and
// differences to a running max, so x <= ~0. Exact 0 for -inf, NaN for NaN. Results below FLT_MIN
// (x < -87.33, probabilities under 1.2e-38) are flushed to 0: whether a divergence is +inf is decided
// from the log-probabilities, not from an underflowed probability (see row_kernel.cpp). x is capped at
// 88 (never binding here), written as `c < x ? c : x` so that it compiles to a vminps that keeps NaN.
AROPD_INLINE VecF exp(VecF x) {
  const VecF capped = splat(88.0f) < x ? splat(88.0f) : x;
  const ExpParts parts = exp_parts(capped);
  return x < splat(-87.33f) ? splat(0.0f) : parts.mantissa * pow2(parts.exponent);
}

// The allowing log-probability where the forbidding one is -inf, else -inf. Its running max over a row
// is > -inf exactly when some token is forbidden by one distribution and allowed by the other; then
// sum_v w_v (log w_v - log f_v) is +inf however small w_v is in float32. (One comparison and a max:
// combining two vector comparisons with `&` makes GCC 12 scalarize the select.)
AROPD_INLINE VecF allowed_where_forbidden(VecF log_forbidding, VecF log_allowing) {
  return log_forbidding == splat(kNegInf) ? log_allowing : splat(kNegInf);
}

// log(1 + t) for t in [0, 1] via 2 atanh(t / (2 + t)); the series is truncated after s^13, an error
// below 2e-8 relative. NaN propagates.
AROPD_INLINE VecF log1p_unit(VecF t) {
  const VecF s = t / (t + 2.0f);
  const VecF s2 = s * s;
  VecF poly = splat(1.0f / 13.0f);
  poly = poly * s2 + 1.0f / 11.0f;
  poly = poly * s2 + 1.0f / 9.0f;
  poly = poly * s2 + 1.0f / 7.0f;
  poly = poly * s2 + 1.0f / 5.0f;
  poly = poly * s2 + 1.0f / 3.0f;
  poly = poly * s2 + 1.0f;
  return 2.0f * s * poly;
}

// log(e^x + e^y) in float32 from float32 log-probabilities (never in probability space, see
// Liger-Kernel issue 769); -inf when both are -inf, NaN when either is NaN.
AROPD_INLINE VecF logaddexp(VecF x, VecF y) {
  const VecF larger = x > y ? x : y;
  const VecF gap = x - y;
  const VecF magnitude = gap < splat(0.0f) ? -gap : gap;
  const VecF result = larger + log1p_unit(exp(-magnitude));
  return larger == splat(kNegInf) ? splat(kNegInf) : result;
}

// --- conversions between float32 and 16-bit patterns ----------------------------------------------

AROPD_INLINE VecF bf16_to_float(VecH bits) {
  return (VecF)(__builtin_convertvector(bits, VecU) << 16);
}

// float16 -> float32, exact for every pattern (normals, subnormals, +-inf, NaN payloads), without
// F16C and without subnormal float arithmetic (so it is also right when denormals are flushed).
AROPD_INLINE VecF half_to_float(VecH bits) {
  const VecU wide = __builtin_convertvector(bits, VecU);
  const VecU sign = (wide & 0x8000u) << 16;
  const VecU magnitude = wide & 0x7fffu;
  const VecU normal = (magnitude << 13) + (112u << 23);  // rebias the exponent from 15 to 127
  const VecU subnormal = (VecU)(__builtin_convertvector((VecI)magnitude, VecF) * 0x1p-24f);
  const VecU inf_or_nan = (magnitude << 13) | 0x7f800000u;
  const VecU result =
      magnitude < splat_u(0x0400u) ? subnormal : (magnitude >= splat_u(0x7c00u) ? inf_or_nan : normal);
  return (VecF)(result | sign);
}

// float32 -> bfloat16, round to nearest even; NaN stays a (quiet) NaN, overflow rounds to inf.
AROPD_INLINE VecH float_to_bf16(VecF value) {
  const VecU bits = (VecU)value;
  const VecU rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const VecU quiet_nan = (bits >> 16) | 0x0040u;
  const VecU result = (bits & 0x7fffffffu) > splat_u(0x7f800000u) ? quiet_nan : rounded;
  return __builtin_convertvector(result, VecH);
}

// float32 -> float16, round to nearest even, including subnormal results, overflow to inf, NaN.
AROPD_INLINE VecH float_to_half(VecF value) {
  const VecU bits = (VecU)value;
  const VecU sign = (bits >> 16) & 0x8000u;
  const VecU magnitude = bits & 0x7fffffffu;
  // |x| < 2^-14: adding 0.5 (whose ulp is 2^-24, the float16 subnormal spacing) rounds to nearest
  // even in hardware; the mantissa of the sum is then the float16 pattern (2^-14 gives 0x0400).
  const VecU subnormal = (VecU)((VecF)magnitude + 0.5f) - 0x3f000000u;
  const VecU mantissa_odd = (magnitude >> 13) & 1u;
  const VecU normal = (magnitude + 0x0fffu + mantissa_odd - (112u << 23)) >> 13;
  VecU result = magnitude < splat_u(0x38800000u) ? subnormal : normal;
  result = magnitude >= splat_u(0x47800000u) ? splat_u(0x7c00u) : result;  // >= 65536 (65520.. rounds up itself)
  result = magnitude > splat_u(0x7f800000u) ? splat_u(0x7e00u) : result;
  return __builtin_convertvector(result | sign, VecH);
}

}  // namespace aropd
