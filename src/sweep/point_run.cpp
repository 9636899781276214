#include "sweep/point_run.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/writer_lock.h"
#include "sweep/process.h"

namespace kvdrift::sweep {
namespace {

namespace fs = std::filesystem;

void write_all(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // a closed stdout must not stop the run's log
    data += n;
    size -= static_cast<size_t>(n);
  }
}

volatile sig_atomic_t g_foreground_child = 0;

void pass_signal_on(int signal_number) {
  if (g_foreground_child > 0) ::kill(static_cast<pid_t>(g_foreground_child), signal_number);
}

}  // namespace

PointAttempt::PointAttempt(const PointFiles& files, const std::vector<std::string>& extra_env, bool tee)
    : files_(files), lock_(files.lock, "point " + files.dir, "wait for its run to end") {
  std::error_code ignored;
  fs::remove(files.exit_status, ignored);
  log_fd_ = ::open(files.log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (log_fd_ < 0) fail("cannot write {}: {}", files.log, std::strerror(errno));
  int output_fd = log_fd_;
  int pipe_fds[2] = {-1, -1};
  if (tee) {
    if (::pipe2(pipe_fds, O_CLOEXEC) != 0) fail("cannot create a pipe for {}: {}", files.log, std::strerror(errno));
    pipe_fd_ = pipe_fds[0];
    output_fd = pipe_fds[1];
  }
  // /proc/self/exe is the binary this process runs even after its file was replaced or removed (a
  // rebuild during a sweep): the path would start the half-written new one, or nothing.
  pid_ = spawn("/proc/self/exe", {self_executable(), "run", files.config, "--output", files.output}, extra_env,
               output_fd);
  if (tee) ::close(pipe_fds[1]);
  write_atomically(files.running, fmt::format("{} {} {}\n", host_name(), pid_, process_start_time(pid_).value_or(0)));
}

PointAttempt::~PointAttempt() {
  if (pipe_fd_ >= 0) ::close(pipe_fd_);
  if (log_fd_ >= 0) ::close(log_fd_);
}

void PointAttempt::pump() {
  char buffer[8192];
  while (pipe_fd_ >= 0) {
    const ssize_t n = ::read(pipe_fd_, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    write_all(log_fd_, buffer, static_cast<size_t>(n));
    write_all(STDOUT_FILENO, buffer, static_cast<size_t>(n));
  }
}

void PointAttempt::finish(int wait_status) {
  write_atomically(files_.exit_status, describe_exit(wait_status) + "\n");
  std::error_code ignored;
  fs::remove(files_.running, ignored);
}

int run_point(const PointFiles& files) {
  std::error_code error;
  if (!fs::is_regular_file(files.config, error))
    fail("{}: no config.yaml: not a planned point of a sweep (kvdrift sweep plan writes it)", files.dir);
  PointAttempt attempt(files, {}, /*tee=*/true);
  g_foreground_child = attempt.pid();
  struct sigaction action {};
  action.sa_handler = pass_signal_on;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  ::sigaction(SIGTERM, &action, nullptr);
  ::sigaction(SIGINT, &action, nullptr);
  attempt.pump();
  int status = 0;
  while (::waitpid(attempt.pid(), &status, 0) < 0 && errno == EINTR) {
  }
  g_foreground_child = 0;
  attempt.finish(status);
  return exit_code(status);
}

std::optional<uint64_t> process_start_time(pid_t pid) {
  std::ifstream stat(fmt::format("/proc/{}/stat", pid));
  std::string text;
  if (!std::getline(stat, text)) return std::nullopt;
  // Field 22 (starttime); the command name (field 2) may hold spaces, so count from its ")".
  std::istringstream fields(text.substr(text.rfind(')') + 1));
  std::string field;
  for (int number = 3; number <= 22 && fields >> field; ++number)
    if (number == 22) return std::stoull(field);
  return std::nullopt;
}

std::optional<bool> marker_is_live(const std::string& marker_text) {
  std::istringstream fields(marker_text);
  std::string host;
  pid_t pid = 0;
  if (!(fields >> host >> pid) || pid <= 0) return false;
  if (host != host_name()) return std::nullopt;
  if (::kill(pid, 0) != 0 && errno != EPERM) return false;
  // The PID may since have been given to another process: its start time says (markers written
  // before the start time was recorded, or where /proc cannot tell, rely on the PID alone).
  uint64_t started = 0;
  if (!(fields >> started) || started == 0) return true;
  const auto now_started = process_start_time(pid);
  return !now_started || *now_started == started;
}

}  // namespace kvdrift::sweep
