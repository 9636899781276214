// `kvdrift run CONFIG.yaml`: the main job. Loads the model, the prompts and the quantizers named by
// the config, runs every prompt side by side (decode/engine.h) and logs it to HDF5 (io/run_log.h).
#include <ATen/Parallel.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>

#include "commands.h"
#include "core/device.h"
#include "core/error.h"
#include "core/out_of_memory.h"
#include "core/output_path.h"
#include "core/sha256.h"
#include "core/writer_lock.h"
#include "decode/engine.h"
#include "run/run_inputs.h"
#include "io/prompts.h"
#include "io/run_config.h"
#include "run/run_log.h"
#include "model/checkpoint.h"
#include "tokenizer/chat_template.h"

namespace kvdrift::cli {

namespace {

struct RunOptions {
  std::string config;
  std::vector<std::string> overrides;
  std::optional<std::string> output;  // given: replaces output.path
  bool overwrite = false;
};

std::string prompts_sha256(const std::vector<Prompt>& prompts) {
  std::string all;
  for (const auto& prompt : prompts) all += fmt::format("{}\n{}\n", prompt.id, fmt::join(prompt.tokens, " "));
  return sha256_hex(all);
}

RunMetadata describe_run(const LlamaModel& model, const RunConfig& config, const Engine& engine,
                         const std::vector<Prompt>& prompts) {
  RunMetadata metadata;
  metadata.tool_version = KVDRIFT_VERSION;
  metadata.git_revision = KVDRIFT_GIT_REVISION;
  metadata.model_path = model.source().path;
  metadata.model_format = model_format_name(model.source().format);
  metadata.model_sha256 = checkpoint_sha256(model.source());
  metadata.prompts_sha256 = prompts_sha256(prompts);
  metadata.device = describe_device(model.device());
  metadata.dtype = dtype_name(model.dtype());
  const bool packed = model.gemm_path() == GemmPath::Packed && packed_gemm_available(model.linears().front()->weight());
  metadata.gemm = packed ? "packed" : "plain";
  metadata.threads = at::get_num_threads();
  metadata.model_shapes = expected_weight_shapes(model.config());
  const auto model_config = config_to_hf_json(model.config());  // named: items() must not outlive it
  for (const auto& [key, value] : model_config.items())
    metadata.model_config[key] = value.is_string() ? value.get<std::string>() : value.dump();
  metadata.decoding_seed = config.decoding.seed;
  metadata.weights_seed = config.model.seed;
  metadata.prefill = config.decoding.prefill;
  metadata.prefill_chunk = config.decoding.prefill == PrefillMode::Chunked ? config.decoding.prefill_chunk : 0;
  for (size_t i = 0; i < config.quantizers.size(); ++i) {
    metadata.quantizer_names.push_back(config.quantizers[i].name);
    metadata.quantizer_params[config.quantizers[i].name] = engine.quantizers()[i]->resolved_params();
  }
  return metadata;
}

// A live line on a terminal; plain periodic lines otherwise (cluster logs). The ETA extrapolates the
// samples this process has finished (a resumed run's earlier ones took no time here); "--" until one has.
class Progress {
 public:
  Progress(size_t total, size_t done_before)
      : total_(total), done_before_(done_before), terminal_(::isatty(STDERR_FILENO) == 1) {}
  void update(size_t done, int64_t steps) {
    steps_ += steps;
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const size_t done_here = done - done_before_;
    const std::string eta =
        done_here == 0 ? std::string("--")
                       : fmt::format("{:.0f}s", elapsed / static_cast<double>(done_here) *
                                                    static_cast<double>(total_ - done));
    const std::string line = fmt::format("samples {}/{}  {:.1f} steps/s  elapsed {:.0f}s  ETA {}", done, total_,
                                         steps_ / std::max(elapsed, 1e-9), elapsed, eta);
    if (terminal_) {
      std::cerr << "\r" << line << (done == total_ ? "\n" : "") << std::flush;
    } else if (elapsed - last_log_ >= 30.0 || done == total_) {
      spdlog::info("{}", line);
      last_log_ = elapsed;
    }
  }

 private:
  size_t total_, done_before_;
  bool terminal_;
  int64_t steps_ = 0;
  double last_log_ = -1e9;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

// The table `kvdrift run` ends with; intervals, slopes and counts are in the log's /summary
// (docs/hdf5-schema.md).
void print_summary(const std::vector<RunSummaryRow>& rows, const std::string& output_path) {
  std::cout << fmt::format("{:<24} {:>14} {:>25} {:>10}\n", "quantizer", "mean KL (TF)", "first divergence (KM med)",
                           "bits/elem");
  for (const auto& row : rows) {
    const std::string divergence = std::isinf(row.first_divergence_median)
                                       ? std::string("not reached")
                                       : fmt::format("{:.1f}", row.first_divergence_median);
    std::cout << fmt::format("{:<24} {:>14.4e} {:>25} {:>10.3f}\n", row.quantizer, row.mean_kl, divergence,
                             row.bits_per_element);
  }
  std::cout << "output: " << output_path << "\n";
}

void run_main_job(const RunOptions& options) {
  auto overrides = options.overrides;
  if (options.output) {
    if (options.output->empty()) fail("--output must name a file (leave it out to use the config's output.path)");
    overrides.push_back("output.path=" + *options.output);
  }
  const RunConfig config = load_run_config(options.config, overrides);
  // Every file the run reads is an input (a model directory stands for every file in it).
  std::vector<std::string> files_read = {options.config, config.model.path, config.model.tokenizer,
                                         config.prompts.path};
  if (config.prompts.chat_template)
    for (const std::string& file : chat_template_files(config.model.tokenizer, config.model.path))
      files_read.push_back(file);
  check_output_kind("output.path", config.output.path, files_read);
  // One writer per log, from before it is read (to resume) or replaced (--overwrite) to the end: a
  // second run on it stops here and leaves it alone.
  const WriterLock lock(output_lock_path(config.output.path), "output.path " + config.output.path,
                        "wait for that run to end, or name another output");
  const auto inputs = [&] {
    const MemoryScope loading(fmt::format("model.path {} in model.dtype {}", config.model.path, config.model.dtype));
    return load_run_inputs(config);
  }();
  const LlamaModel& model = *inputs.model;
  const auto& prompts = inputs.prompts;
  const Engine engine(model, config, inputs.tokenizer.get());
  const int64_t longest_prompt = longest_prompt_tokens(prompts);
  const int64_t batch = std::min<int64_t>(config.decoding.batch_prompts, static_cast<int64_t>(prompts.size()));
  engine.check_cache_memory(batch, longest_prompt);
  // Past the caches (estimated above), a batch's memory grows with the same settings: the prefill's
  // attention with the longest prompt, logits and metrics with the rows.
  const MemoryScope decoding(fmt::format(
      "decoding.batch_prompts {}, decoding.max_new_tokens {}, the longest prompt's {} tokens, {} quantizers x lanes {}",
      batch, config.decoding.max_new_tokens, longest_prompt, config.quantizers.size(),
      fmt::join(lane_names(config.lanes), ",")));

  auto log =
      RunLog::open(config.output.path, config.resolved_yaml(), describe_run(model, config, engine, prompts),
                   options.overwrite);
  spdlog::info("{}: {} prompts, {} quantizers, lanes {}, on {} in {}", options.config, prompts.size(),
               config.quantizers.size(), fmt::join(lane_names(config.lanes), ","), describe_device(model.device()),
               dtype_name(model.dtype()));
  // The prompts still to run (a resumed run skips the finished ones), decoding.batch_prompts at a time.
  std::vector<int64_t> pending;
  for (size_t i = 0; i < prompts.size(); ++i)
    if (!log.has_sample(static_cast<int64_t>(i))) pending.push_back(static_cast<int64_t>(i));
  size_t done = prompts.size() - pending.size();
  Progress progress(prompts.size(), done);
  progress.update(done, 0);
  for (size_t first = 0; first < pending.size(); first += static_cast<size_t>(config.decoding.batch_prompts)) {
    const size_t count = std::min(pending.size() - first, static_cast<size_t>(config.decoding.batch_prompts));
    const std::vector<int64_t> indices(pending.begin() + first, pending.begin() + first + count);
    std::vector<Prompt> batch;
    for (int64_t i : indices) batch.push_back(prompts[i]);
    // The samples' rows go to the file as they decode (every output.flush_seconds), for live readers.
    auto writer = log.begin_samples(indices, batch);
    int64_t steps_reported = 0;
    auto report = [&](const std::vector<SampleResult>& so_far, size_t samples_done) {
      int64_t steps = 0;
      for (const auto& sample : so_far) steps += static_cast<int64_t>(sample.reference_tokens.size());
      progress.update(samples_done, steps - steps_reported);
      steps_reported = steps;
    };
    const auto results = engine.run(batch, [&](const std::vector<SampleResult>& so_far) {
      writer.append(so_far);
      report(so_far, done);
    });
    writer.finish(results);
    for (int64_t i : indices) spdlog::debug("sample {} written", i);
    done += count;
    report(results, done);
  }
  std::vector<std::string> names;
  for (const auto& q : config.quantizers) names.push_back(q.name);
  print_summary(log.finish(names, summary_settings(config)), config.output.path);
}

}  // namespace

void register_run(CLI::App& app, std::function<void()>& command) {
  auto options = std::make_shared<RunOptions>();
  auto* sub = app.add_subcommand("run", "side-by-side decoding of a YAML config, logged to HDF5");
  sub->add_option("config", options->config, "YAML config")->required();
  sub->add_option("--set", options->overrides, "override a config key: a.b=value (repeatable)");
  sub->add_option("--output", options->output, "output HDF5 file (overrides output.path)");
  sub->add_flag("--overwrite", options->overwrite, "start the output file anew (needed when its config differs)");
  sub->callback([options, &command] { command = [options] { run_main_job(*options); }; });
}

}  // namespace kvdrift::cli
