#include "core/writer_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <thread>

#include "core/error.h"

namespace kvdrift {

namespace {

namespace fs = std::filesystem;

// How long a refused writer waits for the holder to write its name: the holder writes it right after
// taking the lock, so an empty file means it is between the two.
constexpr auto kHolderNameWait = std::chrono::seconds(1);

// "pid PID on host HOST" from the lock file, as its holder wrote it.
std::string describe_holder(int fd) {
  const auto deadline = std::chrono::steady_clock::now() + kHolderNameWait;
  for (;;) {
    char text[512] = {};
    const ssize_t size = ::pread(fd, text, sizeof(text) - 1, 0);
    std::istringstream fields(std::string(text, size > 0 ? static_cast<size_t>(size) : 0));
    std::string host;
    long pid = 0;
    if (fields >> host >> pid) return fmt::format("pid {} on host {}", pid, host);
    if (std::chrono::steady_clock::now() >= deadline) return "a process that has not written its name";
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

bool same_file(int fd, const std::string& path) {
  struct stat held {}, named {};
  return ::fstat(fd, &held) == 0 && ::stat(path.c_str(), &named) == 0 && held.st_dev == named.st_dev &&
         held.st_ino == named.st_ino;
}

}  // namespace

std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "unknown";
  return name;
}

WriterLock::WriterLock(std::string lock_path, const std::string& what, const std::string& advice)
    : path_(std::move(lock_path)) {
  const fs::path parent = fs::path(path_).parent_path();
  std::error_code ignored;  // a folder that cannot be made fails the open below, which names the path
  if (!parent.empty()) fs::create_directories(parent, ignored);
  for (;;) {
    const int fd = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0) fail("{} cannot be written: cannot create its lock file {} ({})", what, path_, std::strerror(errno));
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int lock_error = errno;
      const std::string holder = lock_error == EWOULDBLOCK ? describe_holder(fd) : "";
      ::close(fd);
      if (lock_error == EWOULDBLOCK)
        fail("{} is held by another kvdrift ({}; lock file {}): {}", what, holder, path_, advice);
      fail("cannot lock {}: {}", path_, std::strerror(lock_error));
    }
    // A holder removes the file before it lets go, so the lock may have been won on a file that is no
    // longer at the path (and a third process may hold the one that is): try again on that one.
    if (same_file(fd, path_)) {
      fd_ = fd;
      break;
    }
    ::close(fd);
  }
  const std::string text = fmt::format("{} {}\n", host_name(), ::getpid());
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, text.data(), text.size(), 0) != static_cast<ssize_t>(text.size())) {
    const std::string reason = std::strerror(errno);
    ::unlink(path_.c_str());
    ::close(fd_);
    fail("cannot write the lock file {}: {}", path_, reason);
  }
}

WriterLock::~WriterLock() {
  if (fd_ < 0) return;
  ::unlink(path_.c_str());
  ::close(fd_);
}

std::string output_lock_path(const std::string& output) {
  std::error_code error;
  const fs::path resolved = fs::weakly_canonical(output, error);
  return (error ? output : resolved.string()) + ".lock";
}

}  // namespace kvdrift
