#include "support.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/device.h"
#include "core/error.h"

namespace fs = std::filesystem;

namespace {
// ctest runs tests side by side (one per core) with KVDRIFT_THREADS=1: the tests' own LibTorch follows
// it as every kvdrift they start does.
const int kTestThreads = kvdrift::configure_threads(0);
}  // namespace

namespace kvdrift::test {

namespace {

// scripts/find-model.sh NAME: the one place that knows where models are looked for.
std::string find_model(const std::string& name) {
  const std::string command = "bash '" + std::string(KVDRIFT_SOURCE_DIR) + "/scripts/find-model.sh' " + name + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  std::string output;
  char buffer[1024];
  while (pipe && std::fgets(buffer, sizeof buffer, pipe)) output += buffer;
  const int status = pipe ? ::pclose(pipe) : -1;
  while (!output.empty() && output.back() == '\n') output.pop_back();
  if (status != 0) {
    ADD_FAILURE() << output;  // names where it looked and the fetch-model.sh command to run
    throw std::runtime_error(name + " model missing");
  }
  return output;
}

}  // namespace

std::string stories260k_dir() {
  static const std::string dir = find_model("stories260K");
  return dir;
}

std::string smollm2_dir() {
  static const std::string dir = find_model("smollm2-135m");
  return dir;
}

std::string scratch_dir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  fs::path dir = fs::path(KVDRIFT_TEST_TMP) / (std::string(info->test_suite_name()) + "." + info->name());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

void expect_one_error_line(const CliResult& result, const std::string& fragment, bool empty_stdout) {
  EXPECT_NE(result.exit_code, 0);
  if (empty_stdout) EXPECT_EQ(result.out, "");
  size_t error_lines = 0;
  std::string error_line;
  std::istringstream lines(result.err);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("kvdrift: error: ", 0) == 0) {
      ++error_lines;
      error_line = line;
    }
  }
  EXPECT_EQ(error_lines, 1u) << result.err;
  EXPECT_NE(error_line.find(fragment), std::string::npos) << "expected '" << fragment << "' in: " << result.err;
}

std::string error_message(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& error) {
    return error.what();
  }
  ADD_FAILURE() << "expected kvdrift::Error";
  return "";
}

int run_python(const std::string& dir, const std::string& name, const std::string& script,
               const std::vector<std::string>& args, std::string* output) {
  const std::string script_path = dir + "/" + name + ".py";
  const std::string output_path = dir + "/" + name + ".out";
  write_file(script_path, script);
  std::string command = std::string(KVDRIFT_PYTHON) + " '" + script_path + "'";
  for (const std::string& arg : args) command += " '" + arg + "'";
  const int status = std::system((command + " > '" + output_path + "' 2>&1").c_str());
  *output = read_file(output_path);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file(const std::string& path, const std::string& contents) {
  const auto parent = fs::path(path).parent_path();
  if (!parent.empty()) fs::create_directories(parent);
  std::ofstream out(path, std::ios::binary);
  out << contents;
  if (!out) throw std::runtime_error("cannot write " + path);
}

std::string write_stories260k_config(const std::string& dir, const std::string& quantizers, int64_t steps,
                                     const std::string& prompts) {
  const std::string model = stories260k_dir();
  const std::string path = dir + "/run.yaml";
  write_file(path, fmt::format(R"(model:
  path: {0}/stories260K.bin
  tokenizer: {0}/tok512.bin
prompts:
  source: inline
  texts: {1}
decoding:
  max_new_tokens: {2}
  stop_at_eos: false
quantizers:
{3}
output:
  path: {4}/run.h5
)",
                               model, prompts, steps, quantizers, dir));
  return path;
}

void exec_cli(const std::vector<std::string>& args) {
  std::string exe = KVDRIFT_CLI;
  std::vector<std::string> copies = args;
  std::vector<char*> argv = {exe.data()};
  for (auto& a : copies) argv.push_back(a.data());
  argv.push_back(nullptr);
  ::execv(exe.c_str(), argv.data());
  ::_exit(127);
}

pid_t start_cli(const std::vector<std::string>& args, const std::string& output) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int fd = ::open(output.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    exec_cli(args);
  }
  return pid;
}

int wait_exit_code(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string host_name() {
  char name[256] = {};
  ::gethostname(name, sizeof(name) - 1);
  return name;
}

bool wait_for_lock_holder(const std::string& path, pid_t pid) {
  const std::string holder = host_name() + " " + std::to_string(pid) + "\n";
  for (int tries = 0; tries < 12000; ++tries) {
    std::ifstream in(path);
    std::stringstream text;
    text << in.rdbuf();
    if (text.str() == holder) return true;
    ::usleep(10000);
  }
  return false;
}

CliResult run_cli(const std::vector<std::string>& args) {
  const std::string dir = fs::path(KVDRIFT_TEST_TMP) / "cli";
  fs::create_directories(dir);
  const std::string out_path = dir + "/stdout." + std::to_string(::getpid());
  const std::string err_path = dir + "/stderr." + std::to_string(::getpid());
  pid_t pid = ::fork();
  if (pid == 0) {
    int out_fd = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int err_fd = ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(out_fd, 1);
    ::dup2(err_fd, 2);
    exec_cli(args);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  CliResult result;
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  result.out = read_file(out_path);
  result.err = read_file(err_path);
  return result;
}

}  // namespace kvdrift::test
