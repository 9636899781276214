#pragma once
// Child processes of the sweep commands: the points' `kvdrift run`s, and sbatch/squeue/sacct.
#include <sys/types.h>

#include <string>
#include <vector>

namespace kvdrift::sweep {

// The absolute path of `program` found on PATH, or "" when it is not there.
std::string find_on_path(const std::string& program);

// The absolute path of the running kvdrift binary (what the points run).
std::string self_executable();

// Starts the program file `executable` with `argv` (argv[0] its name, as `ps` shows it) and `extra_env` ("NAME=VALUE", replacing a variable of
// that name) added to this process's environment, stdin from /dev/null and stdout and stderr into
// `output_fd`. Returns the child's pid; fails when it cannot fork.
pid_t spawn(const std::string& executable, const std::vector<std::string>& argv,
            const std::vector<std::string>& extra_env, int output_fd);

struct CommandResult {
  int exit_code = 0;  // 128 + N when killed by signal N
  std::string out, err;
};
// Runs `argv` (argv[0] looked up on PATH), waits for it and captures its stdout and stderr.
CommandResult run_command(const std::vector<std::string>& argv);

// How a child ended, from its waitpid status: "0", "1", … or "signal 15".
std::string describe_exit(int wait_status);
// The exit code a shell would report: the exit status, or 128 + the signal.
int exit_code(int wait_status);

}  // namespace kvdrift::sweep
