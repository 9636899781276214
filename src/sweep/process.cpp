#include "sweep/process.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "core/error.h"

extern char** environ;

namespace kvdrift::sweep {
namespace {

namespace fs = std::filesystem;

std::vector<char*> pointers(std::vector<std::string>& strings) {
  std::vector<char*> result;
  for (std::string& s : strings) result.push_back(s.data());
  result.push_back(nullptr);
  return result;
}

std::vector<std::string> environment_with(const std::vector<std::string>& extra_env) {
  std::vector<std::string> environment;
  for (char** entry = environ; *entry; ++entry) {
    const std::string variable = *entry;
    const std::string name = variable.substr(0, variable.find('='));
    const bool replaced = std::any_of(extra_env.begin(), extra_env.end(), [&](const std::string& e) {
      return e.compare(0, name.size() + 1, name + "=") == 0;
    });
    if (!replaced) environment.push_back(variable);
  }
  environment.insert(environment.end(), extra_env.begin(), extra_env.end());
  return environment;
}

}  // namespace

std::string find_on_path(const std::string& program) {
  const char* path = std::getenv("PATH");
  if (!path) return "";
  const std::string directories = path;
  for (size_t start = 0; start <= directories.size();) {
    size_t end = directories.find(':', start);
    if (end == std::string::npos) end = directories.size();
    const std::string dir = end > start ? directories.substr(start, end - start) : ".";
    const fs::path candidate = fs::path(dir) / program;
    if (::access(candidate.c_str(), X_OK) == 0 && !fs::is_directory(candidate))
      return fs::absolute(candidate).lexically_normal().string();
    start = end + 1;
  }
  return "";
}

std::string self_executable() { return fs::read_symlink("/proc/self/exe").string(); }

pid_t spawn(const std::string& executable, const std::vector<std::string>& argv,
            const std::vector<std::string>& extra_env, int output_fd) {
  // Everything the child needs is prepared before fork: between fork and exec only async-signal-safe calls.
  std::vector<std::string> arguments = argv, environment = environment_with(extra_env);
  std::vector<char*> argument_pointers = pointers(arguments), environment_pointers = pointers(environment);
  const int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (null_fd < 0) fail("cannot open /dev/null: {}", std::strerror(errno));
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(null_fd);
    fail("cannot start {}: fork failed: {}", argv.front(), std::strerror(errno));
  }
  if (pid == 0) {
    ::dup2(null_fd, STDIN_FILENO);
    ::dup2(output_fd, STDOUT_FILENO);
    ::dup2(output_fd, STDERR_FILENO);
    ::execve(executable.c_str(), argument_pointers.data(), environment_pointers.data());
    static const char message[] = "kvdrift: error: cannot execute the point's kvdrift\n";
    (void)!::write(STDERR_FILENO, message, sizeof(message) - 1);
    ::_exit(127);
  }
  ::close(null_fd);
  return pid;
}

CommandResult run_command(const std::vector<std::string>& argv) {
  const std::string program = argv.front().find('/') == std::string::npos ? find_on_path(argv.front()) : argv.front();
  if (program.empty()) fail("{} is not on PATH", argv.front());
  int out_pipe[2], err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0)
    fail("cannot run {}: {}", argv.front(), std::strerror(errno));
  std::vector<std::string> arguments = argv, environment = environment_with({});
  arguments.front() = program;
  std::vector<char*> argument_pointers = pointers(arguments), environment_pointers = pointers(environment);
  const pid_t pid = ::fork();
  if (pid < 0) fail("cannot run {}: fork failed: {}", argv.front(), std::strerror(errno));
  if (pid == 0) {
    const int null_fd = ::open("/dev/null", O_RDONLY);
    ::dup2(null_fd, STDIN_FILENO);
    ::dup2(out_pipe[1], STDOUT_FILENO);
    ::dup2(err_pipe[1], STDERR_FILENO);
    ::execve(argument_pointers[0], argument_pointers.data(), environment_pointers.data());
    ::_exit(127);
  }
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  CommandResult result;
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  std::string* sinks[2] = {&result.out, &result.err};
  for (int open_count = 2; open_count > 0;) {
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buffer[4096];
      const ssize_t n = ::read(fds[i].fd, buffer, sizeof(buffer));
      if (n > 0) {
        sinks[i]->append(buffer, static_cast<size_t>(n));
      } else if (n == 0 || errno != EINTR) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_count;
      }
    }
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  result.exit_code = exit_code(status);
  return result;
}

std::string describe_exit(int wait_status) {
  if (WIFSIGNALED(wait_status)) return "signal " + std::to_string(WTERMSIG(wait_status));
  return std::to_string(WEXITSTATUS(wait_status));
}

int exit_code(int wait_status) {
  return WIFSIGNALED(wait_status) ? 128 + WTERMSIG(wait_status) : WEXITSTATUS(wait_status);
}

}  // namespace kvdrift::sweep
