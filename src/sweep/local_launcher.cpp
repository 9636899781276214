#include "sweep/local_launcher.h"

#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <memory>

#include "core/device.h"
#include "core/error.h"
#include "sweep/point_run.h"
#include "sweep/process.h"
#include "sweep/status.h"

namespace kvdrift::sweep {
namespace {

volatile sig_atomic_t g_stop_requested = 0;

void request_stop(int) { g_stop_requested = 1; }

// The environment that pins a worker to its device (a GPU is the only one its runs can see) and to its
// share of the cores: workers that each start one OpenMP thread per core oversubscribe the machine, and
// spinning OpenMP threads that share a core slow every run several times over.
std::vector<std::string> worker_environment(const std::string& device, const WorkerThreads& threads) {
  std::vector<std::string> environment;
  if (threads.from != WorkerThreads::From::Environment)
    environment.push_back("KVDRIFT_THREADS=" + std::to_string(threads.count));
  const std::string prefix = "cuda:";
  if (device.rfind(prefix, 0) == 0) environment.push_back("CUDA_VISIBLE_DEVICES=" + device.substr(prefix.size()));
  return environment;
}

struct Worker {
  std::unique_ptr<PointAttempt> attempt;
  std::chrono::steady_clock::time_point start;
};

}  // namespace

WorkerThreads worker_threads(const LocalLauncher& launcher) {
  if (const char* env = std::getenv("KVDRIFT_THREADS"); env && *env)
    return {WorkerThreads::From::Environment, 0, fmt::format("KVDRIFT_THREADS={}", env)};
  if (launcher.threads > 0)
    return {WorkerThreads::From::Launcher, launcher.threads, fmt::format("{} (launcher.threads)", launcher.threads)};
  const int cores = available_cores();
  const int64_t share = std::max<int64_t>(1, cores / launcher.workers);
  return {WorkerThreads::From::CoreShare, share,
          fmt::format("{} ({} cores / {} workers)", share, cores, launcher.workers)};
}

LocalRunSummary run_local(const Manifest& manifest, const std::vector<const Point*>& points,
                          const LocalLauncher& launcher) {
  g_stop_requested = 0;
  struct sigaction action {};
  action.sa_handler = request_stop;
  sigemptyset(&action.sa_mask);
  action.sa_flags = 0;  // no SA_RESTART: waitpid returns, so a stop is acted on at once
  struct sigaction previous_int {
  }, previous_term{};
  ::sigaction(SIGINT, &action, &previous_int);
  ::sigaction(SIGTERM, &action, &previous_term);

  const WorkerThreads threads = worker_threads(launcher);
  std::cout << fmt::format("local: {} worker(s), intra-op threads each: {}\n", launcher.workers, threads.described)
            << std::flush;
  std::vector<Worker> workers(static_cast<size_t>(launcher.workers));
  LocalRunSummary summary;
  size_t next = 0, running = 0, finished = 0;
  bool stopping = false;
  while (true) {
    if (g_stop_requested && !stopping) {
      stopping = true;
      summary.interrupted = true;
      for (Worker& worker : workers)
        if (worker.attempt) ::kill(worker.attempt->pid(), SIGTERM);
    }
    for (size_t w = 0; w < workers.size() && next < points.size() && !stopping; ++w) {
      if (workers[w].attempt) continue;
      const std::string& device = launcher.devices[w % launcher.devices.size()];
      workers[w].attempt =
          std::make_unique<PointAttempt>(manifest.files(*points[next++]), worker_environment(device, threads), /*tee=*/false);
      workers[w].start = std::chrono::steady_clock::now();
      ++running;
    }
    if (running == 0) break;
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, 0);
    if (pid < 0) {
      if (errno == EINTR) continue;
      fail("waiting for the sweep's runs failed: {}", std::strerror(errno));
    }
    for (Worker& worker : workers) {
      if (!worker.attempt || worker.attempt->pid() != pid) continue;
      worker.attempt->finish(status);
      const PointFiles& files = worker.attempt->files();
      const RunLogCheck run_log = check_run_log(files);
      const bool done = status == 0 && run_log.done;
      ++(done ? summary.done : summary.failed);
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - worker.start).count();
      const std::string id = std::filesystem::path(files.dir).filename().string();
      std::cout << fmt::format("[{}/{}] {}  {}  {:.1f} s", ++finished, points.size(), id, done ? "done" : "failed",
                               seconds);
      if (!done)
        std::cout << fmt::format("  (exit status {}{}, log {})", describe_exit(status),
                                 run_log.problem.empty() ? "" : "; " + run_log.problem, files.log);
      std::cout << std::endl;
      worker.attempt.reset();
      --running;
    }
  }
  ::sigaction(SIGINT, &previous_int, nullptr);
  ::sigaction(SIGTERM, &previous_term, nullptr);
  return summary;
}

}  // namespace kvdrift::sweep
