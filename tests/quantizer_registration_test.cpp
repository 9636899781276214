// Adding a method by the checklist of docs/quantizers.md, shown with a toy: the method below lives in
// this file alone and is registered with register_quantizer_method, and then every part of kvdrift that
// uses quantizers takes it as it takes a built-in one, with no other file touched: make_quantizer and
// its parameter checks, a causal wrapper around it, the storage accounting of `kvdrift bits`, the
// quantized cache (which hands it each block's layer), the engine's lanes and the run log.
#include <gtest/gtest.h>

#include <mutex>
#include <set>

#include "decode/engine.h"
#include "io/hdf5.h"
#include "quant/affine.h"
#include "quant/params.h"
#include "quant/quantizer.h"
#include "quant/storage.h"
#include "run/run_inputs.h"
#include "run/run_log.h"
#include "support.h"

namespace kvdrift {
namespace {

// The (role, layer) pairs the toy was asked to quantize, across every instance.
std::mutex seen_mutex;
std::set<std::pair<Role, int64_t>> seen_layers;

// One bit per element, the sign, and one float16 scale per token, the mean |x|: x_hat = scale * sign(x).
// Every token is quantized at its own step (block 1, lag 1) after `sink` full-precision positions.
class ToySignQuantizer final : public Quantizer {
 public:
  explicit ToySignQuantizer(int64_t sink) : sink_(sink) {}
  std::string method() const override { return "toy-sign"; }
  ParamMap resolved_params() const override { return {{"sink", std::to_string(sink_)}}; }
  RolePolicy policy(Role) const override { return {sink_, 1, 1}; }
  QuantizedTiles quantize(const torch::Tensor& x, Role role, int64_t layer) const override {
    {
      const std::lock_guard<std::mutex> lock(seen_mutex);
      seen_layers.insert({role, layer});
    }
    QuantizedTiles tiles{(x >= 0).to(torch::kUInt8), 1, {}};
    tiles.params["scale"] = {quant::round_to_storage(x.abs().mean(-1), StoredDtype::Float16), StoredDtype::Float16};
    return tiles;
  }
  torch::Tensor dequantize(const QuantizedTiles& tiles, Role, int64_t) const override {
    return (tiles.codes.to(torch::kFloat32) * 2 - 1) * tiles.params.at("scale").values.unsqueeze(-1);
  }

 private:
  int64_t sink_;
};

std::unique_ptr<Quantizer> make_toy_sign(ParamReader& params, int64_t) {
  return std::make_unique<ToySignQuantizer>(params.integer("sink", 0, 0, 1 << 20));
}

void register_toy() {
  static std::once_flag once;
  std::call_once(once, [] { register_quantizer_method("toy-sign", make_toy_sign); });
}

TEST(QuantizerRegistration, AToyMethodIsBuiltByNameWithItsParametersChecked) {
  register_toy();
  const auto methods = quantizer_methods();
  EXPECT_NE(std::find(methods.begin(), methods.end(), "toy-sign"), methods.end());
  const auto toy = make_quantizer("toy-sign", {{"sink", "2"}}, 8);
  const RolePolicy policy = toy->policy(Role::Value);
  EXPECT_EQ((std::vector<int64_t>{policy.sink, policy.block, policy.lag}), (std::vector<int64_t>{2, 1, 1}));
  EXPECT_EQ(toy->resolved_params(), (ParamMap{{"sink", "2"}}));
  EXPECT_EQ(test::error_message([] { make_quantizer("toy-sign", {{"bits", "3"}}, 8); }),
            "quantizer 'toy-sign': unknown parameter 'bits' (its parameters: sink)");
  EXPECT_EQ(test::error_message([] { make_quantizer("toy-sign", {{"sink", "-1"}}, 8); }),
            "quantizer 'toy-sign': parameter sink = -1 is out of range [0, 1048576]");
  EXPECT_THROW(register_quantizer_method("toy-sign", make_toy_sign), InternalError);  // one method per name
}

TEST(QuantizerRegistration, AToyMethodQuantizesAndCountsItsStorageByHand) {
  register_toy();
  const auto toy = make_quantizer("toy-sign", {}, 4);
  const auto x = torch::tensor({1.0f, -3.0f, 2.0f, -2.0f}).reshape({1, 1, 4});
  const QuantizedTiles tiles = toy->quantize(x, Role::Key, 3);
  EXPECT_TRUE(torch::equal(tiles.codes.flatten(), torch::tensor({1, 0, 1, 0}, torch::kUInt8)));
  EXPECT_TRUE(torch::equal(toy->dequantize(tiles, Role::Key, 3).flatten(), torch::tensor({2.0f, -2.0f, 2.0f, -2.0f})));
  EXPECT_EQ(stored_bits_per_element(tiles, 4), (4 * 1 + 16) / 4.0);  // 4 one-bit codes and a float16 scale
  // kvdrift bits: at head_dim 8, 1 + 16/8 bits per quantized element; with a sink of 4 at 10 positions,
  // 6 of them quantized and 4 at 16 bits.
  const StorageCost cost = storage_cost(*make_quantizer("toy-sign", {{"sink", "4"}}, 8), 8, 10);
  EXPECT_EQ(cost.codes, 1.0);
  EXPECT_EQ(cost.parameters, 2.0);
  EXPECT_DOUBLE_EQ(cost.bits_per_element, (6 * 3.0 + 4 * 16.0) / 10);
  // A causal wrapper around it keeps its codes and restores the true token norm.
  const auto wrapped = make_quantizer("toy-sign", {{"wrap", "true_scale"}}, 4);
  const auto restored = wrapped->dequantize(wrapped->quantize(x, Role::Key, 0), Role::Key, 0);
  EXPECT_NEAR(restored.norm().item<double>(), x.norm().item<double>(), 1e-5);
}

TEST(QuantizerRegistration, AToyMethodRunsInTheEngineOnEveryLayerAndIsLogged) {
  register_toy();
  const std::string config_path = test::write_stories260k_config(
      test::scratch_dir(), "  - {name: toy, method: toy-sign}", 8, "[\"Once upon a time\"]");
  const RunConfig config = load_run_config(config_path, {});
  const RunInputs inputs = load_run_inputs(config);
  {
    const std::lock_guard<std::mutex> lock(seen_mutex);
    seen_layers.clear();
  }
  const SampleResult result = Engine(*inputs.model, config, inputs.tokenizer.get()).run(inputs.prompts[0]);

  std::set<std::pair<Role, int64_t>> every_layer;
  for (int64_t layer = 0; layer < inputs.model->config().n_layers; ++layer)
    for (Role role : {Role::Key, Role::Value}) every_layer.insert({role, layer});
  EXPECT_EQ(seen_layers, every_layer);
  ASSERT_EQ(result.lanes.size(), 3u);
  for (const LaneResult& lane : result.lanes) {
    EXPECT_EQ(lane.quantizer, "toy");
    EXPECT_EQ(lane.scalars.at("bits_per_element"), 1 + 16.0 / 8);  // every position quantized, head_dim 8
    EXPECT_EQ(lane.scalars.at("fraction_quantized"), 1.0);
  }
  EXPECT_GT(result.lanes[1].arrays.at("kl").values.back(), 1e-4);  // one bit per element drifts

  RunMetadata metadata;
  metadata.quantizer_names = {"toy"};
  RunLog log = RunLog::open(config.output.path, config.resolved_yaml(), metadata, false);
  log.write_sample(0, result);
  log.finish({"toy"});
  const h5::File file = h5::File::open_read(config.output.path);
  EXPECT_EQ(file.shape("samples/0/toy/teacher_forced/kl"), std::vector<hsize_t>{8});
  EXPECT_EQ(file.open_group("summary/toy").attribute<double>("bits_per_element_mean"), 3.0);
}

}  // namespace
}  // namespace kvdrift
