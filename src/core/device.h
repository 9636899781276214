#pragma once
// Parsing and describing the device and dtype settings shared by every command.
#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <string>

#include "core/thread_limit.h"

namespace kvdrift {

// "cpu", "cuda", "cuda:N". Fails when CUDA is asked for but this LibTorch build or machine has none.
torch::Device parse_device(const std::string& name);
// "float32"/"fp32", "float16"/"fp16", "bfloat16"/"bf16".
torch::ScalarType parse_dtype(const std::string& name);
std::string dtype_name(torch::ScalarType dtype);  // canonical name: float32, float16, bfloat16
// A human-readable device description for logs and outputs (GPU model name on CUDA).
std::string describe_device(const torch::Device& device);
// The cores this process may run on (its CPU affinity), at least 1.
int available_cores();
// Intra-op threads on CPU: `requested` when > 0, else $KVDRIFT_THREADS when set, else every core this
// process may run on. Fails on a value that is not a positive integer. Returns the count set.
int configure_threads(int requested);
// How idle OpenMP threads wait, chosen once at start (docs/performance.md): libgomp's default spinning
// is fastest on a quiet machine and collapses beside a busy process, sleeping (OMP_WAIT_POLICY=PASSIVE)
// degrades gracefully. With more than one intra-op thread, no OMP_WAIT_POLICY or GOMP_SPINCOUNT given,
// and another process keeping at least half a core busy over 150 ms, the process starts itself again
// (argv) with OMP_WAIT_POLICY=PASSIVE, since libgomp reads it only when it loads; it says so in a log
// line. Returns only when it does not.
void choose_openmp_waiting(char** argv);
// MemAvailable of /proc/meminfo in bytes; nothing where it cannot be read.
std::optional<int64_t> available_memory_bytes();
// kvdrift, LibTorch, CUDA (compiled / available / devices) and HDF5 versions, one per line.
std::string version_report();
// Waits for queued device work, so host timers measure it.
void synchronize(const torch::Device& device);

}  // namespace kvdrift
