// The per-row contract of aropd_kernels/backends.py, in C++ (the passes of docs/math.md).
//
// Pointers, shapes, strides (in elements) and dtype codes come from aropd_kernels/native.py, which
// validates them; nothing here knows about torch.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace aropd {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// A [B, T, V] view with unit stride in V: row i is (b, t) = (i / T, i % T) and starts at
// data + b * stride_batch + t * stride_seq. The views of one problem share B, T and V; their strides
// may differ (a logits[:, :-1] slice beside a contiguous tensor).
struct RowsView {
  const void* data;
  int dtype;
  int64_t stride_batch;
  int64_t stride_seq;
};

struct Problem {
  RowsView student, partial, full;
  RowsView grad;  // data == nullptr: no gradient; otherwise written, float32 or the student's dtype
  int64_t n_rows;            // N = B * T
  int64_t seq;               // T, the rows of one batch entry
  int64_t vocab;
  const float* temperature;  // [N], every entry > 0
  const bool* active;        // [N]
  const float* grad_scale;   // [N]; used when grad.data != nullptr
  float* row_loss;           // [N] out
  float* diagnostics;        // [4, N] out, or nullptr
  double lam;  // double: a tiny lam > 0 still forbids what the full teacher forbids (lam * -inf)
  float clip;
  double beta;  // double: an interior beta must never round to the endpoints 0 or 1
};

// Runs every row of the problem on num_threads OpenMP threads.
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
