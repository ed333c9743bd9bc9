// Fused passes of SPEC §2 over one row at a time; OpenMP across rows.
//
// Reverse and forward KL take three sweeps over a row:
//   1. normalizers: running max and sum of exp, per lane, for s/T, a/T and f/T together; the
//      student's exps are kept, so that its probabilities cost no second exp;
//   2. target: z = la + lam * clamp(lf - la, -c, c), its log-normalizer, the divergence and the
//      diagnostics;
//   3. gradient, written in the student's dtype.
// JSD needs log q exactly inside log m, so its divergence sums take one sweep more (3) before the
// gradient (4). Each sweep walks the row in blocks of kVectorsPerBlock vectors: the three inputs are
// converted to float32 (already divided by T) into L1-resident buffers, and the math runs on vectors.
// Online softmax rescales once per block, so it costs one exp per element, not two.
//
// The vector helpers (vector_math.inc) and the passes (row_passes.inc) are compiled once per
// instruction set, each copy in its own namespace under `#pragma GCC target` and with vectors one
// register wide: baseline (SSE2 on x86-64, NEON on aarch64, whatever the compiler targets
// elsewhere; 4 lanes), x86-64-v3 (AVX2 and FMA; 8 lanes) and x86-64-v4 (AVX-512; 16 lanes, and an exp
// built on vrndscaleps and vscalefps). The copy for the CPU is chosen once, at the first call. This
// is function multi-versioning by hand: target_clones compiles one source for every target, so it
// can give neither a copy its own vector width nor intrinsics the others lack.
#include "row_kernel.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define AROPD_MULTI_ISA 1
#include <immintrin.h>
#else
#define AROPD_MULTI_ISA 0
#endif

#define AROPD_INLINE inline __attribute__((always_inline))

namespace aropd {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNegInf = -kInf;
// A block is 32 vectors (128 to 512 elements): its four float buffers stay in L1 (8 KB at most), and
// float32 sums run over at most 32 terms per lane before they are carried on in double.
constexpr int kVectorsPerBlock = 32;
constexpr int kMaxLanes = 16;
constexpr int kMaxBlock = kVectorsPerBlock * kMaxLanes;
constexpr int kMinBlock = kVectorsPerBlock * 4;

enum class Divergence { kReverseKL, kForwardKL, kJensenShannon };

struct Settings {
  float lam, clip;
  float forbidden_by_full;  // lam * r where r = -inf: -inf for lam > 0, 0 for lam = 0 (never 0 * inf)
  double beta;
  float log_beta, log_one_minus_beta;  // JSD mixture weights, in log space
};

// Per-thread room for one row, kept between passes: the student's exps with one scale per block
// (pass 1), from which its probabilities are formed, and the target logits z (pass 2; reverse KL
// keeps ls - (z - m_b) instead, with the shift m_b of each block).
struct RowBuffers {
  float* target;
  float* student_exps;
  float* student_scale;  // one vector per block
  float* target_shift;   // one vector per block
};

using ProcessRow = void (*)(const Problem&, int64_t, const Settings&, const RowBuffers&);
using ConvertBlock = void (*)(const char*, int, char*, int, int64_t, int);

struct InstructionSet {
  const char* name;
  ProcessRow process_row;
  ConvertBlock convert_block;
};

}  // namespace

namespace isa_baseline {
namespace {
constexpr int kLanes = 4;
#include "vector_math.inc"
AROPD_INLINE VecF vexp(VecF x) { return exp(x); }
#include "row_passes.inc"
}  // namespace
}  // namespace isa_baseline

#if AROPD_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace isa_v3 {
namespace {
constexpr int kLanes = 8;
#include "vector_math.inc"
AROPD_INLINE VecF vexp(VecF x) { return exp(x); }
#include "row_passes.inc"
}  // namespace
}  // namespace isa_v3
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace isa_v4 {
namespace {
constexpr int kLanes = 16;
#include "vector_math.inc"
// exp(x) = 2^n * 2^r with t = x * log2(e), n = round(t), r = t - n in [-1/2, 1/2] (exact), 2^r by
// a degree-5 fit and the power of two applied by vscalefps: 7 multiply-adds where vector_math.inc's
// portable exp needs 10. The rounding of t costs |x| * 6e-8 of relative error, as much as the
// rounding of ls = x - lse costs the plain float32 exp(ls); near the max, where the mass is, it is
// under 1e-7. The same conventions as exp(): 0 for x < -87.33 (-inf included), NaN stays NaN.
AROPD_INLINE VecF vexp(VecF x) {
  const __m512 t = _mm512_mul_ps((__m512)x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_maskz_roundscale_ps(0xffff, t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const VecF r = (VecF)_mm512_sub_ps(t, n);
  // Minimax fit of 2^r on [-1/2, 1/2], relative error 1.6e-7 with float32 multiply-adds.
  VecF poly = splat(1.326472731307149e-3f);
  poly = poly * r + 9.671512991189957e-3f;
  poly = poly * r + 5.550733581185341e-2f;
  poly = poly * r + 2.4022242426872253e-1f;
  poly = poly * r + 6.931470036506653e-1f;
  poly = poly * r + 1.0f;
  const __mmask16 keep = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(-87.33f), _CMP_NLT_UQ);  // NaN kept
  return (VecF)_mm512_maskz_scalef_ps(keep, (__m512)poly, n);
}
#include "row_passes.inc"
}  // namespace
}  // namespace isa_v4
#pragma GCC pop_options
#endif

namespace {

// The copies this CPU can run, best first.
std::vector<InstructionSet> supported_instruction_sets() {
  std::vector<InstructionSet> supported;
#if AROPD_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) supported.push_back({"x86-64-v4", isa_v4::process_row, isa_v4::convert_block});
  if (__builtin_cpu_supports("x86-64-v3")) supported.push_back({"x86-64-v3", isa_v3::process_row, isa_v3::convert_block});
#endif
  supported.push_back({"baseline", isa_baseline::process_row, isa_baseline::convert_block});
  return supported;
}

// The copy in use: the best one, unless select_instruction_set chose another (tests, bench --native-isa).
std::atomic<const InstructionSet*> selected{nullptr};

const InstructionSet& instruction_set_in_use() {
  static const std::vector<InstructionSet> supported = supported_instruction_sets();
  const InstructionSet* chosen = selected.load();
  return chosen != nullptr ? *chosen : supported.front();
}

}  // namespace

void convert(const void* source, int source_dtype, void* target, int target_dtype, int64_t count) {
  const ConvertBlock convert_block = instruction_set_in_use().convert_block;
  for (int64_t start = 0; start < count; start += kMinBlock) {  // no copy's block is smaller
    convert_block(static_cast<const char*>(source), source_dtype, static_cast<char*>(target), target_dtype, start,
                  static_cast<int>(std::min<int64_t>(kMinBlock, count - start)));
  }
}

void compute_rows(const Problem& problem, int num_threads) {
  Settings settings{};
  settings.lam = static_cast<float>(problem.lam);
  settings.clip = problem.clip;
  settings.forbidden_by_full = problem.lam > 0.0 ? kNegInf : 0.0f;  // decided on the double: 1e-79 > 0
  settings.beta = problem.beta;
  if (problem.beta > 0.0 && problem.beta < 1.0) {
    settings.log_beta = static_cast<float>(std::log(problem.beta));
    settings.log_one_minus_beta = static_cast<float>(std::log1p(-problem.beta));
  }
  const ProcessRow process_row = instruction_set_in_use().process_row;
  const int64_t n_rows = problem.n_rows;
  // Room for the blocks of every copy: the row padded to the largest block, and one vector of
  // student scales per block, at most (padded V) / kVectorsPerBlock floats whatever the width.
  const int64_t padded_vocab = (problem.vocab + kMaxBlock - 1) / kMaxBlock * kMaxBlock;
#pragma omp parallel num_threads(num_threads)
  {
    const int64_t per_block = padded_vocab / kVectorsPerBlock;
    std::vector<float> storage(2 * padded_vocab + 2 * per_block);
    float* const target = storage.data();
    float* const student_exps = target + padded_vocab;
    float* const student_scale = student_exps + padded_vocab;
    const RowBuffers row_buffers{target, student_exps, student_scale, student_scale + per_block};
#pragma omp for schedule(dynamic, 1)
    for (int64_t row = 0; row < n_rows; ++row) process_row(problem, row, settings, row_buffers);
  }
}

std::string instruction_set() { return instruction_set_in_use().name; }

std::vector<std::string> instruction_sets() {
  std::vector<std::string> names;
  for (const InstructionSet& isa : supported_instruction_sets()) names.push_back(isa.name);
  return names;
}

bool select_instruction_set(const std::string& name) {
  static const std::vector<InstructionSet> supported = supported_instruction_sets();
  for (const InstructionSet& isa : supported) {
    if (name == isa.name) {
      selected.store(&isa);
      return true;
    }
  }
  return false;
}

}  // namespace aropd
