#pragma once
// Free of LibTorch, so that the parsers (built without it for fuzzing) can check thread settings.

namespace kvdrift {

// The most intra-op threads any setting may ask for (--threads, $KVDRIFT_THREADS, launcher.threads): an
// OpenMP pool of 100000 threads never finishes starting.
constexpr int kMaxThreads = 4096;

}  // namespace kvdrift
