// kvdrift command line: every subcommand parses its options here and calls the library.
#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <iostream>

#include "commands.h"
#include "core/device.h"
#include "core/error.h"
#include "core/out_of_memory.h"
#include "model/linear.h"

namespace {
// Exit statuses: 0 success, 1 a failure of the command (kvdrift::Error and LibTorch errors), 2 a usage
// error (unknown command or option, a missing or malformed argument).
constexpr int kUsageError = 2;
}  // namespace

int main(int argc, char** argv) {
  // stdout carries results only (generated text, tables); logs go to stderr.
  spdlog::set_default_logger(spdlog::stderr_color_mt("kvdrift"));
  spdlog::set_pattern("[%H:%M:%S.%e] [%^%l%$] %v");

  CLI::App app{"kvdrift: simulate how KV-cache quantization errors accumulate during decoding"};
  bool show_version = false;
  app.add_flag("--version", show_version, "print kvdrift, LibTorch, CUDA and HDF5 versions and exit");
  int threads = 0;
  app.add_option("--threads", threads, "CPU intra-op threads (default: $KVDRIFT_THREADS, else every core)")
      ->check(CLI::Range(1, kvdrift::kMaxThreads));
  std::string gemm = "packed";
  app.add_option("--gemm", gemm,
                 "weight GEMMs on CPU in float32: packed (MKL's pre-packed weights for the decode batch) or plain "
                 "(torch::linear on every call, the reference); docs/performance.md")
      ->check(CLI::IsMember({"packed", "plain"}));
  app.require_subcommand(0, 1);
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error|off")->check(
      CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  std::function<void()> command;
  kvdrift::cli::register_run(app, command);
  kvdrift::cli::register_sweep(app, command);
  kvdrift::cli::register_generate(app, command);
  kvdrift::cli::register_convert(app, command);
  kvdrift::cli::register_bench(app, command);
  kvdrift::cli::register_quantize(app, command);
  kvdrift::cli::register_analysis(app, command);
  kvdrift::cli::register_tokenize(app, command);
  kvdrift::cli::register_bits(app, command);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help prints the help (exit 0); every other usage error is one line and exit status 2.
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);
    std::cerr << "kvdrift: error: " << e.what() << " (kvdrift --help lists the commands and options)" << std::endl;
    return kUsageError;
  }
  spdlog::set_level(spdlog::level::from_str(log_level));
  try {
    kvdrift::configure_threads(threads);
    kvdrift::set_default_gemm_path(gemm == "plain" ? kvdrift::GemmPath::Plain : kvdrift::GemmPath::Packed);
    // Only the commands that compute with LibTorch's threads probe the machine (150 ms); a sweep's
    // points are `kvdrift run` processes and probe for themselves.
    const auto subcommands = app.get_subcommands();
    const std::string name = subcommands.empty() ? "" : subcommands.front()->get_name();
    if (name == "run" || name == "generate" || name == "bench" || name == "quantize")
      kvdrift::choose_openmp_waiting(argv);
    if (show_version) {
      std::cout << kvdrift::version_report();
      return 0;
    }
    if (!command) {
      std::cerr << "kvdrift: error: no command given (kvdrift --help lists the commands and options)" << std::endl;
      return kUsageError;
    }
    command();
  } catch (const kvdrift::Error& e) {
    std::cerr << "kvdrift: error: " << e.what() << std::endl;
    return 1;
  } catch (const kvdrift::InternalError& e) {
    std::cerr << "kvdrift: internal error (a bug in kvdrift; please report it with the command): " << e.what()
              << std::endl;
    return 3;
  } catch (const c10::Error& e) {
    const auto out_of_memory = kvdrift::out_of_memory_message(e);
    std::cerr << "kvdrift: error: " << (out_of_memory ? *out_of_memory : std::string("LibTorch: ") + e.what_without_backtrace())
              << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "kvdrift: error: " << kvdrift::out_of_memory_message(e).value_or(e.what()) << std::endl;
    return 1;
  }
  return 0;
}
