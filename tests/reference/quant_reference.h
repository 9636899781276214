#pragma once
// Independent test oracle for the KV-cache quantizers: every method of ../shared/SPEC.md §2, with the
// open choices pinned down by docs/quantizers.md, written in double precision with dense Eigen
// matrices and plain loops. It shares no code with src/ (the LibTorch implementation it checks), so
// it favours obvious correctness over speed.
//
// Precision: parameters and codes are computed in double (the implementation uses float32), so a
// code may legitimately differ where the value being rounded lies within float32 noise of a rounding
// boundary; `ReferenceQuantized::unrounded` exposes that value so a comparison can skip such entries.
#include <Eigen/Dense>
#include <map>
#include <string>

namespace kvdrift::reference {

// Unnormalised ±1 Hadamard matrix of order k: Sylvester for powers of two, otherwise the known
// constructions of docs/quantizers.md for k ∈ {12, 20, 28, 36, 40, 52, 60}. Throws
// std::invalid_argument naming k for any other order.
Eigen::MatrixXd reference_known_hadamard(int k);

// The orthonormal rotation used by QuaRot and KVarN for head dim d: Sylvester
// H[i][j] = (-1)^popcount(i&j)/sqrt(d) when d is a power of two, else
// (H_K/√K) ⊗ (H_{2^m}/√2^m) for d = K·2^m (row index a·2^m + b), K tried in the documented order
// (60, 52, 36, 28, 40, 20, 12), so d = 40·2^m uses K = 40. Throws std::invalid_argument naming d.
Eigen::MatrixXd reference_hadamard(int d);

// Round-half-to-even conversions implemented from the format definitions.
// IEEE binary16 with subnormals (spacing 2^-24); magnitudes that round above 65504 become ±inf.
double round_to_float16(double v);
// float8 e4m3 "fn": bias 7, 3 mantissa bits, subnormal spacing 2^-9, no infinities; magnitudes that
// round above 448 (and ±inf) saturate to ±448. NaN stays NaN.
double round_to_float8_e4m3(double v);
// dtype ∈ {"float16", "float8_e4m3", "float32"}; float32 rounds to the nearest float. Throws
// std::invalid_argument for any other name.
double round_to_storage(double v, const std::string& dtype);

struct ReferenceQuantized {
  // [T, D], token-major for every method and role; values in [0, 2^b − 1].
  Eigen::MatrixXi codes;
  // [T, D]: the real value whose round-half-to-even, clamped to [0, 2^b − 1], is the code, i.e.
  // (x − min)/s for min/max methods and x/s + z for QuaRot keys (z is an integer, so this has the
  // same rounding boundaries as x/s). Lets a comparison skip entries within float noise of a
  // boundary (fractional part near 0.5).
  Eigen::MatrixXd unrounded;
  // Stored parameters, rounded to scale_dtype or zero_dtype (QuaRot's "zero" is an integer: of keys
  // stored as uint8, of values in zero_dtype), in
  // the shapes of docs/quantizers.md without the N axis:
  //   rtn per_token "scale", "minimum" [T, D/G]; rtn per_channel [T/G, D];
  //   kivi keys "scale", "minimum" [T/G, D]; kivi values [T, D/G];
  //   quarot keys and values "scale", "zero" [T, D/G];
  //   kvarn keys "kS", "kZ" [1, D], "kT" [1, T]; kvarn values "vC" [1, D], "vS", "vZ" [1, T].
  std::map<std::string, Eigen::MatrixXd> params;
  // KVarN's parameters before rounding to storage, under the names and shapes of `params`: a stored
  // value next to a rounding midpoint may legitimately round the other way in float32.
  std::map<std::string, Eigen::MatrixXd> unrounded_params;
  // [T, D], dequantized from the rounded parameters and rotated back to the model frame.
  Eigen::MatrixXd dequantized;
};

// Resolved settings for one tile: no defaults are filled in by the oracle. Fields a method does not
// use are ignored: axis (all but rtn), clip_ratio (kivi, kvarn), iters and rotate (all but kvarn;
// quarot always rotates).
struct ReferenceSettings {
  std::string method;  // "rtn" | "kivi" | "quarot" | "kvarn"
  bool key = true;     // the tile holds keys (true) or values (false)
  int bits = 0;        // 1..8
  int group_size = 0;  // G; for kvarn the tile size, which must equal the tile's token count
  std::string axis = "per_token";  // rtn only: "per_token" | "per_channel"
  double clip_ratio = 1.0;         // rtn and quarot, in (0, 1]
  std::string scale_dtype = "float16";
  std::string zero_dtype = "float16";  // minima / zero points (kvarn kZ, vZ; quarot value zeros)
  int iters = 8;       // kvarn, 0..64
  bool rotate = true;  // kvarn
  // scale_rounding: false = after_codes (codes against the unrounded parameters), true = before_codes
  // (codes against the parameters as stored; QuaRot's zero point from the stored scale).
  bool round_before_codes = false;
};

// Quantizes one tile x [T tokens, D channels] (keys already after RoPE) and dequantizes it. Throws
// std::invalid_argument with a message for settings the method cannot take (unknown method, axis or
// dtype, bits outside 1..8, G not dividing the grouped axis, a kvarn tile that is not G tokens with G
// a power of two ≥ 2, iters outside 0..64, a head dim with no Hadamard matrix).
ReferenceQuantized reference_quantize(const Eigen::MatrixXd& x, const ReferenceSettings& s);

// SPEC §2 KVarN imb(X) = max(colstd)/max(min(colstd),1e-8) + max(rowstd)/max(min(rowstd),1e-8), with
// the unbiased (N−1) std; X needs at least 2 rows and 2 columns.
double reference_imbalance(const Eigen::MatrixXd& x);

struct ReferenceVarN {
  Eigen::MatrixXd balanced;  // B = (T/Sc)/Sr
  Eigen::VectorXd col_scale;  // Sc, one per column
  Eigen::VectorXd row_scale;  // Sr, one per row
  double best_imbalance;      // imb(B)
};
// SPEC §2 VarN on t [R, C] with `iters` iterations, exactly as its pseudo-code, in double.
ReferenceVarN reference_varn(const Eigen::MatrixXd& t, int iters);

}  // namespace kvdrift::reference
