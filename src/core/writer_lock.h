#pragma once
// One writer at a time: an exclusive lock on a lock file beside what a command writes (a run log, a
// sweep's folder, a sweep point), taken before anything is read or changed there and held until the
// command ends. The lock is flock(2)'s, so the kernel releases it however the process ends (a crash,
// SIGKILL), and a stale lock file never blocks anyone. It is a file of its own, not the log: HDF5
// takes its own flock on the log while it has it open, and --overwrite replaces the log.
#include <string>

namespace kvdrift {

class WriterLock {
 public:
  // Takes the lock of `lock_path` (creating the file and its missing parent folders) and writes
  // "HOST PID" into it for the next writer's message. When another process holds it, throws Error:
  // "WHAT is held by another kvdrift (pid PID on host HOST; lock file LOCK_PATH): ADVICE"; when the
  // file cannot be made (a read-only disk), "WHAT cannot be written: cannot create its lock file ...".
  WriterLock(std::string lock_path, const std::string& what, const std::string& advice);
  // Removes the lock file, then releases the lock.
  ~WriterLock();
  WriterLock(const WriterLock&) = delete;
  WriterLock& operator=(const WriterLock&) = delete;

 private:
  std::string path_;
  int fd_ = -1;
};

// This machine's name, as lock files (and a sweep point's `running` marker) record it.
std::string host_name();

// The lock file of an output file: OUTPUT.lock beside the file `output` names once links are
// followed, so that two names of one file share a lock.
std::string output_lock_path(const std::string& output);

}  // namespace kvdrift
