#pragma once
// The KV quantizer interface. A quantizer turns tiles of K or V vectors of one (layer, kv-head) into
// a stored form (integer codes + parameters) and back, and declares when the cache hands it tokens
// (its cache policy). The cache and the engine only ever see this interface; adding a method follows
// the checklist in docs/quantizers.md (its file, its factory in registry.cpp, its oracle and docs).
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/enum_names.h"

namespace kvdrift {

enum class Role { Key, Value };
const char* role_name(Role role);  // "key" | "value"

// When positions of one role get quantized. Positions [0, sink) stay full precision for good. The
// others are quantized in blocks of `block` consecutive positions counted from the sink; at the decode
// step whose new token is at position t, attention reads positions [sink, quantized_prefix(t))
// quantized, with
//   quantized_prefix(t) = sink + floor((t + lag - sink) / block) * block   (at least sink, at most t + 1).
// KVarN: block G, lag 0 (block j flushes at the step whose token starts block j+1). KIVI keys: block
// R, lag 0. KIVI values: block 1, lag -R (a sliding window of R full-precision values). QuaRot: block
// 1, lag 1 (every token, its own step included). The prefill's own attention reads full precision
// and its complete blocks are quantized at the first decode step (or, in a chunked prefill, before the
// next chunk: docs/engine.md), unless prefill_reads_quantized: then the prefill quantizes every block
// due at its last position before its attention reads the cache, its own positions included, as
// llama.cpp does by writing each token quantized (ggml's `prefill: quantized`).
struct RolePolicy {
  // The lag of a role that is never quantized (the method none): no position is ever due, at any t.
  static constexpr int64_t kNeverDue = std::numeric_limits<int64_t>::min();
  int64_t sink = 0;
  int64_t block = 1;
  int64_t lag = 0;
  bool prefill_reads_quantized = false;
  int64_t quantized_prefix(int64_t t) const;
  bool quantizes() const { return lag != kNeverDue; }
};

// The stored form of N tiles. `codes` holds one integer code per element (uint8, unpacked) in the
// layout the method chose; `params` holds the method's stored parameters (scales, zero points, token
// scales), already rounded to their storage dtype but kept as float32 tensors.
enum class StoredDtype { Float32, Float16, Float8E4M3, UInt8 };  // UInt8: integer zero points
inline constexpr EnumName<StoredDtype> kStoredDtypeNames[] = {{StoredDtype::Float32, "float32"},
                                                              {StoredDtype::Float16, "float16"},
                                                              {StoredDtype::Float8E4M3, "float8_e4m3"},
                                                              {StoredDtype::UInt8, "uint8"}};
inline const char* stored_dtype_name(StoredDtype dtype) { return enum_name(kStoredDtypeNames, dtype); }
struct StoredParam {
  torch::Tensor values;  // float32, exactly representable in `dtype`
  StoredDtype dtype = StoredDtype::Float32;
  // Elements that the storage dtype could not hold (quant::stored_param): beyond its largest finite
  // value (float16 overflows to inf, float8_e4m3 saturates at 448), or nonzero but rounded to 0.
  int64_t saturated = 0;
  int64_t flushed_to_zero = 0;
};
struct QuantizedTiles {
  torch::Tensor codes;  // uint8
  int64_t bits = 0;     // code width
  std::map<std::string, StoredParam> params;
  // Bits each code occupies as stored, for a format that packs tighter than packed_code_bits(bits)
  // (ggml's q5 types keep the fifth bits in one 32-bit word per block: 5); 0 means packed_code_bits.
  int64_t stored_code_bits = 0;
};

using ParamMap = std::map<std::string, std::string>;  // key -> value text, from YAML or --set key=value

class Quantizer {
 public:
  virtual ~Quantizer() = default;
  virtual std::string method() const = 0;
  // Every parameter with its resolved value (defaults filled in), for logs and outputs.
  virtual ParamMap resolved_params() const = 0;
  virtual RolePolicy policy(Role role) const = 0;
  // x: float32 [N, tokens, head_dim], N independent tiles of one role of transformer layer `layer`
  // (from 0), in the model's frame (keys after RoPE). `tokens` is policy(role).block, or any count when
  // the block is 1. The layer lets a method treat layers differently (per-layer bit widths); tools that
  // quantize tiles of no particular layer (kvdrift quantize, bench quant, kvdrift bits) pass 0.
  virtual QuantizedTiles quantize(const torch::Tensor& x, Role role, int64_t layer) const = 0;
  // Back to float32 [N, tokens, head_dim] in the model's frame (a rotating method rotates back).
  virtual torch::Tensor dequantize(const QuantizedTiles& tiles, Role role, int64_t layer) const = 0;
};

// Builds `method` with `params` for heads of `head_dim`. Unknown methods, unknown or misspelled
// parameters, out-of-range values and impossible combinations (a group size that does not divide the
// axis, a head dim without a Hadamard construction) throw Error naming the method and the key.
std::unique_ptr<Quantizer> make_quantizer(const std::string& method, const ParamMap& params, int64_t head_dim);
std::vector<std::string> quantizer_methods();

// A method's factory: reads every parameter it has from the reader (quant/params.h) and builds the
// quantizer for heads of `head_dim`.
class ParamReader;
using QuantizerFactory = std::function<std::unique_ptr<Quantizer>(ParamReader& params, int64_t head_dim)>;
// Adds a method defined outside src/quant (a test's toy method, an experiment's prototype) to the
// registry, for make_quantizer, configs and every tool; the built-in methods are listed in
// registry.cpp. Registering a name twice is an InternalError.
void register_quantizer_method(const std::string& method, QuantizerFactory factory);

// Bits actually stored per element of the quantized tiles: codes (at their packed width, see
// packed_code_bits) plus every stored parameter at its storage width.
double stored_bits_per_element(const QuantizedTiles& tiles, int64_t elements);
// Codes are packed floor(8 / bits) per byte (the spec's layout), so 3-bit codes occupy 4 bits.
int64_t packed_code_bits(int64_t bits);
// The bits each code of `tiles` occupies: stored_code_bits when the method set it, else packed_code_bits.
int64_t code_storage_bits(const QuantizedTiles& tiles);

}  // namespace kvdrift
