// Fused passes of SPEC §2 over one row at a time; OpenMP across rows.
//
// Reverse and forward KL take three sweeps over a row:
//   1. normalizers: running max and sum of exp, per lane, for s/T, a/T and f/T together;
//   2. target: z = la + lam * clamp(lf - la, -c, c), its log-normalizer, the divergence and the
//      diagnostics;
//   3. gradient, written in the student's dtype.
// JSD needs log q exactly inside log m, so its divergence sums take one sweep more (3) before the
// gradient (4). Each sweep walks the row in blocks of kBlock elements: the three inputs are converted
// to float32 (already divided by T) into L1-resident buffers, and the math runs on 16-lane vectors.
// Online softmax rescales once per block, so it costs one exp per element, not two.
#include "row_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "vector_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// One clone per instruction set, chosen at load time: the default build stays portable.
#define AROPD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define AROPD_HAS_CLONES 1
#else
#define AROPD_CLONES
#define AROPD_HAS_CLONES 0
#endif

namespace aropd {
namespace {

constexpr int kBlock = 512;  // elements per block: the four float buffers (8 KB) stay in L1
static_assert(kBlock % kLanes == 0, "a block is a whole number of vectors");

enum class Divergence { kReverseKL, kForwardKL, kJensenShannon };

int64_t element_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// 64-bit element offsets: b * stride_batch + t * stride_seq may exceed 2^31.
const char* row_start(const RowsView& view, int64_t row) {
  const int64_t b = row / view.seq, t = row % view.seq;
  const int64_t offset = b * view.stride_batch + t * view.stride_seq;
  return static_cast<const char*>(view.data) + offset * element_size(view.dtype);
}

// --- block loads and stores --------------------------------------------------------------------

template <int kDType>
AROPD_INLINE VecF load_vector(const unsigned char* source) {
  if constexpr (kDType == kFloat32) {
    VecF value;
    std::memcpy(&value, source, sizeof value);
    return value;
  } else {
    VecH bits;
    std::memcpy(&bits, source, sizeof bits);
    return kDType == kBFloat16 ? bf16_to_float(bits) : half_to_float(bits);
  }
}

template <int kDType>
AROPD_INLINE void store_vector(unsigned char* target, VecF value) {
  if constexpr (kDType == kFloat32) {
    std::memcpy(target, &value, sizeof value);
  } else {
    const VecH bits = kDType == kBFloat16 ? float_to_bf16(value) : float_to_half(value);
    std::memcpy(target, &bits, sizeof bits);
  }
}

// Reads count logits, converts them to float32 times inv_temperature and pads the last vector with
// -inf, which every later step treats as a token of probability 0.
template <int kDType>
AROPD_INLINE void load_block_as(const unsigned char* source, int count, float inv_temperature, float* out) {
  constexpr int kWidth = kDType == kFloat32 ? 4 : 2;
  const int whole = count / kLanes, tail = count % kLanes;
  if (inv_temperature == 1.0f) {  // the common case: skip a multiplication per element
    for (int k = 0; k < whole; ++k) store(out + k * kLanes, load_vector<kDType>(source + k * kLanes * kWidth));
  } else {
    for (int k = 0; k < whole; ++k) {
      store(out + k * kLanes, load_vector<kDType>(source + k * kLanes * kWidth) * inv_temperature);
    }
  }
  if (tail) {
    alignas(64) unsigned char padded[kLanes * kWidth];
    const float neg_inf = kNegInf;
    const uint16_t neg_inf_bits = kDType == kBFloat16 ? 0xff80u : 0xfc00u;
    for (int lane = 0; lane < kLanes; ++lane) {
      std::memcpy(padded + lane * kWidth, kDType == kFloat32 ? static_cast<const void*>(&neg_inf)
                                                            : static_cast<const void*>(&neg_inf_bits), kWidth);
    }
    std::memcpy(padded, source + whole * kLanes * kWidth, tail * kWidth);
    store(out + whole * kLanes, load_vector<kDType>(padded) * inv_temperature);
  }
}

AROPD_INLINE void load_block(const char* row, int dtype, int64_t start, int count, float inv_temperature,
                             float* out) {
  const auto* source = reinterpret_cast<const unsigned char*>(row) + start * element_size(dtype);
  switch (dtype) {
    case kFloat32: return load_block_as<kFloat32>(source, count, inv_temperature, out);
    case kBFloat16: return load_block_as<kBFloat16>(source, count, inv_temperature, out);
    default: return load_block_as<kFloat16>(source, count, inv_temperature, out);
  }
}

template <int kDType>
AROPD_INLINE void store_block_as(const float* values, int count, unsigned char* target) {
  constexpr int kWidth = kDType == kFloat32 ? 4 : 2;
  const int whole = count / kLanes, tail = count % kLanes;
  for (int k = 0; k < whole; ++k) store_vector<kDType>(target + k * kLanes * kWidth, load(values + k * kLanes));
  if (tail) {
    alignas(64) unsigned char padded[kLanes * kWidth];
    store_vector<kDType>(padded, load(values + whole * kLanes));
    std::memcpy(target + whole * kLanes * kWidth, padded, tail * kWidth);
  }
}

AROPD_INLINE void store_block(const float* values, int64_t start, int count, char* row, int dtype) {
  auto* target = reinterpret_cast<unsigned char*>(row) + start * element_size(dtype);
  switch (dtype) {
    case kFloat32: return store_block_as<kFloat32>(values, count, target);
    case kBFloat16: return store_block_as<kBFloat16>(values, count, target);
    default: return store_block_as<kFloat16>(values, count, target);
  }
}

// --- one row -------------------------------------------------------------------------------------

struct Blocks {
  alignas(64) float student[kBlock];
  alignas(64) float partial[kBlock];
  alignas(64) float full[kBlock];
  alignas(64) float scratch[kBlock];  // the gradient block
};

struct RowInputs {
  const char* student;
  const char* partial;
  const char* full;
  int student_dtype, partial_dtype, full_dtype;
  int64_t vocab;
  float inv_temperature;  // 1 / T in float32, as the reference multiplies

  int count_at(int64_t start) const { return static_cast<int>(std::min<int64_t>(kBlock, vocab - start)); }

  // Loads the block at start of the student only; returns its number of vectors.
  AROPD_INLINE int load_student(int64_t start, Blocks& blocks) const {
    const int count = count_at(start);
    load_block(student, student_dtype, start, count, inv_temperature, blocks.student);
    return (count + kLanes - 1) / kLanes;
  }

  // Loads the block at start of all three inputs; returns its number of vectors.
  AROPD_INLINE int load(int64_t start, Blocks& blocks) const {
    const int count = count_at(start);
    load_block(student, student_dtype, start, count, inv_temperature, blocks.student);
    load_block(partial, partial_dtype, start, count, inv_temperature, blocks.partial);
    load_block(full, full_dtype, start, count, inv_temperature, blocks.full);
    return (count + kLanes - 1) / kLanes;
  }
};

// Per-lane online log-sum-exp: the running max and the sum of exp(x - max) of each lane.
struct LaneLogSumExp {
  VecF max = splat(kNegInf);
  VecF sum = splat(0.0f);

  // Moves the lanes to max(max, block_max) and returns the factor every sum taken relative to the old
  // max must be multiplied by. shift is what to subtract from the block's values before exp: the new
  // max, or 0 in lanes that have seen only -inf (so that -inf - -inf never makes a NaN).
  AROPD_INLINE VecF rebase(VecF block_max, VecF& shift) {
    const VecF new_max = lane_max(max, block_max);
    shift = new_max == splat(kNegInf) ? splat(0.0f) : new_max;
    const VecF rescale = exp(max - shift);
    sum *= rescale;
    max = new_max;
    return rescale;
  }

  AROPD_INLINE void add_block(const float* values, int n_vectors) {
    VecF block_max = splat(kNegInf);
    for (int k = 0; k < n_vectors; ++k) block_max = lane_max(block_max, aropd::load(values + k * kLanes));
    VecF shift;
    rebase(block_max, shift);
    VecF block_sum = splat(0.0f);
    for (int k = 0; k < n_vectors; ++k) block_sum += exp(aropd::load(values + k * kLanes) - shift);
    sum += block_sum;
  }
};

// A logsumexp kept as max + log(sum): x - lse is formed as (x - max) - log_sum, so the log-probability
// of a token near the max keeps its precision (lse itself would be rounded at the ulp of the max).
struct LogNormalizer {
  float max, log_sum;

  AROPD_INLINE VecF log_prob(VecF x) const { return (x - max) - log_sum; }
  double value() const { return double(max) + double(log_sum); }
};

// Carries per-lane sums taken relative to each lane's max over to the row's max M.
struct LaneMerge {
  double max;
  double weight[kLanes];

  explicit LaneMerge(VecF lane_maxima) {
    max = -INFINITY;
    for (int lane = 0; lane < kLanes; ++lane) max = std::max<double>(max, lane_maxima[lane]);
    for (int lane = 0; lane < kLanes; ++lane) {
      weight[lane] = lane_maxima[lane] == kNegInf ? 0.0 : std::exp(lane_maxima[lane] - max);
    }
  }

  double total(VecF per_lane) const {
    double sum = 0.0;
    for (int lane = 0; lane < kLanes; ++lane) sum += weight[lane] * per_lane[lane];
    return sum;
  }

  LogNormalizer log_normalizer(VecF lane_sum) const {
    return {static_cast<float>(max), static_cast<float>(std::log(total(lane_sum)))};
  }
};

// +inf when some token made the sum infinite in exact arithmetic (see allowed_where_forbidden); a NaN
// stays NaN.
double infinite_if(double sum, VecF max_allowed_where_forbidden) {
  bool any = false;
  for (int lane = 0; lane < kLanes; ++lane) any |= max_allowed_where_forbidden[lane] > kNegInf;
  return any && !std::isnan(sum) ? INFINITY : sum;
}

double sum_lanes(VecF values) {
  double sum = 0.0;
  for (int lane = 0; lane < kLanes; ++lane) sum += values[lane];
  return sum;
}

struct Settings {
  float lam, clip;
  float forbidden_by_full;  // lam * r where r = -inf: -inf for lam > 0, 0 for lam = 0 (never 0 * inf)
  double beta;
  float log_beta, log_one_minus_beta;  // JSD mixture weights, in log space
};

// z = la + lam * clamp(lf - la, -c, c) with the -inf conventions of reference._scaled_residual.
AROPD_INLINE VecF anchored_target(VecF log_partial, VecF log_full, const Settings& settings) {
  const VecF residual = clamp_symmetric(log_full - log_partial, settings.clip);
  VecF scaled = residual == splat(kNegInf) ? splat(settings.forbidden_by_full) : settings.lam * residual;
  scaled = zero_where(log_partial == splat(kNegInf), scaled);  // the anchor forbids it: stays forbidden
  return log_partial + scaled;
}

struct LogNormalizers {
  LogNormalizer student, partial, full;

  struct LogProbs {
    VecF student, partial, full;
  };

  // ls, la, lf of the k-th vector of the loaded block.
  AROPD_INLINE LogProbs log_probs(const Blocks& blocks, int k) const {
    return {student.log_prob(load(blocks.student + k * kLanes)), partial.log_prob(load(blocks.partial + k * kLanes)),
            full.log_prob(load(blocks.full + k * kLanes))};
  }
};

// Pass 1: the three log-normalizers in one sweep.
AROPD_INLINE LogNormalizers normalizer_pass(const RowInputs& in, Blocks& blocks) {
  LaneLogSumExp student, partial, full;
  for (int64_t start = 0; start < in.vocab; start += kBlock) {
    const int n_vectors = in.load(start, blocks);
    student.add_block(blocks.student, n_vectors);
    partial.add_block(blocks.partial, n_vectors);
    full.add_block(blocks.full, n_vectors);
  }
  return {LaneMerge(student.max).log_normalizer(student.sum), LaneMerge(partial.max).log_normalizer(partial.sum),
          LaneMerge(full.max).log_normalizer(full.sum)};
}

struct TargetSummary {
  LogNormalizer target;  // logsumexp(z)
  double divergence;     // reverse or forward KL (JSD: computed by jensen_shannon_pass)
  double belief_shift, clipped_mass, student_entropy, target_entropy;
};

// Per-thread room for one row, kept from pass 2 for the later passes, so that they need not read and
// convert the teachers again: the target logits z and, for reverse KL, the student's probabilities.
struct RowBuffers {
  float* target;
  float* probability;
};

// Pass 2: the target's log-normalizer and, in the same sweep, reverse or forward KL and the
// diagnostics. Sums weighted by exp(z - max) are rescaled with the online max of z.
template <Divergence kKind, bool kDiagnostics>
AROPD_INLINE TargetSummary target_pass(const RowInputs& in, const LogNormalizers& lse, const Settings& settings,
                                       const RowBuffers& row_buffers, Blocks& blocks) {
  float* const target_row = row_buffers.target;
  LaneLogSumExp target;
  VecF target_gap = splat(0.0f);       // sum w (z - ls), w = exp(z - max): forward KL
  VecF target_weighted = splat(0.0f);  // sum w z: target entropy
  VecF student_gap = splat(0.0f);      // sum p (ls - z): reverse KL
  VecF student_mass = splat(0.0f);     // sum p
  VecF student_weighted = splat(0.0f); // sum p ls: student entropy
  VecF belief_shift = splat(0.0f);     // sum q_F (lf - la)
  VecF clipped_mass = splat(0.0f);     // sum q_F [|lf - la| > c]
  VecF infinite_divergence = splat(kNegInf);  // > -inf: a token the target forbids and the student
                                              // allows (reverse KL), or the other way round (forward)
  VecF infinite_shift = splat(kNegInf);       // > -inf: a token the anchor forbids, the full teacher not
  for (int64_t start = 0; start < in.vocab; start += kBlock) {
    const int n_vectors = in.load(start, blocks);
    VecF block_max = splat(kNegInf);
    for (int k = 0; k < n_vectors; ++k) {
      const auto [log_student, log_partial, log_full] = lse.log_probs(blocks, k);
      const VecF z = anchored_target(log_partial, log_full, settings);
      store(target_row + start + k * kLanes, z);
      block_max = lane_max(block_max, z);
    }
    VecF shift;
    const VecF rescale = target.rebase(block_max, shift);
    target_gap *= rescale;
    target_weighted *= rescale;
    for (int k = 0; k < n_vectors; ++k) {
      const VecF z = load(target_row + start + k * kLanes);
      const auto [log_student, log_partial, log_full] = lse.log_probs(blocks, k);
          const VecF weight = exp(z - shift);
      const VecI no_weight = weight == splat(0.0f);
      target.sum += weight;
      if constexpr (kKind == Divergence::kForwardKL) {
        target_gap += zero_where(no_weight, weight * (z - log_student));
        infinite_divergence = lane_max(infinite_divergence, allowed_where_forbidden(log_student, z));
      }
      if constexpr (kDiagnostics) target_weighted += zero_where(no_weight, weight * z);
      if constexpr (kKind == Divergence::kReverseKL || kDiagnostics) {
        const VecF p = exp(log_student);
        const VecI no_student = p == splat(0.0f);
        if constexpr (kKind == Divergence::kReverseKL) {
          store(row_buffers.probability + start + k * kLanes, p);
          student_gap += zero_where(no_student, p * (log_student - z));
          student_mass += p;
          infinite_divergence = lane_max(infinite_divergence, allowed_where_forbidden(z, log_student));
        }
        if constexpr (kDiagnostics) {
          student_weighted += zero_where(no_student, p * log_student);
          const VecF q_full = exp(log_full);
          const VecF teacher_gap = log_full - log_partial;
          belief_shift += zero_where(q_full == splat(0.0f), q_full * teacher_gap);
          infinite_shift = lane_max(infinite_shift, allowed_where_forbidden(log_partial, log_full));
          const VecF gap_size = teacher_gap < splat(0.0f) ? -teacher_gap : teacher_gap;
          clipped_mass += gap_size > splat(settings.clip) ? q_full : splat(0.0f);
        }
      }
    }
  }
  const LaneMerge merge(target.max);
  const double target_sum = merge.total(target.sum);
  TargetSummary summary{};
  summary.target = merge.log_normalizer(target.sum);
  if constexpr (kKind == Divergence::kReverseKL) {
    summary.divergence = sum_lanes(student_gap) + summary.target.value() * sum_lanes(student_mass);
  }
  if constexpr (kKind == Divergence::kForwardKL) {
    summary.divergence = merge.total(target_gap) / target_sum - summary.target.value();
  }
  summary.divergence = infinite_if(summary.divergence, infinite_divergence);
  if constexpr (kDiagnostics) {
    summary.belief_shift = infinite_if(sum_lanes(belief_shift), infinite_shift);
    summary.clipped_mass = sum_lanes(clipped_mass);
    summary.student_entropy = -sum_lanes(student_weighted);
    summary.target_entropy = summary.target.value() - merge.total(target_weighted) / target_sum;
  }
  return summary;
}

// log m = logaddexp(log beta + lq, log(1 - beta) + ls), in float32 log space.
AROPD_INLINE VecF log_mixture(VecF log_target, VecF log_student, const Settings& settings) {
  return logaddexp(settings.log_beta + log_target, settings.log_one_minus_beta + log_student);
}

struct MixtureDivergences {
  double target_to_mixture, student_to_mixture;  // KL(q || m), KL(p || m)
};

// Pass 3 of JSD: both divergences from the mixture, which need the final log q.
AROPD_INLINE MixtureDivergences jensen_shannon_pass(const RowInputs& in, const LogNormalizers& lse,
                                                    const LogNormalizer& lse_target,
                                                    const Settings& settings, const float* target_row,
                                                    Blocks& blocks) {
  VecF target_part = splat(0.0f), student_part = splat(0.0f);
  for (int64_t start = 0; start < in.vocab; start += kBlock) {
    const int n_vectors = in.load_student(start, blocks);
    for (int k = 0; k < n_vectors; ++k) {
      const VecF log_student = lse.student.log_prob(load(blocks.student + k * kLanes));
      const VecF log_target = lse_target.log_prob(load(target_row + start + k * kLanes));
      const VecF log_m = log_mixture(log_target, log_student, settings);
      const VecF q = exp(log_target), p = exp(log_student);
      target_part += zero_where(q == splat(0.0f), q * (log_target - log_m));
      student_part += zero_where(p == splat(0.0f), p * (log_student - log_m));
    }
  }
  return {sum_lanes(target_part), sum_lanes(student_part)};
}

struct GradientTerms {
  LogNormalizer lse_target;
  float divergence;               // D, reverse KL
  float student_to_mixture;       // KL(p || m), JSD
  float coefficient;              // grad_scale / T, times (1 - beta) for JSD
};

// Last pass: the gradient of grad_scale * D with respect to the student logits. ls - lq is formed
// from normalized log-probabilities (not as (ls - z) + lse_z), so that where p is large both are
// small and the difference keeps its precision.
template <Divergence kKind>
AROPD_INLINE void gradient_pass(const RowInputs& in, const LogNormalizers& lse, const Settings& settings,
                                const GradientTerms& terms, const RowBuffers& row_buffers, char* grad_row,
                                int grad_dtype, Blocks& blocks) {
  for (int64_t start = 0; start < in.vocab; start += kBlock) {
    const int n_vectors = in.load_student(start, blocks);
    for (int k = 0; k < n_vectors; ++k) {
      const VecF log_student = lse.student.log_prob(load(blocks.student + k * kLanes));
      const VecF log_target = terms.lse_target.log_prob(load(row_buffers.target + start + k * kLanes));
      VecF score;
      if constexpr (kKind == Divergence::kReverseKL) {
        const VecF p = load(row_buffers.probability + start + k * kLanes);
        score = zero_where(p == splat(0.0f), p * ((log_student - log_target) - terms.divergence));
      } else {
        const VecF p = exp(log_student);
        if constexpr (kKind == Divergence::kForwardKL) {
          score = p - exp(log_target);
        } else {
          const VecF log_m = log_mixture(log_target, log_student, settings);
          score = zero_where(p == splat(0.0f), p * ((log_student - log_m) - terms.student_to_mixture));
        }
      }
      store(blocks.scratch + k * kLanes, score * terms.coefficient);
    }
    store_block(blocks.scratch, start, in.count_at(start), grad_row, grad_dtype);
  }
}

void write_zero_gradient(char* grad_row, int dtype, int64_t vocab) {
  std::memset(grad_row, 0, vocab * element_size(dtype));  // +0.0 is all-zero bits in all three dtypes
}

template <Divergence kKind, bool kDiagnostics>
AROPD_INLINE void run_row(const Problem& problem, int64_t row, const Settings& settings,
                          const RowBuffers& row_buffers, Blocks& blocks) {
  const RowInputs in{row_start(problem.student, row), row_start(problem.partial, row),
                     row_start(problem.full, row),    problem.student.dtype,
                     problem.partial.dtype,                        problem.full.dtype,
                     problem.vocab,                                1.0f / problem.temperature[row]};
  const LogNormalizers lse = normalizer_pass(in, blocks);
  const TargetSummary summary = target_pass<kKind, kDiagnostics>(in, lse, settings, row_buffers, blocks);
  double divergence = summary.divergence;
  MixtureDivergences mixture{};
  if constexpr (kKind == Divergence::kJensenShannon) {
    mixture = jensen_shannon_pass(in, lse, summary.target, settings, row_buffers.target, blocks);
    divergence = settings.beta * mixture.target_to_mixture + (1.0 - settings.beta) * mixture.student_to_mixture;
  }
  problem.row_loss[row] = static_cast<float>(divergence);
  if constexpr (kDiagnostics) {
    const int64_t n_rows = problem.n_rows;
    problem.diagnostics[row] = static_cast<float>(summary.belief_shift);
    problem.diagnostics[n_rows + row] = static_cast<float>(summary.clipped_mass);
    problem.diagnostics[2 * n_rows + row] = static_cast<float>(summary.student_entropy);
    problem.diagnostics[3 * n_rows + row] = static_cast<float>(summary.target_entropy);
  }
  if (problem.grad.data == nullptr) return;
  float coefficient = problem.grad_scale[row] * in.inv_temperature;
  if constexpr (kKind == Divergence::kJensenShannon) coefficient *= static_cast<float>(1.0 - settings.beta);
  const GradientTerms terms{summary.target, static_cast<float>(divergence),
                            static_cast<float>(mixture.student_to_mixture), coefficient};
  char* grad_row = const_cast<char*>(row_start(problem.grad, row));
  gradient_pass<kKind>(in, lse, settings, terms, row_buffers, grad_row, problem.grad.dtype, blocks);
}

template <Divergence kKind>
AROPD_INLINE void run_row(const Problem& problem, int64_t row, const Settings& settings,
                          const RowBuffers& row_buffers, Blocks& blocks) {
  if (problem.diagnostics != nullptr) {
    run_row<kKind, true>(problem, row, settings, row_buffers, blocks);
  } else {
    run_row<kKind, false>(problem, row, settings, row_buffers, blocks);
  }
}

AROPD_CLONES void process_row(const Problem& problem, int64_t row, const Settings& settings,
                              const RowBuffers& row_buffers) {
  if (!problem.active[row]) {  // skipped: zeros and no other work
    problem.row_loss[row] = 0.0f;
    if (problem.diagnostics != nullptr) {
      for (int k = 0; k < 4; ++k) problem.diagnostics[k * problem.n_rows + row] = 0.0f;
    }
    if (problem.grad.data != nullptr) {
      write_zero_gradient(const_cast<char*>(row_start(problem.grad, row)), problem.grad.dtype,
                          problem.vocab);
    }
    return;
  }
  Blocks blocks;
  if (settings.beta == 1.0) {
    run_row<Divergence::kReverseKL>(problem, row, settings, row_buffers, blocks);
  } else if (settings.beta == 0.0) {
    run_row<Divergence::kForwardKL>(problem, row, settings, row_buffers, blocks);
  } else {
    run_row<Divergence::kJensenShannon>(problem, row, settings, row_buffers, blocks);
  }
}

AROPD_CLONES void convert_block(const char* source, int source_dtype, char* target, int target_dtype, int64_t start,
                                int count) {
  alignas(64) float values[kBlock];
  load_block(source, source_dtype, start, count, 1.0f, values);
  store_block(values, start, count, target, target_dtype);
}

}  // namespace

void convert(const void* source, int source_dtype, void* target, int target_dtype, int64_t count) {
  for (int64_t start = 0; start < count; start += kBlock) {
    convert_block(static_cast<const char*>(source), source_dtype, static_cast<char*>(target), target_dtype, start,
                  static_cast<int>(std::min<int64_t>(kBlock, count - start)));
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
  const int64_t n_rows = problem.n_rows;
  const int64_t padded_vocab = (problem.vocab + kBlock - 1) / kBlock * kBlock;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> storage(2 * padded_vocab);
    const RowBuffers row_buffers{storage.data(), storage.data() + padded_vocab};
#pragma omp for schedule(dynamic, 1)
    for (int64_t row = 0; row < n_rows; ++row) process_row(problem, row, settings, row_buffers);
  }
}

std::string instruction_set() {
#if AROPD_HAS_CLONES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3";
#endif
  return "baseline";
}

}  // namespace aropd
