// Fused passes of SPEC §2 over one row at a time; OpenMP across rows.
//
// Reverse and forward KL take three sweeps over a row:
//   1. normalizers: running max and sum of exp((x - max) / T), per lane, for s, a and f together;
//      the student's exps are kept, so that its probabilities cost no second exp;
//   2. target: z = la + lam * clamp(lf - la, -c, c), its log-normalizer, the divergence and the
//      diagnostics;
//   3. gradient, written in the student's dtype.
// JSD needs log q exactly inside log m, so its divergence sums take one sweep more (3) before the
// gradient (4). One teacher (full absent) is the same passes with kOneTeacher: they read two inputs,
// z = la needs no normalizer of its own, and reverse KL without diagnostics sums D in sweep 1
// (StudentTeacherGap), two sweeps in all. Each sweep walks the row in blocks of kVectorsPerBlock
// vectors: the inputs are converted to float32 into L1-resident buffers, and the math runs on vectors.
// Online softmax rescales once per block, so it costs one exp per element, not two.
//
// The same row function also runs the four stages of aropd_kernels/shards.py (Stage): each stage runs
// the sweeps before its own over the shard's columns, takes the combined normalizers and terms of the
// earlier stages in place of its own, and returns its sums where the fused path finishes them.
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
#include <type_traits>
#include <utility>
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

// +inf where flag is set, unless the value is NaN (NaN in an input is never hidden).
double infinite_where(double flag, double value) { return flag > 0.0 && !std::isnan(value) ? INFINITY : value; }

// The divergence, the diagnostics and the gradient's terms of a row from its sums over the whole
// vocabulary: shards.finish_target, for the fused path whose sums never leave the row.
struct FinishedTarget {
  double divergence;  // NaN for JSD, whose divergence needs the mixture pass
  double diagnostics[kNumDiagnostics];
  Terms terms;
};

FinishedTarget finish_target(const TargetSums& sums, Divergence kind, bool one_teacher, bool label_inside) {
  FinishedTarget finished{};
  const double lse_target = sums.z_max + sums.z_log_sum;
  const double target_mass = std::exp(sums.z_log_sum);
  double mean_gap = sums.student_gap / sums.student_mass;
  if (kind == Divergence::kReverseKL) {
    mean_gap = infinite_where(sums.infinite_divergence, mean_gap);
    finished.divergence = mean_gap + lse_target;
  } else if (kind == Divergence::kForwardKL) {
    finished.divergence =
        infinite_where(sums.infinite_divergence, sums.weighted_target_gap / target_mass - sums.z_log_sum);
  } else {
    finished.divergence = NAN;
  }
  if (!one_teacher) {
    finished.diagnostics[0] = infinite_where(sums.infinite_shift, sums.belief_shift);
    finished.diagnostics[1] = sums.clipped_mass;
  }
  finished.diagnostics[2] = -sums.student_log_student;
  finished.diagnostics[3] = sums.z_log_sum - sums.weighted_target_logit / target_mass;
  if (label_inside) {
    finished.diagnostics[4] = sums.student_token;
    finished.diagnostics[5] = sums.target_token_logit - lse_target;
  }
  finished.terms = {lse_target, mean_gap, 0.0};
  return finished;
}

// --- per-row inputs and outputs of the stages ([rows, N] arrays, row-major; see Problem) -------------

// The row's label as a column of this call, or -1 when there is none or it lies outside [0, V).
int64_t label_column(const Problem& problem, int64_t row) {
  if (problem.labels == nullptr) return -1;
  const int64_t label = problem.labels[row];
  return label >= 0 && label < problem.vocab ? label : -1;
}

void store_row_result(const Problem& problem, int64_t row, const FinishedTarget& finished, bool with_diagnostics) {
  problem.row_loss[row] = static_cast<float>(finished.divergence);
  if (!with_diagnostics) return;
  for (int k = 0; k < kNumDiagnostics; ++k) {
    problem.diagnostics[k * problem.n_rows + row] = static_cast<float>(finished.diagnostics[k]);
  }
}

void store_target_sums(const Problem& problem, int64_t row, const TargetSums& sums) {
  for (int k = 0; k < kNumTargetSums; ++k) problem.target_sums[k * problem.n_rows + row] = sums.*kTargetSumRows[k].member;
}

Terms given_terms(const Problem& problem, int64_t row) {
  Terms terms{};
  for (int k = 0; k < kNumTerms; ++k) terms.*kTermRows[k].member = problem.terms[k * problem.n_rows + row];
  return terms;
}

void store_mixture_sums(const Problem& problem, int64_t row, double target_to_mixture, double student_to_mixture) {
  problem.mixture_sums[row] = target_to_mixture;
  problem.mixture_sums[problem.n_rows + row] = student_to_mixture;
}

// Zeros in every per-row output of the problem's stage, for a skipped row (the gradient aside).
void store_skipped_row(const Problem& problem, int64_t row) {
  switch (problem.stage) {
    case Stage::kFused:
      store_row_result(problem, row, FinishedTarget{}, problem.with_diagnostics);
      break;
    case Stage::kNormalizers:
      for (int k = 0; k < 2 * (problem.full.data == nullptr ? 2 : 3); ++k) {
        problem.normalizers[k * problem.n_rows + row] = 0.0f;
      }
      break;
    case Stage::kTargetSums:
      store_target_sums(problem, row, TargetSums{});
      break;
    case Stage::kMixtureSums:
      store_mixture_sums(problem, row, 0.0, 0.0);
      break;
    case Stage::kGradient:
      break;
  }
}

// Per-thread room for one row, kept between passes: the student's exps with one scale per block
// (pass 1), from which its probabilities are formed, and the target logits z (pass 2; reverse KL
// keeps ls - (z - m_b) instead, with the shift m_b of each block, and one teacher's reverse KL in
// pass 1 the gap d of StudentTeacherGap, with its block shifts).
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
