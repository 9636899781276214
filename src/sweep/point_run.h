#pragma once
// One attempt at one point: `kvdrift run RUNDIR/config.yaml --output RUNDIR/run.h5` as a child
// process with its stdout and stderr in RUNDIR/log.txt (truncated: the log of the latest attempt),
// RUNDIR/running ("HOST PID" of the child) while it runs and RUNDIR/exit_status when it has ended.
// Both launchers run points this way, so status reads the same files whoever ran them. An attempt
// holds RUNDIR/point.lock from before it touches those files until it is destroyed: a second attempt
// at a running point (a worker and a hand-started run-point, a Slurm task run twice) stops with an
// error naming the first and changes nothing.
#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

#include "core/writer_lock.h"
#include "sweep/plan.h"

namespace kvdrift::sweep {

class PointAttempt {
 public:
  // Starts the point's run with `extra_env` added to the environment (device pinning). With `tee`,
  // the output goes through a pipe that pump() copies to log.txt and to this process's stdout.
  PointAttempt(const PointFiles& files, const std::vector<std::string>& extra_env, bool tee);
  ~PointAttempt();
  PointAttempt(const PointAttempt&) = delete;
  PointAttempt& operator=(const PointAttempt&) = delete;

  pid_t pid() const { return pid_; }
  const PointFiles& files() const { return files_; }
  // With tee: copies the output until the child closes it.
  void pump();
  // Records how the child ended (its waitpid status) in exit_status and removes the marker.
  void finish(int wait_status);

 private:
  PointFiles files_;
  WriterLock lock_;
  pid_t pid_ = -1;
  int log_fd_ = -1;
  int pipe_fd_ = -1;  // read end of the tee pipe, or -1
};

// Runs one point in the foreground (a Slurm array task): its output is also copied to stdout,
// SIGTERM and SIGINT (scancel, Ctrl-C) are passed on to the run, and the run's exit code is returned.
int run_point(const PointFiles& files);

// The `running` marker is "HOST PID STARTTIME" (STARTTIME: /proc/PID/stat's field 22, the process's
// start in clock ticks since boot), so that a PID given to another process since does not keep the
// point running. Whether the marker's process is alive; nullopt when it ran on another host (this
// one cannot tell).
std::optional<bool> marker_is_live(const std::string& marker_text);
// A process's start time (/proc/PID/stat field 22); nullopt when /proc cannot tell.
std::optional<uint64_t> process_start_time(pid_t pid);

}  // namespace kvdrift::sweep
