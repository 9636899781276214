#include "quant/bench_quant.h"

#include <ATen/CPUGeneratorImpl.h>

#include <chrono>

#include "core/device.h"
#include "quant/hadamard.h"

namespace kvdrift {

std::vector<QuantBenchCase> default_quant_bench_cases() {
  std::vector<QuantBenchCase> cases;
  for (const auto& [k, v] : std::vector<std::pair<int, int>>{{2, 2}, {4, 4}, {4, 2}}) {
    const std::string bits = fmt::format("k{}v{}", k, v);
    const ParamMap kv_bits = {{"k_bits", std::to_string(k)}, {"v_bits", std::to_string(v)}};
    cases.push_back({"rtn per_token " + bits, "rtn", kv_bits, bits});
    cases.push_back({"kivi " + bits, "kivi", kv_bits, bits});
    cases.push_back({"quarot " + bits, "quarot", kv_bits, bits});
    cases.push_back({"kvarn " + bits, "kvarn", {{"preset", bits}}, bits});
  }
  return cases;
}

namespace {

// ms per call of `body`, after one warm-up, over at least min_seconds.
template <typename Body>
double ms_per_call(torch::Device device, double min_seconds, Body&& body) {
  body();
  synchronize(device);
  int64_t repeats = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  do {
    body();
    synchronize(device);
    ++repeats;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  } while (elapsed < min_seconds);
  return 1000.0 * elapsed / static_cast<double>(repeats);
}

}  // namespace

QuantBenchRow bench_quantizer(const QuantBenchCase& bench_case, int64_t heads, int64_t tokens, int64_t head_dim,
                              torch::Device device, double min_seconds) {
  const auto quantizer = make_quantizer(bench_case.method, bench_case.params, head_dim);
  auto generator = at::make_generator<at::CPUGeneratorImpl>(17);
  auto data = torch::randn({heads, tokens, head_dim}, generator, torch::kFloat32).to(device);
  // Tiles as the cache forms them: blocks of the policy's size (per-token methods take whole rows).
  std::vector<std::pair<Role, torch::Tensor>> roles;
  for (Role role : {Role::Key, Role::Value}) {
    const int64_t block = quantizer->policy(role).block;
    roles.push_back({role, block == 1 ? data : data.reshape({-1, block, head_dim})});
  }
  std::vector<QuantizedTiles> stored(2);
  double bits = 0;
  const double quantize_ms = ms_per_call(device, min_seconds, [&] {
    for (size_t r = 0; r < 2; ++r) stored[r] = quantizer->quantize(roles[r].second, roles[r].first, 0);
  });
  const double dequantize_ms = ms_per_call(device, min_seconds, [&] {
    for (size_t r = 0; r < 2; ++r) quantizer->dequantize(stored[r], roles[r].first, 0);
  });
  for (size_t r = 0; r < 2; ++r) bits += stored_bits_per_element(stored[r], data.numel()) / 2.0;
  const double elements = 2.0 * static_cast<double>(data.numel());
  return {bench_case, head_dim, quantize_ms, dequantize_ms, elements / ((quantize_ms + dequantize_ms) / 1000.0) / 1e6,
          bits};
}

HadamardBenchRow bench_walsh_hadamard(int64_t rows, int64_t head_dim, double min_seconds) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(17);
  const auto data = torch::randn({rows, head_dim}, generator, torch::kFloat32);
  const torch::Device cpu(torch::kCPU);
  return {rows, head_dim, ms_per_call(cpu, min_seconds, [&] { quant::walsh_hadamard_reference(data); }),
          ms_per_call(cpu, min_seconds, [&] { quant::walsh_hadamard_cpu(data); })};
}

}  // namespace kvdrift
