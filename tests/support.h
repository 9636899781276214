#pragma once
// Shared helpers for the test suite: where the fixtures live, scratch directories, and running the
// kvdrift CLI as a separate process to check exit codes and messages.
#include <gtest/gtest.h>
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace kvdrift::test {

// ../shared/models/stories260K beside the checkout, else models/stories260K (scripts/fetch-model.sh),
// else $KVDRIFT_MODELS_DIR/stories260K. Fails the calling test (never skips) when none exists.
std::string stories260k_dir();
// The converted SmolLM2-135M-Instruct directory (scripts/fetch-model.sh smollm2-135m), or a failure.
std::string smollm2_dir();

// A fresh, empty directory under the build tree, unique to the running test.
std::string scratch_dir();

struct CliResult {
  int exit_code;
  std::string out;
  std::string err;
};
// Runs build/kvdrift with `args` (each passed as one argv entry, no shell).
CliResult run_cli(const std::vector<std::string>& args);
// Expects a failed run with exactly one "kvdrift: error: " line on stderr, containing `fragment`,
// and (unless the command reports progress before failing) nothing on stdout.
void expect_one_error_line(const CliResult& result, const std::string& fragment, bool empty_stdout = true);
// In a forked child: replaces the process with build/kvdrift `args` (exit 127 if exec fails).
[[noreturn]] void exec_cli(const std::vector<std::string>& args);
// Starts build/kvdrift `args` in the background with stdout and stderr into the file `output`.
pid_t start_cli(const std::vector<std::string>& args, const std::string& output);
// Waits for the child `pid` and returns its exit code (128 + the signal when one ended it).
int wait_exit_code(pid_t pid);
// Waits up to two minutes for the lock file `path` (core/writer_lock.h) to name process `pid`;
// whether it did.
bool wait_for_lock_holder(const std::string& path, pid_t pid);
// This machine's name, as lock files record it.
std::string host_name();

// The message of the kvdrift::Error that `action` throws; a test failure (and "") if it throws none.
std::string error_message(const std::function<void()>& action);

// Runs `script` (written into `dir` as NAME.py) with the project's .venv Python (which has h5py)
// and `args`; returns the exit status and leaves stdout and stderr together in *output.
int run_python(const std::string& dir, const std::string& name, const std::string& script,
               const std::vector<std::string>& args, std::string* output);

std::string read_file(const std::string& path);
void write_file(const std::string& path, const std::string& contents);

// DIR/run.yaml: a run of stories260K on inline `prompts` (a YAML list) for `steps` new tokens past
// any end token, with `quantizers` (YAML list entries, indented two spaces) and output DIR/run.h5.
std::string write_stories260k_config(
    const std::string& dir, const std::string& quantizers, int64_t steps,
    const std::string& prompts = "[\"Once upon a time, there was a little girl named Lily.\"]");

}  // namespace kvdrift::test
