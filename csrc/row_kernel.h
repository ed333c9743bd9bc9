// The per-row contract of aropd_kernels/backends.py, in C++ (the passes of docs/math.md), and the
// shard stages of aropd_kernels/shards.py over the same passes.
//
// Pointers, shapes, strides (in elements) and dtype codes come from aropd_kernels/native.py, which
// validates them; nothing here knows about torch.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace aropd {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// What one call computes for each row. kFused is the whole per-row contract in one call per row (its
// normalizers and sums never leave the row); the other four are the stages of shards.py over a
// vocabulary shard, each taking the previous stages' combined results and returning its own
// per-shard ones.
enum class Stage : int { kFused = 0, kNormalizers = 1, kTargetSums = 2, kMixtureSums = 3, kGradient = 4 };

constexpr int kNumDiagnostics = 6;  // belief_shift, clipped_mass, the two entropies, the label's log p and log q

// A [B, T, V] view with unit stride in V: row i is (b, t) = (i / T, i % T) and starts at
// data + b * stride_batch + t * stride_seq. The views of one problem share B, T and V; their strides
// may differ (a logits[:, :-1] slice beside a contiguous tensor).
struct RowsView {
  const void* data;
  int dtype;
  int64_t stride_batch;
  int64_t stride_seq;
};

// Per row, the sums of the target pass over the columns of one call (the whole row, or a vocabulary
// shard's), in the units of shards.py: natural logs; "weighted" sums carry weights exp(z - z_max)
// and are centered on z_max (see target_pass).
struct TargetSums {
  double z_max, z_log_sum;        // max of z; log sum exp(z - z_max)
  double weighted_target_gap;     // sum exp(z - z_max) (z - z_max - ls): forward KL
  double weighted_target_logit;   // sum exp(z - z_max) (z - z_max): target entropy
  double student_gap;             // sum p (ls - z): reverse KL
  double student_mass;            // sum p
  double belief_shift;            // sum q_F (lf - la)
  double clipped_mass;            // sum q_F [|lf - la| > clip]
  double student_log_student;     // sum p ls
  double student_token;           // ls at the label, when the label is among these columns, else 0
  double target_token_logit;      // z at the label, likewise
  double infinite_divergence;     // 1 where a token makes the divergence infinite, else 0
  double infinite_shift;          // 1 where a token has lf > -inf = la, else 0
};

// The rows of shard_target_sums, in shards.py's order and with its names (tests/test_native.py
// holds the two against each other).
struct TargetSumRow {
  const char* name;
  double TargetSums::*member;
};
inline constexpr TargetSumRow kTargetSumRows[] = {
    {"Z_MAX", &TargetSums::z_max},
    {"Z_LOG_SUM", &TargetSums::z_log_sum},
    {"WEIGHTED_TARGET_GAP", &TargetSums::weighted_target_gap},
    {"WEIGHTED_TARGET_LOGIT", &TargetSums::weighted_target_logit},
    {"STUDENT_GAP", &TargetSums::student_gap},
    {"STUDENT_MASS", &TargetSums::student_mass},
    {"BELIEF_SHIFT", &TargetSums::belief_shift},
    {"CLIPPED_MASS", &TargetSums::clipped_mass},
    {"STUDENT_LOG_STUDENT", &TargetSums::student_log_student},
    {"STUDENT_TOKEN", &TargetSums::student_token},
    {"TARGET_TOKEN_LOGIT", &TargetSums::target_token_logit},
    {"INFINITE_DIVERGENCE", &TargetSums::infinite_divergence},
    {"INFINITE_SHIFT", &TargetSums::infinite_shift},
};
constexpr int kNumTargetSums = sizeof(kTargetSumRows) / sizeof(kTargetSumRows[0]);

// Per row, what the gradient and the JSD mixture pass need of the whole row (shards.py's terms).
struct Terms {
  double lse_target;          // log sum exp(z) over the whole vocabulary
  double target_mean_gap;     // sum p (ls - z) / sum p, +inf where the reverse KL is infinite
  double kl_student_mixture;  // KL(p || m), JSD
};

struct TermRow {
  const char* name;
  double Terms::*member;
};
inline constexpr TermRow kTermRows[] = {
    {"LSE_TARGET", &Terms::lse_target},
    {"TARGET_MEAN_GAP", &Terms::target_mean_gap},
    {"KL_STUDENT_MIXTURE", &Terms::kl_student_mixture},
};
constexpr int kNumTerms = sizeof(kTermRows) / sizeof(kTermRows[0]);

// Rows of one input's normalizer in the [n_inputs, 2, N] layout of shard_normalizers.
enum NormalizerRow : int { kRawMax = 0, kLogSum = 1 };

struct Problem {
  Stage stage;
  RowsView student, partial, full;  // full.data == nullptr: one teacher, the target is softmax(partial / T)
  RowsView grad;  // data == nullptr: no gradient; otherwise written (kFused, kGradient), float32 or the
                  // student's dtype
  int64_t n_rows;            // N = B * T
  int64_t seq;               // T, the rows of one batch entry
  int64_t vocab;
  const float* temperature;  // [N], every entry > 0
  const bool* active;        // [N]
  const float* grad_scale;   // [N]; used when grad.data != nullptr
  const int64_t* labels;     // [N] or nullptr: the label's log-probabilities, when it lies in [0, V)
  bool with_diagnostics;
  float* row_loss;           // kFused: [N] out
  float* diagnostics;        // kFused with diagnostics: [kNumDiagnostics, N] out
  // The shard stages' [rows, N] arrays, row-major as shards.py lays them out.
  float* normalizers;        // [n_inputs, 2, N] (n_inputs: 2 for one teacher, else 3): written by
                             // kNormalizers, the combined ones read by the later stages
  double* target_sums;       // kTargetSums: [kNumTargetSums, N] out
  const double* terms;       // kMixtureSums, kGradient: [kNumTerms, N] in
  double* mixture_sums;      // kMixtureSums: [2, N] out, KL(q || m) and KL(p || m)
  double lam;  // double: a tiny lam > 0 still forbids what the full teacher forbids (lam * -inf)
  float clip;
  double beta;  // double: an interior beta must never round to the endpoints 0 or 1
};

// Runs the problem's stage on every row, on num_threads OpenMP threads.
void compute_rows(const Problem& problem, int num_threads);

// Converts count values between dtypes with the kernel's own load and store paths (for tests).
void convert(const void* source, int source_dtype, void* target, int target_dtype, int64_t count);

// The instruction set the row kernel dispatches to on this CPU ("x86-64-v4", "x86-64-v3", "baseline").
std::string instruction_set();

// Every instruction set this CPU can run, best first ("baseline" always last).
std::vector<std::string> instruction_sets();

// Test hook: makes the kernel use the named instruction set from now on; false when this CPU cannot
// run it (nothing changes then).
bool select_instruction_set(const std::string& name);

}  // namespace aropd
