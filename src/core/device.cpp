#include "core/device.h"

#include <ATen/Parallel.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <H5public.h>
#include <sched.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>
#include <utility>
#ifdef KVDRIFT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

#include "core/error.h"

namespace kvdrift {

torch::Device parse_device(const std::string& name) {
  if (name == "cpu") return torch::Device(torch::kCPU);
  if (name == "cuda" || name.rfind("cuda:", 0) == 0) {
    int index = 0;
    if (name.size() > 5) {
      const std::string digits = name.substr(5);
      if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos)
        fail("unknown device '{}' (expected cpu, cuda or cuda:N)", name);
      index = std::stoi(digits);
    }
    if (!torch::cuda::is_available())
      fail("device '{}' requested but CUDA is not available (this LibTorch build or machine has no GPU)", name);
    if (index >= static_cast<int>(torch::cuda::device_count()))
      fail("device '{}' requested but only {} CUDA device(s) exist", name, torch::cuda::device_count());
    return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  fail("unknown device '{}' (expected cpu, cuda or cuda:N)", name);
}

torch::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32" || name == "fp32") return torch::kFloat32;
  if (name == "float16" || name == "fp16") return torch::kFloat16;
  if (name == "bfloat16" || name == "bf16") return torch::kBFloat16;
  fail("unknown dtype '{}' (expected float32, float16 or bfloat16)", name);
}

std::string dtype_name(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat32: return "float32";
    case torch::kFloat16: return "float16";
    case torch::kBFloat16: return "bfloat16";
    default: return c10::toString(dtype);
  }
}

namespace {

std::string cuda_device_name([[maybe_unused]] c10::DeviceIndex index) {
#ifdef KVDRIFT_WITH_CUDA
  return at::cuda::getDeviceProperties(index)->name;
#else
  return "unknown GPU";
#endif
}

}  // namespace

std::string describe_device(const torch::Device& device) {
  if (device.is_cuda()) {
    const c10::DeviceIndex index = device.has_index() ? device.index() : 0;
    return fmt::format("cuda:{} {} ({} CUDA device(s) visible)", index, cuda_device_name(index),
                       torch::cuda::device_count());
  }
  return fmt::format("cpu ({} intra-op threads)", at::get_num_threads());
}

int available_cores() {
  cpu_set_t allowed;
  return sched_getaffinity(0, sizeof(allowed), &allowed) == 0
             ? std::max(1, CPU_COUNT(&allowed))
             : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

int configure_threads(int requested) {
  int threads = requested;
  if (threads <= 0) {
    if (const char* env = std::getenv("KVDRIFT_THREADS"); env && *env) {
      char* end = nullptr;
      const long value = std::strtol(env, &end, 10);
      if (*end != '\0' || value <= 0 || value > kMaxThreads)
        fail("KVDRIFT_THREADS='{}' is not a positive number of threads", env);
      threads = static_cast<int>(value);
    }
  }
  if (threads <= 0) threads = available_cores();
  at::set_num_threads(threads);
  return threads;
}

namespace {

// Busy and total jiffies of every CPU together, from the first line of /proc/stat; {0, 0} if unreadable.
std::pair<uint64_t, uint64_t> cpu_jiffies(int* cpu_lines) {
  std::ifstream stat("/proc/stat");
  std::string label;
  uint64_t total = 0, idle = 0, value = 0;
  if (!(stat >> label) || label != "cpu") return {0, 0};
  for (int field = 0; field < 8 && stat >> value; ++field) {
    total += value;
    if (field == 3 || field == 4) idle += value;  // idle, iowait
  }
  for (std::string line; cpu_lines && std::getline(stat, line);)
    if (line.rfind("cpu", 0) == 0) ++*cpu_lines;
  return {total - idle, total};
}

// Cores kept busy by every process over `window`: this one is idle meanwhile, so all of it is others'.
double busy_cores(std::chrono::milliseconds window) {
  int cpus = 0;
  const auto [busy_before, total_before] = cpu_jiffies(&cpus);
  std::this_thread::sleep_for(window);
  const auto [busy_after, total_after] = cpu_jiffies(nullptr);
  if (total_after <= total_before || cpus == 0) return 0.0;
  return static_cast<double>(busy_after - busy_before) / static_cast<double>(total_after - total_before) * cpus;
}

constexpr const char* kBusyNote = "KVDRIFT_STARTED_PASSIVE";

}  // namespace

void choose_openmp_waiting(char** argv) {
  if (const char* note = std::getenv(kBusyNote)) {
    spdlog::info("other processes kept {} cores busy when kvdrift started: its OpenMP threads sleep when idle "
                 "(OMP_WAIT_POLICY=PASSIVE; set OMP_WAIT_POLICY to choose)",
                 note);
    ::unsetenv(kBusyNote);
    return;
  }
  if (at::get_num_threads() <= 1 || std::getenv("OMP_WAIT_POLICY") || std::getenv("GOMP_SPINCOUNT")) return;
  const double others = busy_cores(std::chrono::milliseconds(150));
  if (others < 0.5) return;
  ::setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
  ::setenv(kBusyNote, fmt::format("{:.1f}", others).c_str(), 1);
  ::execv("/proc/self/exe", argv);
  ::unsetenv(kBusyNote);  // exec failed: go on as started
  ::unsetenv("OMP_WAIT_POLICY");
}

std::optional<int64_t> available_memory_bytes() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key, unit;
  int64_t kilobytes = 0;
  while (meminfo >> key >> kilobytes >> unit)
    if (key == "MemAvailable:") return kilobytes * 1024;
  return std::nullopt;
}

std::string version_report() {
  const auto& cuda = at::detail::getCUDAHooks();
  std::string cuda_compiled = "no";
  if (cuda.hasCUDART()) {
    const long runtime = cuda.versionCUDART();
    cuda_compiled = fmt::format("yes, CUDA {}.{}", runtime / 1000, runtime % 1000 / 10);
  }
  std::string cuda_available = "no";
  if (torch::cuda::is_available()) {
    cuda_available = fmt::format("yes, {} device(s)", torch::cuda::device_count());
    for (int i = 0; i < static_cast<int>(torch::cuda::device_count()); ++i)
      cuda_available += fmt::format("; cuda:{} {}", i, cuda_device_name(static_cast<c10::DeviceIndex>(i)));
  }
  return fmt::format(
      "kvdrift {} (git {})\nLibTorch {}\nCUDA compiled: {}\nCUDA available: {}\nHDF5 {}.{}.{}\nCPU threads: {}\n",
      KVDRIFT_VERSION, KVDRIFT_GIT_REVISION, TORCH_VERSION, cuda_compiled, cuda_available, H5_VERS_MAJOR,
      H5_VERS_MINOR, H5_VERS_RELEASE, at::get_num_threads());
}

void synchronize(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.has_index() ? device.index() : -1);
}

}  // namespace kvdrift
