// pybind11 entry point. It takes raw addresses, shapes, strides (in elements) and dtype codes so that
// the extension builds without torch headers; aropd_kernels/native.py checks them before calling.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "row_kernel.h"

namespace py = pybind11;

namespace {

// (address, dtype code, stride of the batch dimension, stride of the sequence dimension)
using ViewArgument = std::tuple<std::uintptr_t, int, std::int64_t, std::int64_t>;

aropd::RowsView to_view(const ViewArgument& argument) {
  const auto& [address, dtype, stride_batch, stride_seq] = argument;
  return {reinterpret_cast<const void*>(address), dtype, stride_batch, stride_seq};
}

// Runs one stage (aropd::Stage) of the per-row contract on raw buffers; address 0 means "not given".
void run_rows(int stage, const ViewArgument& student, const ViewArgument& partial, const ViewArgument& full,
              const ViewArgument& grad, std::int64_t n_rows, std::int64_t seq, std::int64_t vocab,
              std::uintptr_t temperature, std::uintptr_t active, std::uintptr_t grad_scale, std::uintptr_t labels,
              bool with_diagnostics,
              std::uintptr_t row_loss, std::uintptr_t diagnostics, std::uintptr_t normalizers,
              std::uintptr_t target_sums, std::uintptr_t terms, std::uintptr_t mixture_sums, double lam,
              double clip, double beta, int num_threads) {
  aropd::Problem problem{};
  problem.stage = static_cast<aropd::Stage>(stage);
  problem.student = to_view(student);
  problem.partial = to_view(partial);
  problem.full = to_view(full);
  problem.grad = to_view(grad);
  problem.n_rows = n_rows;
  problem.seq = seq;
  problem.vocab = vocab;
  problem.temperature = reinterpret_cast<const float*>(temperature);
  problem.active = reinterpret_cast<const bool*>(active);
  problem.grad_scale = reinterpret_cast<const float*>(grad_scale);
  problem.labels = reinterpret_cast<const std::int64_t*>(labels);
  problem.with_diagnostics = with_diagnostics;
  problem.row_loss = reinterpret_cast<float*>(row_loss);
  problem.diagnostics = reinterpret_cast<float*>(diagnostics);
  problem.normalizers = reinterpret_cast<float*>(normalizers);
  problem.target_sums = reinterpret_cast<double*>(target_sums);
  problem.terms = reinterpret_cast<const double*>(terms);
  problem.mixture_sums = reinterpret_cast<double*>(mixture_sums);
  problem.lam = lam;
  problem.clip = static_cast<float>(clip);
  problem.beta = beta;
  aropd::compute_rows(problem, num_threads);
}

template <class Row, std::size_t kCount>
std::vector<std::string> row_names(const Row (&rows)[kCount]) {
  std::vector<std::string> names;
  for (const Row& row : rows) names.push_back(row.name);
  return names;
}

}  // namespace

PYBIND11_MODULE(_native, module) {
  module.doc() = "Native CPU kernel of aropd-kernels (see aropd_kernels/native.py; not a public API).";
  module.attr("FLOAT32") = static_cast<int>(aropd::kFloat32);
  module.attr("BFLOAT16") = static_cast<int>(aropd::kBFloat16);
  module.attr("FLOAT16") = static_cast<int>(aropd::kFloat16);
  module.attr("STAGES") = py::dict(
      py::arg("fused") = static_cast<int>(aropd::Stage::kFused),
      py::arg("normalizers") = static_cast<int>(aropd::Stage::kNormalizers),
      py::arg("target_sums") = static_cast<int>(aropd::Stage::kTargetSums),
      py::arg("mixture_sums") = static_cast<int>(aropd::Stage::kMixtureSums),
      py::arg("gradient") = static_cast<int>(aropd::Stage::kGradient));
  module.attr("N_DIAGNOSTICS") = aropd::kNumDiagnostics;
  module.attr("TARGET_SUM_ROWS") = row_names(aropd::kTargetSumRows);
  module.attr("TERM_ROWS") = row_names(aropd::kTermRows);
  module.attr("NORMALIZER_ROWS") = py::dict(py::arg("MAX") = static_cast<int>(aropd::kRawMax),
                                            py::arg("LOG_SUM") = static_cast<int>(aropd::kLogSum));
  module.def("run_rows", &run_rows, py::call_guard<py::gil_scoped_release>(),
             "Runs one stage of the per-row contract on raw buffers; address 0 means 'not given'.",
             py::arg("stage"), py::arg("student"), py::arg("partial"), py::arg("full"), py::arg("grad"),
             py::arg("n_rows"), py::arg("seq"), py::arg("vocab"), py::arg("temperature"), py::arg("active"),
             py::arg("grad_scale"),
             py::arg("labels"), py::arg("with_diagnostics"), py::arg("row_loss"), py::arg("diagnostics"),
             py::arg("normalizers"), py::arg("target_sums"), py::arg("terms"), py::arg("mixture_sums"),
             py::arg("lam"), py::arg("clip"), py::arg("beta"), py::arg("num_threads"));
  module.def(
      "convert",
      [](std::uintptr_t source, int source_dtype, std::uintptr_t target, int target_dtype, std::int64_t count) {
        aropd::convert(reinterpret_cast<const void*>(source), source_dtype, reinterpret_cast<void*>(target),
                       target_dtype, count);
      },
      "Test hook: converts count contiguous values with the kernel's load and store code.");
  module.def("instruction_set", &aropd::instruction_set,
             "The instruction set the row kernel dispatches to on this CPU.");
  module.def("instruction_sets", &aropd::instruction_sets, "Every instruction set this CPU can run, best first.");
  module.def("select_instruction_set", &aropd::select_instruction_set,
             "Test hook: use the named instruction set from now on; False when this CPU cannot run it.");
}
