// `kvdrift plot`, `kvdrift plot-sweep` and `kvdrift score`: the analysis scripts under analysis/ (Python
// of the project's .venv, with h5py and matplotlib), reached from the one command line. The script replaces this process,
// so its arguments, output and exit status are the script's own; task scoring runs model-generated
// code only in the sandboxed children that analysis/score.py starts, never in a kvdrift process.
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "commands.h"
#include "core/error.h"

namespace kvdrift::cli {

std::string project_python() {
  const char* python = std::getenv("KVDRIFT_PYTHON");
  return python && *python ? python : KVDRIFT_PYTHON;  // the .venv scripts/setup.sh made (h5py, matplotlib)
}

namespace {

// $KVDRIFT_ANALYSIS_DIR when set (an installed copy), else the checkout this binary was built from.
std::string analysis_dir() {
  const char* dir = std::getenv("KVDRIFT_ANALYSIS_DIR");
  return dir && *dir ? dir : KVDRIFT_ANALYSIS_DIR;
}

[[noreturn]] void exec_script(const std::string& script, const std::vector<std::string>& args) {
  const std::string path = analysis_dir() + "/" + script;
  if (!std::filesystem::exists(path))
    fail("{} not found (set KVDRIFT_ANALYSIS_DIR to the analysis/ folder of a kvdrift checkout)", path);
  const std::string interpreter = project_python();
  std::vector<char*> argv = {const_cast<char*>(interpreter.c_str()), const_cast<char*>(path.c_str())};
  for (const auto& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  ::setenv("MPLBACKEND", "Agg", /*overwrite=*/0);  // figures to files; no display on cluster nodes
  ::execv(interpreter.c_str(), argv.data());
  fail("cannot run {}: {} (run scripts/setup.sh to make the project's .venv, or set KVDRIFT_PYTHON)", interpreter,
       std::strerror(errno));
}

void add_script_command(CLI::App& app, std::function<void()>& command, const char* name, const char* script,
                        const char* description) {
  auto args = std::make_shared<std::vector<std::string>>();
  auto* sub = app.add_subcommand(name, description);
  sub->set_help_flag();  // --help goes to the script, which documents its own options
  sub->allow_extras();
  sub->prefix_command();
  sub->callback([sub, args, script, &command] {
    *args = sub->remaining();
    command = [args, script] { exec_script(script, *args); };
  });
}

}  // namespace

void register_analysis(CLI::App& app, std::function<void()>& command) {
  add_script_command(app, command, "plot", "plot_drift.py",
                     "drift figures and report.md from run logs (analysis/plot_drift.py; --help for options)");
  add_script_command(app, command, "plot-sweep", "plot_sweep.py",
                     "figures from a sweep's summary.h5 (analysis/plot_sweep.py; --help for options)");
  add_script_command(app, command, "score", "score.py",
                     "task accuracy of a finished run, written into its log (analysis/score.py; --help for options)");
}

}  // namespace kvdrift::cli
