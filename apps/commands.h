#pragma once
// Each subcommand adds itself to the parser and sets `command` to its action when it is chosen.
#include <CLI/CLI.hpp>

#include <functional>
#include <string>

namespace kvdrift::cli {

void register_generate(CLI::App& app, std::function<void()>& command);
void register_convert(CLI::App& app, std::function<void()>& command);
void register_bench(CLI::App& app, std::function<void()>& command);
void register_quantize(CLI::App& app, std::function<void()>& command);
void register_run(CLI::App& app, std::function<void()>& command);
void register_analysis(CLI::App& app, std::function<void()>& command);
void register_sweep(CLI::App& app, std::function<void()>& command);
void register_tokenize(CLI::App& app, std::function<void()>& command);
void register_bits(CLI::App& app, std::function<void()>& command);

// The Python that runs analysis/ and scripts/: $KVDRIFT_PYTHON when set, else the project's .venv.
std::string project_python();

}  // namespace kvdrift::cli
