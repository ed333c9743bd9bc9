// pybind11 entry point. It takes raw addresses, shapes, strides (in elements) and dtype codes so that
// the extension builds without torch headers; aropd_kernels/native.py checks them before calling.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "row_kernel.h"

namespace py = pybind11;

namespace {

// (address, dtype code, T, stride of the batch dimension, stride of the sequence dimension)
using ViewArgument = std::tuple<std::uintptr_t, int, std::int64_t, std::int64_t, std::int64_t>;

aropd::RowsView to_view(const ViewArgument& argument) {
  const auto& [address, dtype, seq, stride_batch, stride_seq] = argument;
  return {reinterpret_cast<const void*>(address), dtype, seq, stride_batch, stride_seq};
}

void compute_rows(const ViewArgument& student, const ViewArgument& partial, const ViewArgument& full,
                  const ViewArgument& grad, std::int64_t n_rows, std::int64_t vocab,
                  std::uintptr_t temperature, std::uintptr_t active, std::uintptr_t grad_scale,
                  std::uintptr_t row_loss, std::uintptr_t diagnostics, double lam, double clip, double beta,
                  int num_threads) {
  aropd::Problem problem{};
  problem.student = to_view(student);
  problem.partial = to_view(partial);
  problem.full = to_view(full);
  problem.grad = to_view(grad);
  problem.n_rows = n_rows;
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

// Asks Linux for transparent huge pages on the 2 MiB-aligned interior of [address, address + bytes).
// A freshly allocated N x V gradient is otherwise first touched in 4 KiB pages: at N = 256,
// V = 151936 (bfloat16) that is 19,000 page faults, about 40 ms, as long as the kernel itself. Only a
// hint: ignored where THP is off or unavailable, harmless where the pages are already there.
void advise_huge_pages(std::uintptr_t address, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHugePage = std::uintptr_t{1} << 21;
  const std::uintptr_t begin = (address + kHugePage - 1) & ~(kHugePage - 1);
  const std::uintptr_t end = (address + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)address;
  (void)bytes;
#endif
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
  module.def("advise_huge_pages", &advise_huge_pages, "Hint: back this address range with huge pages (Linux).");
  module.def("instruction_set", &aropd::instruction_set,
             "The instruction set the row kernel dispatches to on this CPU.");
}
