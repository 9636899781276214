// Properties every quantizer must have, the cache policies of SPEC §2, packed storage, and bad input.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "cache/quantized_kv_cache.h"
#include "core/error.h"
#include "metrics/token_scale.h"
#include "quant/affine.h"
#include "quant/hadamard.h"
#include "quant/quantizer.h"
#include "quant/storage.h"
#include "support.h"

namespace kvdrift {
namespace {

struct MethodCase {
  std::string method;
  ParamMap params;
};

// Every method at every bit width it allows, sized for head_dim 64 and blocks of at most 64 tokens.
std::vector<MethodCase> all_cases() {
  std::vector<MethodCase> cases = {{"none", {}}};
  for (int bits : {2, 3, 4, 8}) {
    const ParamMap kv = {{"k_bits", std::to_string(bits)}, {"v_bits", std::to_string(bits)}};
    auto with = [&](ParamMap extra) {
      extra.insert(kv.begin(), kv.end());
      return extra;
    };
    cases.push_back({"rtn", with({{"axis", "per_token"}, {"group_size", "32"}})});
    cases.push_back({"rtn", with({{"axis", "per_channel"}, {"group_size", "16"}})});
    cases.push_back({"kivi", with({{"group_size", "16"}, {"residual_length", "32"}})});
    cases.push_back({"quarot", with({})});
    cases.push_back({"kvarn", with({{"tile_size", "64"}})});
    cases.push_back({"turboquant", with({})});
    cases.push_back({"turboquant", with({{"variant", "prod"}})});
  }
  for (const char* type : {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "mxfp4", "nvfp4"})
    cases.push_back({"ggml", {{"type", type}}});
  cases.push_back({"ggml", {{"type", "q4_0"}, {"rotate", "true"}}});
  cases.push_back({"qjl", {}});
  cases.push_back({"qjl", {{"m", "128"}, {"value_method", "kivi"}, {"value.v_bits", "2"}}});
  return cases;
}

// Methods whose error on a constant vector is their ordinary error, not near zero: mxfp4 and nvfp4
// saturate at 12 times their scale (a constant 3.5 comes back as 3 or 3.375), TurboQuant's codebook and
// QJL's sketch treat a constant vector like any other direction.
bool approximates_constants(const MethodCase& c) {
  if (c.method == "turboquant" || c.method == "qjl") return true;
  return c.method == "ggml" && (c.params.at("type") == "mxfp4" || c.params.at("type") == "nvfp4");
}

std::string describe(const MethodCase& c) {
  std::string text = c.method;
  for (const auto& [k, v] : c.params) text += " " + k + "=" + v;
  return text;
}

torch::Tensor random_tiles(int64_t n, int64_t tokens, int64_t dim, uint64_t seed) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto x = torch::randn({n, tokens, dim}, generator, torch::kFloat32);
  x.select(2, 3).mul_(20.0);  // an outlier channel
  x.select(1, 1).mul_(8.0);   // an outlier token
  return x;
}

int64_t tile_tokens(const Quantizer& q, Role role) {
  const int64_t block = q.policy(role).block;
  return block == 1 ? 64 : block;
}

TEST(Hadamard, FastTransformIsTheOrthonormalSylvesterMatrix) {
  for (int64_t d : {2, 8, 64, 128}) {
    auto rotated = quant::hadamard_rotate(torch::eye(d));  // rows of I times H: H itself
    auto dense = torch::empty({d, d});
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j)
        dense[i][j] = (__builtin_popcountll(i & j) % 2 ? -1.0 : 1.0) / std::sqrt(double(d));
    EXPECT_LE((rotated - dense).abs().max().item<double>(), 1e-6) << "d=" << d;
    EXPECT_LE((torch::matmul(rotated, rotated) - torch::eye(d)).abs().max().item<double>(), 1e-5) << "H.H = I, d=" << d;
  }
  for (int64_t d : {64, 96, 80, 112, 72, 160, 104, 120}) {
    auto x = random_tiles(3, 5, d, d);
    auto y = quant::hadamard_rotate(x);
    EXPECT_LE((y.norm(2, -1) / x.norm(2, -1) - 1).abs().max().item<double>(), 1e-5) << "norm preserved, d=" << d;
    EXPECT_LE((quant::hadamard_unrotate(y) - x).abs().max().item<double>(), 1e-4) << "inverse, d=" << d;
  }
  EXPECT_FALSE(quant::has_hadamard(44));
  EXPECT_THROW(quant::hadamard_rotate(torch::ones({2, 44})), Error);
}

TEST(Quantizers, CodesStayInRangeAndConstantTilesStayFinite) {
  for (const auto& c : all_cases()) {
    const auto q = make_quantizer(c.method, c.params, 64);
    for (Role role : {Role::Key, Role::Value}) {
      const int64_t tokens = tile_tokens(*q, role);
      auto stored = q->quantize(random_tiles(4, tokens, 64, 1), role, 0);
      if (c.method != "none") EXPECT_LE(stored.codes.max().item<int64_t>(), (1 << stored.bits) - 1) << describe(c);
      for (double constant : {0.0, 3.5}) {
        auto flat = torch::full({2, tokens, 64}, constant);
        auto restored = q->dequantize(q->quantize(flat, role, 0), role, 0);
        EXPECT_TRUE(restored.isfinite().all().item<bool>())
            << describe(c) << " " << role_name(role) << " constant " << constant;
        if (!approximates_constants(c) || constant == 0.0)
          EXPECT_LE((restored - flat).abs().max().item<double>(), 0.05 * std::max(1.0, constant)) << describe(c);
      }
    }
  }
}

TEST(Quantizers, TokenScaleErrorIdentityHolds) {
  for (const auto& c : all_cases()) {
    const auto q = make_quantizer(c.method, c.params, 64);
    for (Role role : {Role::Key, Role::Value}) {
      auto x = random_tiles(4, tile_tokens(*q, role), 64, 2);
      auto error = metrics::token_scale_error(x, q->dequantize(q->quantize(x, role, 0), role, 0));
      // 1e-6 relative to E_T, plus float64 rounding of |x|^2-sized terms where E_T is 0 (none).
      auto gap = (error.magnitude + error.direction - error.total).abs();
      auto allowed = 1e-6 * error.total + 1e-12 * x.to(torch::kFloat64).pow(2).sum(-1);
      EXPECT_TRUE((gap <= allowed).all().item<bool>()) << describe(c);
      EXPECT_GE(error.direction.min().item<double>(), -1e-9) << describe(c);
    }
  }
}

TEST(Quantizers, KVarNK4V2StoresExactly3375BitsPerElement) {
  const auto q = make_quantizer("kvarn", {{"preset", "k4v2"}}, 128);
  auto x = random_tiles(4, 128, 128, 3);
  const double key_bits = stored_bits_per_element(q->quantize(x, Role::Key, 0), x.numel());
  const double value_bits = stored_bits_per_element(q->quantize(x, Role::Value, 0), x.numel());
  EXPECT_DOUBLE_EQ(key_bits, 4.375);
  EXPECT_DOUBLE_EQ(value_bits, 2.375);
  EXPECT_DOUBLE_EQ((key_bits + value_bits) / 2, 3.375);
}

// Feeds a cache a prefill of n positions, then one decode step, with random keys/values.
QuantizedKVCache prefill_then_step(std::shared_ptr<const Quantizer> q, int64_t n, StorageMode mode,
                                   int64_t head_dim = 64, int64_t extra_steps = 1) {
  QuantizedKVCache cache(q, 2, 1, 2, n + extra_steps, head_dim, torch::kFloat32, torch::kCPU, mode);
  auto generator = at::make_generator<at::CPUGeneratorImpl>(n);
  auto k = torch::randn({1, 2, n + extra_steps, head_dim}, generator, torch::kFloat32);
  auto v = torch::randn({1, 2, n + extra_steps, head_dim}, generator, torch::kFloat32);
  for (int64_t layer = 0; layer < 2; ++layer) cache.update(layer, 0, k.narrow(2, 0, n), v.narrow(2, 0, n));
  for (int64_t t = n; t < n + extra_steps; ++t)
    for (int64_t layer = 0; layer < 2; ++layer) cache.update(layer, t, k.narrow(2, t, 1), v.narrow(2, t, 1));
  return cache;
}

// `kvdrift bits` predicts from the policy alone what the cache holds after decoding: the same bits
// per element as the cache's own accounting, for every method and region layout.
TEST(Storage, MatchesTheCachesOwnAccountingAfterDecoding) {
  const std::vector<std::pair<std::string, ParamMap>> methods = {
      {"none", {}},
      {"kivi", {}},
      {"kivi", {{"preset", "kvarn-paper"}}},
      {"kivi", {{"sink_tokens", "4"}, {"residual_length", "32"}}},
      {"quarot", {{"k_bits", "2"}, {"v_bits", "2"}}},
      {"kvarn", {{"preset", "k2v2"}, {"tile_size", "16"}}},
      {"kvarn", {{"scale_dtype", "float8_e4m3"}, {"tile_size", "32"}, {"sink", "false"}}},
      {"rtn", {{"axis", "per_channel"}, {"group_size", "16"}, {"residual_length", "32"}, {"sink", "16"}}},
      {"ggml", {{"type", "q5_1"}}},
      {"ggml", {{"type", "mxfp4"}}},
      {"ggml", {{"type", "nvfp4"}}},
      {"turboquant", {{"k_bits", "3"}, {"v_bits", "2"}}},
      {"turboquant", {{"variant", "prod"}}},
  };
  for (const auto& [method, params] : methods) {
    std::shared_ptr<const Quantizer> q = make_quantizer(method, params, 64);
    for (const auto& [prefill, steps] : {std::pair<int64_t, int64_t>{40, 60}, {200, 101}, {1, 1}}) {
      SCOPED_TRACE(fmt::format("{} ({} params) prefill {} steps {}", method, params.size(), prefill, steps));
      const auto cache = prefill_then_step(q, prefill, StorageMode::Simulated, 64, steps);
      const StorageCost cost = storage_cost(*q, 64, prefill + steps);
      EXPECT_NEAR(cost.bits_per_element, cache.bits_per_element(0), 1e-12);
      EXPECT_NEAR(cost.quantized_fraction, cache.fraction_quantized(0), 1e-12);
    }
  }
}

TEST(Storage, HandComputedCosts) {
  // KVarN k2v2, D = G = 128: codes 2, parameters 0.375 (kS, kZ per channel and kT per token, fp16).
  // At 1024 positions the last decode step (position 1023) reads [128, 896) quantized: 768 positions
  // at 2.375 bits and 256 at 16, (768 * 2.375 + 256 * 16) / 1024 = 5.78125, for keys and values alike.
  auto kvarn = make_quantizer("kvarn", {{"preset", "k2v2"}}, 128);
  EXPECT_DOUBLE_EQ(storage_cost(*kvarn, 128, 1024).bits_per_element, 5.78125);
  EXPECT_DOUBLE_EQ(storage_cost(*kvarn, 128, 1).codes, 2.0);
  EXPECT_DOUBLE_EQ(storage_cost(*kvarn, 128, 1).parameters, 0.375);
  EXPECT_DOUBLE_EQ(storage_cost(*kvarn, 128, 1).bits_per_element, 16.0);
  // KIVI as the KVarN paper ran it, D = 128: 2.25 bits quantized (scale and minimum in fp16 per
  // 128-element group). Keys at 1024: [128, 896) quantized -> (768 * 2.25 + 256 * 16) / 1024 = 5.6875;
  // values: a window of 128 behind position 1023 -> [128, 895): (767 * 2.25 + 257 * 16) / 1024.
  auto kivi = make_quantizer("kivi", {{"preset", "kvarn-paper"}}, 128);
  EXPECT_DOUBLE_EQ(storage_cost(*kivi, 128, 1).parameters, 0.25);
  EXPECT_DOUBLE_EQ(storage_cost(*kivi, 128, 1024).bits_per_element, (5.6875 + (767 * 2.25 + 257 * 16) / 1024.0) / 2);
  EXPECT_EQ(test::error_message([&] { storage_cost(*kivi, 128, 0); }), "a sequence length must be at least 1, got 0");
  // none never quantizes, at any length: 16 bits per element past 2^31 positions as below (its "never
  // due" lag was once INT32_MIN, and positions beyond 2^31 came out quantized at 32 bits).
  auto none = make_quantizer("none", {}, 128);
  for (int64_t length : {int64_t{1}, int64_t{1} << 31, (int64_t{1} << 31) + 5, int64_t{1} << 53}) {
    EXPECT_DOUBLE_EQ(storage_cost(*none, 128, length).bits_per_element, 16.0) << length;
    EXPECT_DOUBLE_EQ(storage_cost(*none, 128, length).quantized_fraction, 0.0) << length;
  }
  // KIVI at 2^53 positions: all but the last 128 keys and 129 values quantized, as at 1024.
  const double n = std::ldexp(1.0, 53);
  EXPECT_DOUBLE_EQ(storage_cost(*kivi, 128, int64_t{1} << 53).bits_per_element,
                   (((n - 256) * 2.25 + 256 * 16) + ((n - 257) * 2.25 + 257 * 16)) / (2 * n));
}

// Positions read quantized are exactly those that differ from what was written (random data never
// quantizes exactly), so the counts are checked on the data, not just on the bookkeeping.
int64_t positions_read_quantized(const QuantizedKVCache& cache, Role role) {
  auto differs = cache.read(role, 1).ne(cache.written(role, 1)).any(-1).any(1)[0];  // [length]
  return differs.sum().item<int64_t>();
}

TEST(QuantizedCache, KiviResidualCountsFollowTheSpec) {
  const int64_t R = 32;
  auto kivi = std::shared_ptr<const Quantizer>(
      make_quantizer("kivi", {{"group_size", "16"}, {"residual_length", std::to_string(R)}}, 64));
  for (int64_t n : {int64_t{1}, R - 1, R, R + 1, 3 * R + 5}) {
    auto cache = prefill_then_step(kivi, n, StorageMode::Simulated);
    // At the first decode step: keys quantize the first n - (n mod R) prompt tokens; values keep the
    // last min(n, R) prompt tokens (and the new one) in full precision.
    EXPECT_EQ(cache.quantized_positions(Role::Key, 1), n - n % R) << "n=" << n;
    EXPECT_EQ(cache.quantized_positions(Role::Value, 1), n - std::min(n, R)) << "n=" << n;
    EXPECT_EQ(positions_read_quantized(cache, Role::Key), n - n % R) << "n=" << n;
    EXPECT_EQ(positions_read_quantized(cache, Role::Value), n - std::min(n, R)) << "n=" << n;
  }
}

TEST(QuantizedCache, KVarNKeepsTheSinkAndTheTailInFullPrecision) {
  const int64_t G = 16;
  auto kvarn = std::shared_ptr<const Quantizer>(make_quantizer("kvarn", {{"tile_size", std::to_string(G)}}, 64));
  auto no_sink = std::shared_ptr<const Quantizer>(
      make_quantizer("kvarn", {{"tile_size", std::to_string(G)}, {"sink", "false"}}, 64));
  for (int64_t n : {int64_t{5}, G, 2 * G - 1, 2 * G, 5 * G + 3}) {
    auto cache = prefill_then_step(kvarn, n, StorageMode::Simulated);
    const int64_t complete = n / G * G;  // complete prompt blocks, quantized at the first decode step
    EXPECT_EQ(positions_read_quantized(cache, Role::Key), std::max<int64_t>(0, complete - G)) << "n=" << n;
    EXPECT_EQ(positions_read_quantized(cache, Role::Value), std::max<int64_t>(0, complete - G)) << "n=" << n;
    auto without_sink = prefill_then_step(no_sink, n, StorageMode::Simulated);
    EXPECT_EQ(positions_read_quantized(without_sink, Role::Key), complete) << "n=" << n;
  }
  // Decode steps one at a time: block j is read quantized from the step whose token starts block j+1.
  auto cache = prefill_then_step(kvarn, 3, StorageMode::Simulated, 64, 3 * G);
  EXPECT_EQ(cache.length(), 3 + 3 * G);
  // Steps reached position 3G + 2: blocks 1 and 2 ([G, 3G)) are quantized, block 3 is the tail.
  EXPECT_EQ(positions_read_quantized(cache, Role::Key), 2 * G);
  EXPECT_EQ(cache.quantized_positions(Role::Value, 0), 2 * G);
}

TEST(QuantizedCache, QuaRotQuantizesEveryTokenItsOwnStepIncluded) {
  auto quarot = std::shared_ptr<const Quantizer>(make_quantizer("quarot", {}, 64));
  auto cache = prefill_then_step(quarot, 10, StorageMode::Simulated, 64, 2);
  EXPECT_EQ(positions_read_quantized(cache, Role::Key), 12);
  EXPECT_EQ(positions_read_quantized(cache, Role::Value), 12);
  EXPECT_DOUBLE_EQ(cache.fraction_quantized(), 1.0);
}

TEST(QuantizedCache, NoneReadsExactlyWhatWasWritten) {
  auto none = std::shared_ptr<const Quantizer>(make_quantizer("none", {}, 64));
  auto cache = prefill_then_step(none, 20, StorageMode::Simulated, 64, 5);
  EXPECT_TRUE(cache.read(Role::Key, 0).equal(cache.written(Role::Key, 0)));
  EXPECT_TRUE(cache.read(Role::Value, 1).equal(cache.written(Role::Value, 1)));
  EXPECT_DOUBLE_EQ(cache.bits_per_element(), 16.0);
}

TEST(QuantizedCache, PackedModeDequantizesBitIdenticallyToSimulation) {
  for (const auto& c : all_cases()) {
    auto q = std::shared_ptr<const Quantizer>(make_quantizer(c.method, c.params, 64));
    auto simulated = prefill_then_step(q, 70, StorageMode::Simulated, 64, 70);
    auto packed = prefill_then_step(q, 70, StorageMode::Packed, 64, 70);
    for (Role role : {Role::Key, Role::Value}) {
      EXPECT_TRUE(simulated.read(role, 1).equal(packed.read(role, 1))) << describe(c) << " " << role_name(role);
      if (c.method != "none") EXPECT_GT(positions_read_quantized(packed, role), 0) << describe(c);
    }
    EXPECT_DOUBLE_EQ(simulated.bits_per_element(), packed.bits_per_element());
  }
}

// The oracle of the multi-row cache tests: a single-row cache with `row`'s quantizer fed that row's
// keys/values (k, v [rows, heads, capacity, head_dim]): a prefill of `prompt` positions, then one
// decode step per position up to `end`. `cache`'s row must hold and read exactly the same, at the
// same cost.
void expect_row_as_alone(const QuantizedKVCache& cache, int64_t row, std::shared_ptr<const Quantizer> quantizer,
                         int64_t layers, const torch::Tensor& k, const torch::Tensor& v, int64_t prompt, int64_t end) {
  SCOPED_TRACE("row " + std::to_string(row));
  QuantizedKVCache alone(std::move(quantizer), layers, 1, k.size(1), k.size(2), k.size(3), torch::kFloat32,
                         torch::kCPU);
  for (int64_t layer = 0; layer < layers; ++layer)
    alone.update(layer, 0, k.narrow(0, row, 1).narrow(2, 0, prompt), v.narrow(0, row, 1).narrow(2, 0, prompt));
  for (int64_t t = prompt; t < end; ++t)
    for (int64_t layer = 0; layer < layers; ++layer)
      alone.update(layer, t, k.narrow(0, row, 1).narrow(2, t, 1), v.narrow(0, row, 1).narrow(2, t, 1));
  EXPECT_EQ(cache.row_length(row), end);
  for (Role role : {Role::Key, Role::Value}) {
    for (bool read : {false, true}) {
      EXPECT_TRUE(cache.row_contents(role, row, read).equal(alone.row_contents(role, 0, read)))
          << role_name(role) << (read ? " read" : " written");
    }
    for (int64_t layer = 0; layer < layers; ++layer)
      EXPECT_EQ(cache.quantized_positions(role, layer, row), alone.quantized_positions(role, layer, 0));
  }
  EXPECT_DOUBLE_EQ(cache.bits_per_element(row), alone.bits_per_element(0));
  EXPECT_DOUBLE_EQ(cache.fraction_quantized(row), alone.fraction_quantized(0));
}

// Rows retired mid-decode leave the batch: the others go on exactly as if they had been alone, and a
// retired row keeps what it held and cost when it ended. Oracle: one single-row cache per row, fed
// that row's data up to its end. KIVI and RTN (no rotation), so every comparison is bitwise.
TEST(QuantizedCache, RetiredRowsLeaveTheBatchAndKeepWhatTheyHeld) {
  const int64_t n = 20, steps = 40, layers = 2, heads = 2, head_dim = 64;
  std::vector<std::shared_ptr<const Quantizer>> quantizers = {
      make_quantizer("none", {}, head_dim),
      make_quantizer("kivi", {{"group_size", "16"}, {"residual_length", "16"}}, head_dim), nullptr,
      make_quantizer("rtn", {{"axis", "per_token"}, {"group_size", "32"}, {"k_bits", "2"}, {"v_bits", "2"}}, head_dim)};
  quantizers[2] = quantizers[1];  // rows 1 and 2 share one quantizer: one group
  const int64_t rows = 4;
  const std::map<int64_t, int64_t> retire_at = {{2, n + 10}, {0, n + 25}};  // row -> first position it skips
  auto generator = at::make_generator<at::CPUGeneratorImpl>(7);
  const auto k = torch::randn({rows, heads, n + steps, head_dim}, generator, torch::kFloat32);
  const auto v = torch::randn({rows, heads, n + steps, head_dim}, generator, torch::kFloat32);

  QuantizedKVCache cache(quantizers, layers, heads, n + steps, head_dim, torch::kFloat32, torch::kCPU);
  for (int64_t layer = 0; layer < layers; ++layer) cache.update(layer, 0, k.narrow(2, 0, n), v.narrow(2, 0, n));
  std::vector<int64_t> active = {0, 1, 2, 3};
  for (int64_t t = n; t < n + steps; ++t) {
    for (const auto& [row, position] : retire_at) {
      if (position != t) continue;
      cache.retire(row);
      active.erase(std::find(active.begin(), active.end(), row));
    }
    const auto index = torch::tensor(active, torch::kInt64);
    for (int64_t layer = 0; layer < layers; ++layer) {
      auto [keys, values] =
          cache.update(layer, t, k.index_select(0, index).narrow(2, t, 1), v.index_select(0, index).narrow(2, t, 1));
      EXPECT_EQ(keys.sizes(), (c10::IntArrayRef{static_cast<int64_t>(active.size()), heads, t + 1, head_dim}));
    }
  }
  EXPECT_EQ(cache.active_rows(), 2);
  EXPECT_EQ(cache.slot(0), -1);
  EXPECT_EQ(cache.slot(1), 0);
  EXPECT_EQ(cache.slot(2), -1);
  EXPECT_EQ(cache.slot(3), 1);

  for (int64_t row = 0; row < rows; ++row)
    expect_row_as_alone(cache, row, quantizers[row], layers, k, v, n,
                        retire_at.count(row) ? retire_at.at(row) : n + steps);
  EXPECT_GT(cache.fraction_quantized(2), 0.0);  // the retired KIVI row had quantized blocks

  EXPECT_EQ(test::error_message([&] { cache.retire(2); }), "KV cache row 2 is already retired");
  EXPECT_EQ(test::error_message([&] { cache.written(Role::Key, 0); }), "KV cache rows were retired; read them by row");
  const auto three_rows = torch::zeros({3, heads, 1, head_dim});
  EXPECT_EQ(test::error_message([&] { cache.update(0, n + steps - 1, three_rows, three_rows); }),
            "KV cache update of 3 rows; the cache has 2 active rows");
}

// Rows that follow row 0 (the engine's lanes before their first quantized read: they are fed row 0's
// keys and values) stay out of the batch until a step would quantize some of their positions, then
// join as a copy of row 0 and go on exactly as if they had been in the batch from the start. Oracle:
// a single-row cache per row fed row 0's data from position 0. KIVI with a 16-token sink first
// quantizes keys at position 32, RTN per token at its first decode step (20).
TEST(QuantizedCache, JoinedRowsGoOnAsIfTheyHadBeenInTheBatch) {
  const int64_t n = 20, steps = 30, layers = 2, heads = 2, head_dim = 64, rows = 4;
  std::vector<std::shared_ptr<const Quantizer>> quantizers = {
      make_quantizer("none", {}, head_dim),
      make_quantizer("kivi", {{"group_size", "16"}, {"residual_length", "16"}, {"sink_tokens", "16"}}, head_dim),
      nullptr,
      make_quantizer("rtn", {{"axis", "per_token"}, {"group_size", "32"}, {"k_bits", "2"}, {"v_bits", "2"}}, head_dim)};
  quantizers[2] = quantizers[1];
  auto generator = at::make_generator<at::CPUGeneratorImpl>(5);
  const auto k = torch::randn({1, heads, n + steps, head_dim}, generator, torch::kFloat32).expand({rows, -1, -1, -1});
  const auto v = torch::randn({1, heads, n + steps, head_dim}, generator, torch::kFloat32).expand({rows, -1, -1, -1});

  QuantizedKVCache cache(quantizers, layers, heads, n + steps, head_dim, torch::kFloat32, torch::kCPU);
  for (int64_t row = 1; row < rows; ++row) {
    EXPECT_FALSE(cache.would_flush(row, 0, n, Phase::Prefill));  // a full prefill reads itself unquantized
    cache.retire(row);
  }
  for (int64_t layer = 0; layer < layers; ++layer)
    cache.update(layer, 0, k.narrow(0, 0, 1).narrow(2, 0, n), v.narrow(0, 0, 1).narrow(2, 0, n));
  std::map<int64_t, int64_t> joined_at;  // row -> position
  for (int64_t t = n; t < n + steps; ++t) {
    std::vector<int64_t> joining;
    for (int64_t row = 1; row < rows; ++row)
      if (cache.slot(row) < 0 && cache.would_flush(row, t, 1, Phase::Decode)) joining.push_back(row);
    if (!joining.empty()) cache.join(joining, std::vector<int64_t>(joining.size(), 0));
    for (int64_t row : joining) joined_at[row] = t;
    const int64_t active = cache.active_rows();
    for (int64_t layer = 0; layer < layers; ++layer)
      cache.update(layer, t, k.narrow(0, 0, active).narrow(2, t, 1), v.narrow(0, 0, active).narrow(2, t, 1));
  }
  EXPECT_EQ(joined_at, (std::map<int64_t, int64_t>{{1, 32}, {2, 32}, {3, 20}}));
  EXPECT_EQ(cache.slot(1), 1);
  EXPECT_EQ(cache.slot(3), 3);
  for (int64_t row = 0; row < rows; ++row) expect_row_as_alone(cache, row, quantizers[row], layers, k, v, n, n + steps);
  EXPECT_GT(cache.fraction_quantized(1), 0.0);
  EXPECT_FALSE(cache.would_flush(0, n + steps, 1, Phase::Decode));  // `none` never quantizes

  EXPECT_EQ(test::error_message([&] { cache.join({1}, {0}); }),
            "KV cache row 1 cannot join as a copy of row 0: it must be retired, hold no position and mirror none");
  EXPECT_EQ(test::error_message([&] { cache.join({1, 2}, {0}); }), "KV cache join: 2 rows but 1 sources");
}

// Prompts of different lengths in one batch: each row at its own positions (a padded prefill, then
// decode steps at per-row positions, one row retired on the way) holds and reads exactly what a
// single-row cache fed only its real positions holds. The prefill's padding is garbage that a
// correct cache never quantizes nor returns for a row's own positions.
TEST(QuantizedCache, RowsAtDifferentPositionsMatchRowsAlone) {
  const int64_t steps = 40, layers = 2, heads = 2, head_dim = 64;
  const std::vector<int64_t> prompt = {7, 20, 13, 20, 9, 18};  // per row
  const int64_t rows = 6, longest = 20, capacity = longest + steps;
  std::vector<std::shared_ptr<const Quantizer>> quantizers = {
      make_quantizer("none", {}, head_dim),
      make_quantizer("kivi", {{"group_size", "16"}, {"residual_length", "16"}}, head_dim),
      nullptr,
      make_quantizer("rtn", {{"axis", "per_token"}, {"group_size", "32"}, {"k_bits", "2"}, {"v_bits", "2"}}, head_dim),
      make_quantizer("kvarn", {{"preset", "k2v2"}, {"tile_size", "8"}, {"rotate", "false"}}, head_dim),
      nullptr};
  quantizers[2] = quantizers[1];                      // rows 1 and 2 share one quantizer at different positions
  quantizers[5] = quantizers[4];                      // so do rows 4 and 5
  const int64_t retired_row = 1, retired_after = 25;  // steps row 1 decodes before it leaves
  auto generator = at::make_generator<at::CPUGeneratorImpl>(11);
  const auto k = torch::randn({rows, heads, capacity, head_dim}, generator, torch::kFloat32);
  const auto v = torch::randn({rows, heads, capacity, head_dim}, generator, torch::kFloat32);
  auto padded = [&](const torch::Tensor& x) {
    auto prefill = x.narrow(2, 0, longest).clone();
    for (int64_t r = 0; r < rows; ++r) prefill[r].narrow(1, prompt[r], longest - prompt[r]).fill_(1000.0);
    return prefill;
  };

  QuantizedKVCache cache(quantizers, layers, heads, capacity, head_dim, torch::kFloat32, torch::kCPU);
  const RowSpans prefill(std::vector<int64_t>(rows, 0), prompt, longest, torch::kCPU, Phase::Prefill);
  for (int64_t layer = 0; layer < layers; ++layer) cache.update(layer, prefill, padded(k), padded(v));
  for (int64_t r = 0; r < rows; ++r) EXPECT_EQ(cache.row_length(r), prompt[r]);
  EXPECT_EQ(test::error_message([&] { cache.written(Role::Key, 0); }),
            "KV cache rows hold different lengths; read them by row");
  std::vector<int64_t> active = {0, 1, 2, 3, 4, 5};
  for (int64_t t = 0; t < steps; ++t) {
    if (t == retired_after) {
      cache.retire(retired_row);
      active.erase(std::find(active.begin(), active.end(), retired_row));
    }
    std::vector<int64_t> starts;
    std::vector<torch::Tensor> step_k, step_v;
    for (int64_t r : active) {
      starts.push_back(prompt[r] + t);
      step_k.push_back(k[r].narrow(1, prompt[r] + t, 1));
      step_v.push_back(v[r].narrow(1, prompt[r] + t, 1));
    }
    const RowSpans spans(starts, std::vector<int64_t>(starts.size(), 1), 1, torch::kCPU, Phase::Decode);
    for (int64_t layer = 0; layer < layers; ++layer) {
      auto [keys, values] = cache.update(layer, spans, torch::stack(step_k), torch::stack(step_v));
      EXPECT_EQ(keys.size(2), *std::max_element(starts.begin(), starts.end()) + 1);
    }
  }

  for (int64_t row = 0; row < rows; ++row)
    expect_row_as_alone(cache, row, quantizers[row], layers, k, v, prompt[row],
                        prompt[row] + (row == retired_row ? retired_after : steps));
  // Rows 1 and 2 share a quantizer but were quantized at different steps.
  EXPECT_NE(cache.quantized_positions(Role::Key, 0, 1), cache.quantized_positions(Role::Key, 0, 2));
  EXPECT_GT(cache.fraction_quantized(3), 0.0);
}

TEST(Packing, FollowsTheSpecLayout) {
  auto codes = torch::tensor({1, 2, 3, 0, 3}, torch::kUInt8).unsqueeze(0);
  // 2 bits: element c -> byte c / 4, shift (c % 4) * 2.
  auto packed = quant::pack_codes(codes, 2);
  ASSERT_EQ(packed.size(1), 2);
  EXPECT_EQ(packed[0][0].item<int>(), 1 | (2 << 2) | (3 << 4) | (0 << 6));
  EXPECT_EQ(packed[0][1].item<int>(), 3);
  EXPECT_TRUE(quant::unpack_codes(packed, 2, 5).equal(codes));
  auto three = torch::tensor({7, 5, 1}, torch::kUInt8).unsqueeze(0);  // 3 bits: 2 per byte
  auto packed3 = quant::pack_codes(three, 3);
  EXPECT_EQ(packed3[0][0].item<int>(), 7 | (5 << 3));
  EXPECT_TRUE(quant::unpack_codes(packed3, 3, 3).equal(three));
}

TEST(ScaleStorage, Float8E4M3RoundsToRepresentableValues) {
  auto x = torch::tensor({0.3, 500.0, -500.0, 0.001953125, 1.0625, 1.1875, 0.0, 17.0});
  auto r = quant::round_to_storage(x, StoredDtype::Float8E4M3);
  // 0.3 -> spacing 2^-5 in [0.25, 0.5): 0.3125; 500 saturates to 448; 2^-9 is the smallest subnormal;
  // 1.0625 is halfway between 1.0 and 1.125: ties to even (1.0); 1.1875 ties to 1.25; 17 -> spacing 2: 16.
  const std::vector<float> expected = {0.3125f, 448.f, -448.f, 0.001953125f, 1.0f, 1.25f, 0.f, 16.f};
  for (size_t i = 0; i < expected.size(); ++i) EXPECT_EQ(r[i].item<float>(), expected[i]) << i;
}

// A stored parameter the dtype cannot hold is counted: float16 overflows above 65504 (to inf), float8
// e4m3 saturates above 448, and nonzero values below half the smallest subnormal round to 0.
TEST(ScaleStorage, CountsSaturatedAndFlushedParameters) {
  const auto x = torch::tensor({1e5f, -70000.0f, 500.0f, 65504.0f, 1e-9f, 0.0f, 3.0f});
  const auto half = quant::stored_param(x, StoredDtype::Float16);
  EXPECT_EQ(half.saturated, 2);        // 1e5 and -70000 (65504 is the largest finite float16 itself)
  EXPECT_EQ(half.flushed_to_zero, 1);  // 1e-9 < 2^-25
  EXPECT_TRUE(std::isinf(half.values[0].item<float>()));
  const auto e4m3 = quant::stored_param(x, StoredDtype::Float8E4M3);
  EXPECT_EQ(e4m3.saturated, 4);        // every magnitude above 448
  EXPECT_EQ(e4m3.flushed_to_zero, 1);
  EXPECT_EQ(e4m3.values[2].item<float>(), 448.0f);
  const auto full = quant::stored_param(x, StoredDtype::Float32);
  EXPECT_EQ(full.saturated + full.flushed_to_zero, 0);
}

// Worst rows ranked like for like, by hand: layer 0 holds rows with relative errors E_T/|x|^2 of
// 0.5, 0.1, 0.2 (|x|^2 = 100, 1, 4) and a full-precision row that is left out; 5% of 3 rows is the
// worst one (E_M/|x|^2 = 0.3 of 0.5: share 0.6). Layer 1 has one row, relative 0.04 with E_M 0.01:
// share 0.25. Pooled: (0.3 + 0.01) / (0.5 + 0.04). A layer with no selected row is NaN.
TEST(Metrics, WorstRowsRelativeShareComparesLikeWithLike) {
  metrics::TokenScaleError error;
  auto d = torch::TensorOptions().dtype(torch::kFloat64);
  error.norm = torch::tensor({10.0, 1.0, 2.0, 3.0, 5.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0}, d).reshape({3, 1, 4});
  error.total = torch::tensor({50.0, 0.1, 0.8, 0.0, 1.0, 0.0, 0.0, 0.0, 9.0, 9.0, 9.0, 9.0}, d).reshape({3, 1, 4});
  error.magnitude = torch::tensor({30.0, 0.1, 0.0, 0.0, 0.25, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0}, d).reshape({3, 1, 4});
  error.direction = error.total - error.magnitude;
  auto selected = torch::tensor({1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0}, torch::kBool).reshape({3, 1, 4});
  const auto share = metrics::worst_rows_relative_share(error, selected);
  ASSERT_EQ(share.per_layer.size(), 3u);
  EXPECT_DOUBLE_EQ(share.per_layer[0], 0.6);
  EXPECT_DOUBLE_EQ(share.per_layer[1], 0.25);
  EXPECT_TRUE(std::isnan(share.per_layer[2]));
  EXPECT_DOUBLE_EQ(share.pooled, (0.3 + 0.01) / (0.5 + 0.04));
}

// A mirroring row (the engine's one-step lane) holds its source's keys and values at every earlier
// position, quantized by its own method, and its own at the position it is writing; also after rows
// before it retire. A per-token method quantizes the own token at its step and the source's after.
TEST(QuantizedCache, MirroredRowsHoldTheirSourcesRows) {
  const int64_t n = 12, layers = 2, heads = 2, head_dim = 64;
  const std::shared_ptr<const Quantizer> none = make_quantizer("none", {}, head_dim);
  const std::shared_ptr<const Quantizer> rtn =
      make_quantizer("rtn", {{"group_size", "32"}, {"k_bits", "2"}, {"v_bits", "2"}}, head_dim);
  QuantizedKVCache cache({none, none, rtn, rtn}, layers, heads, n + 4, head_dim, torch::kFloat32, torch::kCPU);
  cache.mirror(3, 1);  // row 3 holds row 1's rows, quantized like row 2 would quantize them
  auto generator = at::make_generator<at::CPUGeneratorImpl>(3);
  const auto k = torch::randn({4, heads, n + 4, head_dim}, generator, torch::kFloat32);
  const auto v = torch::randn({4, heads, n + 4, head_dim}, generator, torch::kFloat32);
  for (int64_t layer = 0; layer < layers; ++layer) cache.update(layer, 0, k.narrow(2, 0, n), v.narrow(2, 0, n));
  cache.retire(0);
  for (int64_t layer = 0; layer < layers; ++layer)
    cache.update(layer, n, k.narrow(0, 1, 3).narrow(2, n, 1), v.narrow(0, 1, 3).narrow(2, n, 1));
  for (int64_t layer = 0; layer < layers; ++layer)  // a second decode step: position n becomes row 1's
    cache.update(layer, n + 1, k.narrow(0, 1, 3).narrow(2, n + 1, 1), v.narrow(0, 1, 3).narrow(2, n + 1, 1));
  for (Role role : {Role::Key, Role::Value}) {
    const auto& x = role == Role::Key ? k : v;
    const auto mirrored = cache.row_contents(role, 3, false)[0];  // layer 0: [heads, n + 2, head_dim]
    EXPECT_TRUE(torch::equal(mirrored.narrow(1, 0, n + 1), x[1].narrow(1, 0, n + 1)));
    EXPECT_TRUE(torch::equal(mirrored.narrow(1, n + 1, 1), x[3].narrow(1, n + 1, 1)));  // its own, this step
    EXPECT_TRUE(torch::equal(cache.row_contents(role, 2, false)[0], x[2].narrow(1, 0, n + 2)));
    // RTN per token (lag 1) reads every position quantized: row 3 reads row 1's rows as row 2's method
    // stores them, so it reads what a row holding them would.
    QuantizedKVCache alone({rtn}, 1, heads, n + 4, head_dim, torch::kFloat32, torch::kCPU);
    alone.update(0, 0, x[1].narrow(1, 0, n + 1).unsqueeze(0), x[1].narrow(1, 0, n + 1).unsqueeze(0));
    alone.update(0, n + 1, x[3].narrow(1, n + 1, 1).unsqueeze(0), x[3].narrow(1, n + 1, 1).unsqueeze(0));
    EXPECT_TRUE(torch::allclose(cache.row_contents(role, 3, true)[0].narrow(1, 0, n + 1),
                                alone.row_contents(role, 0, true)[0].narrow(1, 0, n + 1), 1e-6, 1e-6));
  }
  EXPECT_GT(cache.quantized_positions(Role::Key, 0, 3), 0);
  const std::string error = test::error_message([&] { cache.retire(1); });
  EXPECT_EQ(error, "KV cache row 3 mirrors row 1, which was retired before it");
}

TEST(Quantizers, BadParametersGetOneClearError) {
  auto expect_error = [](const std::string& method, const ParamMap& params, int64_t head_dim, const std::string& text) {
    const std::string message = test::error_message([&] { make_quantizer(method, params, head_dim); });
    EXPECT_NE(message.find(text), std::string::npos) << method << ": " << message;
  };
  expect_error("kvarm", {}, 64, "unknown quantizer method 'kvarm'");
  expect_error("kivi", {{"k_bit", "2"}}, 64, "quantizer 'kivi': unknown parameter 'k_bit'");
  expect_error("rtn", {{"k_bits", "9"}}, 64, "k_bits = 9 is out of range [1, 8]");
  expect_error("kivi", {{"v_bits", "two"}}, 64, "v_bits = 'two' is not an integer");
  expect_error("rtn", {{"group_size", "5"}}, 64, "group_size 5 does not divide head_dim 64");
  expect_error("kivi", {{"group_size", "32"}, {"residual_length", "100"}}, 64, "residual_length");
  expect_error("quarot", {}, 44, "44 has no Hadamard construction");
  expect_error("kvarn", {{"preset", "k4v2"}, {"k_bits", "2"}}, 64, "preset");
  expect_error("kvarn", {{"rotate", "maybe"}}, 64, "rotate = 'maybe' is not a boolean");
}

}  // namespace
}  // namespace kvdrift
