// pybind11 entry point. It takes raw addresses, shapes, strides (in elements) and dtype codes so that
// the extension builds without torch headers; aropd_kernels/native.py checks them before calling.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>

#include "row_kernel.h"

namespace py = pybind11;

namespace {

// (address, dtype code, stride of the batch dimension, stride of the sequence dimension)
using ViewArgument = std::tuple<std::uintptr_t, int, std::int64_t, std::int64_t>;

aropd::RowsView to_view(const ViewArgument& argument) {
  const auto& [address, dtype, stride_batch, stride_seq] = argument;
  return {reinterpret_cast<const void*>(address), dtype, stride_batch, stride_seq};
}

void compute_rows(const ViewArgument& student, const ViewArgument& partial, const ViewArgument& full,
                  const ViewArgument& grad, std::int64_t n_rows, std::int64_t seq, std::int64_t vocab,
                  std::uintptr_t temperature, std::uintptr_t active, std::uintptr_t grad_scale,
                  std::uintptr_t row_loss, std::uintptr_t diagnostics, double lam, double clip, double beta,
                  int num_threads) {
  aropd::Problem problem{};
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
  problem.row_loss = reinterpret_cast<float*>(row_loss);
  problem.diagnostics = reinterpret_cast<float*>(diagnostics);
  problem.lam = lam;
  problem.clip = static_cast<float>(clip);
  problem.beta = beta;
  aropd::compute_rows(problem, num_threads);
}

}  // namespace

PYBIND11_MODULE(_native, module) {
  module.doc() = "Native CPU kernel of aropd-kernels (see aropd_kernels/native.py; not a public API).";
  module.attr("FLOAT32") = static_cast<int>(aropd::kFloat32);
  module.attr("BFLOAT16") = static_cast<int>(aropd::kBFloat16);
  module.attr("FLOAT16") = static_cast<int>(aropd::kFloat16);
  module.def("compute_rows", &compute_rows, py::call_guard<py::gil_scoped_release>(),
             "Runs the per-row contract on raw buffers; address 0 for grad or diagnostics means 'not asked'.");
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
