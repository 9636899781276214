#include "reference/quant_reference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

namespace kvdrift::reference {
namespace {

// docs/quantizers.md: eps of RTN, KIVI and QuaRot values; KVarN's comes from the SPEC.
constexpr double kMinMaxEps = 1e-8;
constexpr double kKvarnEps = 1e-10;

bool is_power_of_two(int n) { return n > 0 && (n & (n - 1)) == 0; }

int max_code(int bits) { return (1 << bits) - 1; }

// Round half to even, symmetric in sign. Working on |v| keeps |v| − floor(|v|) exact.
double round_half_even(double v) {
  if (!std::isfinite(v)) return v;
  const double a = std::fabs(v);
  const double f = std::floor(a);
  const double frac = a - f;
  double n = f;
  if (frac > 0.5 || (frac == 0.5 && std::fmod(f, 2.0) != 0.0)) n = f + 1.0;
  return std::copysign(n, v);
}

int to_code(double unrounded, int bits) {
  return static_cast<int>(std::clamp(round_half_even(unrounded), 0.0, static_cast<double>(max_code(bits))));
}

// Rounds a ≥ 0 to a binary float format with `fraction_bits` stored mantissa bits and smallest
// normal exponent `min_exponent` (below it the spacing stays 2^(min_exponent − fraction_bits):
// subnormals). The largest-value check is the caller's.
double round_to_binary_format(double a, int fraction_bits, int min_exponent) {
  if (a == 0.0) return 0.0;
  int e = 0;
  std::frexp(a, &e);  // a = m·2^e with m in [0.5, 1), so floor(log2 a) = e − 1
  const int exponent = std::max(e - 1, min_exponent);
  const double quantum = std::ldexp(1.0, exponent - fraction_bits);
  return round_half_even(a / quantum) * quantum;  // a/quantum is exact: quantum is a power of two
}

Eigen::MatrixXd kron(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b) {
  Eigen::MatrixXd out(a.rows() * b.rows(), a.cols() * b.cols());
  for (int i = 0; i < a.rows(); ++i) {
    for (int j = 0; j < a.cols(); ++j) {
      for (int k = 0; k < b.rows(); ++k) {
        for (int l = 0; l < b.cols(); ++l) out(i * b.rows() + k, j * b.cols() + l) = a(i, j) * b(k, l);
      }
    }
  }
  return out;
}

Eigen::MatrixXd sylvester(int n) {
  Eigen::MatrixXd h(n, n);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) h(i, j) = (__builtin_popcount(static_cast<unsigned>(i & j)) % 2 == 0) ? 1.0 : -1.0;
  }
  return h;
}

// GF(q) for q prime (element i is the integer i) or q = 25 (element i = a + 5b is a + b·α, α² = 3).
int field_sub(int q, int i, int j) {
  if (q != 25) return ((i - j) % q + q) % q;
  const int a = ((i % 5 - j % 5) + 5) % 5;
  const int b = ((i / 5 - j / 5) + 5) % 5;
  return a + 5 * b;
}

int field_mul(int q, int i, int j) {
  if (q != 25) return (i * j) % q;
  const int a1 = i % 5, b1 = i / 5, a2 = j % 5, b2 = j / 5;
  // (a1 + b1 α)(a2 + b2 α) = a1 a2 + 3 b1 b2 + (a1 b2 + a2 b1) α
  return (a1 * a2 + 3 * b1 * b2) % 5 + 5 * ((a1 * b2 + a2 * b1) % 5);
}

// Q[i][j] = χ(e_i − e_j), χ the quadratic character (χ(0) = 0).
Eigen::MatrixXd paley_q(int q) {
  std::vector<bool> is_square(q, false);
  for (int x = 1; x < q; ++x) is_square[field_mul(q, x, x)] = true;
  Eigen::MatrixXd m(q, q);
  for (int i = 0; i < q; ++i) {
    for (int j = 0; j < q; ++j) {
      const int diff = field_sub(q, i, j);
      m(i, j) = diff == 0 ? 0.0 : (is_square[diff] ? 1.0 : -1.0);
    }
  }
  return m;
}

// [[0, 1ᵀ], [first_column_sign·1, Q]]
Eigen::MatrixXd bordered(const Eigen::MatrixXd& q_matrix, double first_column_sign) {
  const int n = static_cast<int>(q_matrix.rows()) + 1;
  Eigen::MatrixXd m = Eigen::MatrixXd::Zero(n, n);
  for (int j = 1; j < n; ++j) m(0, j) = 1.0;
  for (int i = 1; i < n; ++i) m(i, 0) = first_column_sign;
  m.bottomRightCorner(n - 1, n - 1) = q_matrix;
  return m;
}

// Paley I, q ≡ 3 mod 4: H = I + S, S = [[0, 1ᵀ], [−1, Q]].
Eigen::MatrixXd paley_one(int q) {
  const Eigen::MatrixXd s = bordered(paley_q(q), -1.0);
  return Eigen::MatrixXd::Identity(q + 1, q + 1) + s;
}

// Paley II, q ≡ 1 mod 4: H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]], C = [[0, 1ᵀ], [1, Q]].
Eigen::MatrixXd paley_two(int q) {
  const Eigen::MatrixXd c = bordered(paley_q(q), 1.0);
  Eigen::MatrixXd plus(2, 2), minus(2, 2);
  plus << 1, 1, 1, -1;
  minus << 1, -1, -1, -1;
  return kron(c, plus) + kron(Eigen::MatrixXd::Identity(q + 1, q + 1), minus);
}

void check_dtype(const std::string& dtype) {
  if (dtype != "float16" && dtype != "float8_e4m3" && dtype != "float32") {
    throw std::invalid_argument("unknown scale dtype '" + dtype + "' (float16 | float8_e4m3 | float32)");
  }
}

double sample_std(const std::vector<double>& v) {
  double mean = 0.0;
  for (double e : v) mean += e;
  mean /= static_cast<double>(v.size());
  double ss = 0.0;
  for (double e : v) ss += (e - mean) * (e - mean);
  return std::sqrt(ss / static_cast<double>(v.size() - 1));
}

Eigen::VectorXd column_stds(const Eigen::MatrixXd& x) {
  Eigen::VectorXd out(x.cols());
  for (int c = 0; c < x.cols(); ++c) {
    std::vector<double> column(x.rows());
    for (int r = 0; r < x.rows(); ++r) column[r] = x(r, c);
    out(c) = sample_std(column);
  }
  return out;
}

Eigen::VectorXd row_stds(const Eigen::MatrixXd& x) { return column_stds(x.transpose()); }

void check_varn_shape(const Eigen::MatrixXd& x) {
  if (x.rows() < 2 || x.cols() < 2) {
    throw std::invalid_argument("VarN needs at least 2 rows and 2 columns (unbiased std), got " +
                                std::to_string(x.rows()) + "x" + std::to_string(x.cols()));
  }
}

// (T/e^a)/e^b: column c divided by e^a[c], then row r by e^b[r], in the pseudo-code's order.
Eigen::MatrixXd normalized(const Eigen::MatrixXd& t, const Eigen::VectorXd& a, const Eigen::VectorXd& b) {
  Eigen::MatrixXd m(t.rows(), t.cols());
  for (int r = 0; r < t.rows(); ++r) {
    for (int c = 0; c < t.cols(); ++c) m(r, c) = (t(r, c) / std::exp(a(c))) / std::exp(b(r));
  }
  return m;
}

void check_divides(int group, int axis_length, const std::string& axis_name) {
  if (group <= 0 || axis_length % group != 0) {
    throw std::invalid_argument("group_size " + std::to_string(group) + " does not divide the " + axis_name +
                                " axis of length " + std::to_string(axis_length));
  }
}

ReferenceQuantized empty_result(const Eigen::MatrixXd& x) {
  ReferenceQuantized out;
  out.codes = Eigen::MatrixXi::Zero(x.rows(), x.cols());
  out.unrounded = Eigen::MatrixXd::Zero(x.rows(), x.cols());
  out.dequantized = Eigen::MatrixXd::Zero(x.rows(), x.cols());
  return out;
}

// SPEC §2 RTN with docs' range [min·c, max·c] and eps 1e-8, over groups of G consecutive tokens
// (along_tokens: params [T/G, D]) or G consecutive channels (params [T, D/G]). Used by rtn, kivi and
// kivi; fills `out` (dequantized in x's frame) and out.params "scale", "minimum" (in zero_dtype).
void quantize_minmax_groups(const Eigen::MatrixXd& x, bool along_tokens, int group, int bits, double clip,
                            const std::string& dtype, const std::string& zero_dtype, bool before_codes,
                            ReferenceQuantized& out) {
  const int rows = static_cast<int>(x.rows()), cols = static_cast<int>(x.cols());
  const int param_rows = along_tokens ? rows / group : rows;
  const int param_cols = along_tokens ? cols : cols / group;
  Eigen::MatrixXd scale(param_rows, param_cols), minimum(param_rows, param_cols);
  for (int pr = 0; pr < param_rows; ++pr) {
    for (int pc = 0; pc < param_cols; ++pc) {
      // The group's member positions in x.
      std::vector<std::pair<int, int>> members;
      for (int k = 0; k < group; ++k) {
        members.push_back(along_tokens ? std::make_pair(pr * group + k, pc) : std::make_pair(pr, pc * group + k));
      }
      double lo = std::numeric_limits<double>::infinity(), hi = -lo;
      for (const auto& [r, c] : members) {
        lo = std::min(lo, x(r, c));
        hi = std::max(hi, x(r, c));
      }
      lo *= clip;
      hi *= clip;
      const double s = std::max((hi - lo) / max_code(bits), kMinMaxEps);
      const double s_stored = round_to_storage(s, dtype);
      const double lo_stored = round_to_storage(lo, zero_dtype);
      for (const auto& [r, c] : members) {
        out.unrounded(r, c) = before_codes ? (x(r, c) - lo_stored) / s_stored : (x(r, c) - lo) / s;
        out.codes(r, c) = to_code(out.unrounded(r, c), bits);
        out.dequantized(r, c) = out.codes(r, c) * s_stored + lo_stored;
      }
      scale(pr, pc) = s_stored;
      minimum(pr, pc) = lo_stored;
    }
  }
  out.params["scale"] = scale;
  out.params["minimum"] = minimum;
}

// QuaRot (its ActQuantizer) on the rotated tile: per token, groups of G channels, range
// [min·c, max·c], for keys widened to contain 0 ([min(min,0)·c, max(max,0)·c]); a constant group is
// widened to contain 0, an all-zero one takes [−1, 1]; integer zero point z = round(−lo/s), stored
// as an integer for keys and in zero_dtype for values. Dequantized stays rotated.
void quantize_quarot(const Eigen::MatrixXd& xr, bool key, int group, int bits, double clip, const std::string& dtype,
                     const std::string& zero_dtype, bool before_codes, ReferenceQuantized& out) {
  const int rows = static_cast<int>(xr.rows()), groups = static_cast<int>(xr.cols()) / group;
  Eigen::MatrixXd scale(rows, groups), zero(rows, groups);
  for (int t = 0; t < rows; ++t) {
    for (int g = 0; g < groups; ++g) {
      // Keys start from 0, which gives min(min(x), 0) and max(max(x), 0).
      double lo = key ? 0.0 : std::numeric_limits<double>::infinity(), hi = key ? 0.0 : -lo;
      for (int k = 0; k < group; ++k) {
        lo = std::min(lo, xr(t, g * group + k));
        hi = std::max(hi, xr(t, g * group + k));
      }
      lo *= clip;
      hi *= clip;
      if (lo == hi) {
        lo = std::min(lo, 0.0);
        hi = std::max(hi, 0.0);
      }
      if (lo == 0.0 && hi == 0.0) {
        lo = -1.0;
        hi = 1.0;
      }
      const double s_stored = round_to_storage((hi - lo) / max_code(bits), dtype);
      // before_codes: the zero point and the codes follow the stored scale.
      const double s = before_codes ? s_stored : (hi - lo) / max_code(bits);  // no eps: the range is never empty
      const double z_exact = round_half_even(-lo / s);
      const double z = key ? z_exact : round_to_storage(z_exact, zero_dtype);
      for (int k = 0; k < group; ++k) {
        const int d = g * group + k;
        const double ratio = xr(t, d) / s;
        // round(x/s) + z exactly as documented (z is an integer, so only the clamp differs from
        // rounding `unrounded`, but this avoids any float rounding in ratio + z).
        out.codes(t, d) = static_cast<int>(
            std::clamp(round_half_even(ratio) + z_exact, 0.0, static_cast<double>(max_code(bits))));
        out.unrounded(t, d) = ratio + z_exact;
        out.dequantized(t, d) = s_stored * (out.codes(t, d) - z);
      }
      scale(t, g) = s_stored;
      zero(t, g) = z;  // keys: an integer in [0, 2^b − 1] (uint8), not rounded further
    }
  }
  out.params["scale"] = scale;
  out.params["zero"] = zero;
}

// SPEC §2.3: VarN on T (keys T = K_rotᵀ, values T = V_rot), RTN along rows of B, parameters folded
// with the VarN scales and stored in scale_dtype; dequantized in the rotated frame.
void quantize_kvarn(const Eigen::MatrixXd& xr, const ReferenceSettings& s, ReferenceQuantized& out) {
  const Eigen::MatrixXd t = s.key ? Eigen::MatrixXd(xr.transpose()) : xr;
  const ReferenceVarN v = reference_varn(t, s.iters);
  const int rows = static_cast<int>(t.rows()), cols = static_cast<int>(t.cols());
  Eigen::MatrixXd row_scale_stored(1, rows), row_zero_stored(1, rows), col_stored(1, cols);
  Eigen::MatrixXd row_scale_exact(1, rows), row_zero_exact(1, rows), col_exact = v.col_scale.transpose();
  for (int c = 0; c < cols; ++c) col_stored(0, c) = round_to_storage(v.col_scale(c), s.scale_dtype);
  // before_codes: the tile normalized by the column scales as stored.
  Eigen::MatrixXd balanced = v.balanced;
  if (s.round_before_codes)
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) balanced(r, c) = t(r, c) / col_stored(0, c) / v.row_scale(r);
  for (int r = 0; r < rows; ++r) {
    const double lo = balanced.row(r).minCoeff();
    const double hi = balanced.row(r).maxCoeff();
    const double step = std::max((hi - lo) / max_code(s.bits), kKvarnEps);
    row_scale_exact(0, r) = v.row_scale(r) * step;
    row_zero_exact(0, r) = v.row_scale(r) * lo;
    row_scale_stored(0, r) = round_to_storage(row_scale_exact(0, r), s.scale_dtype);
    row_zero_stored(0, r) = round_to_storage(row_zero_exact(0, r), s.zero_dtype);
    for (int c = 0; c < cols; ++c) {
      // Row r of T is channel r for keys, token r for values; codes are stored token-major.
      const int token = s.key ? c : r;
      const int channel = s.key ? r : c;
      // before_codes: the tile divided by its stored token or channel scale, against the stored RTN scale
      // and zero point (K_rot[t,d] / kT[t] = q kS[d] + kZ[d]; V_rot[t,d] / vC[d] = q vS[t] + vZ[t]).
      out.unrounded(token, channel) =
          s.round_before_codes ? (t(r, c) / col_stored(0, c) - row_zero_stored(0, r)) / row_scale_stored(0, r)
                               : (balanced(r, c) - lo) / step;
      out.codes(token, channel) = to_code(out.unrounded(token, channel), s.bits);
      // K̂_rot[t,d] = (q·kS[d] + kZ[d])·kT[t];  V̂_rot[t,d] = (q·vS[t] + vZ[t])·vC[d]
      out.dequantized(token, channel) =
          (out.codes(token, channel) * row_scale_stored(0, r) + row_zero_stored(0, r)) * col_stored(0, c);
    }
  }
  const std::string row_scale = s.key ? "kS" : "vS", row_zero = s.key ? "kZ" : "vZ", col = s.key ? "kT" : "vC";
  out.params[row_scale] = row_scale_stored;
  out.params[row_zero] = row_zero_stored;
  out.params[col] = col_stored;
  out.unrounded_params[row_scale] = row_scale_exact;
  out.unrounded_params[row_zero] = row_zero_exact;
  out.unrounded_params[col] = col_exact;
}

}  // namespace

Eigen::MatrixXd reference_known_hadamard(int k) {
  if (is_power_of_two(k)) return sylvester(k);
  switch (k) {
    case 12: return paley_one(11);
    case 20: return paley_one(19);
    case 60: return paley_one(59);
    case 28: return paley_two(13);
    case 36: return paley_two(17);
    case 52: return paley_two(25);
    case 40: {
      const Eigen::MatrixXd h20 = reference_known_hadamard(20);
      Eigen::MatrixXd h(40, 40);
      h << h20, h20, h20, -h20;
      return h;
    }
    default:
      throw std::invalid_argument("no known Hadamard matrix of order " + std::to_string(k));
  }
}

Eigen::MatrixXd reference_hadamard(int d) {
  if (is_power_of_two(d)) return sylvester(d) / std::sqrt(static_cast<double>(d));
  // docs/quantizers.md: K is tried in QuaRot's order, so d = 40·2^m (also 20·2^(m+1)) uses H_40.
  for (int k : {60, 52, 36, 28, 40, 20, 12}) {
    if (d % k == 0 && is_power_of_two(d / k)) {
      const int p = d / k;
      return kron(reference_known_hadamard(k) / std::sqrt(static_cast<double>(k)),
                  sylvester(p) / std::sqrt(static_cast<double>(p)));
    }
  }
  throw std::invalid_argument("no Hadamard rotation for head dim d = " + std::to_string(d) +
                              " (need a power of two or K·2^m with K in {12, 20, 28, 36, 40, 52, 60})");
}

double round_to_float16(double v) {
  if (std::isnan(v) || std::isinf(v)) return v;
  const double r = round_to_binary_format(std::fabs(v), 10, -14);
  return std::copysign(r > 65504.0 ? std::numeric_limits<double>::infinity() : r, v);
}

double round_to_float8_e4m3(double v) {
  if (std::isnan(v)) return v;
  if (std::isinf(v)) return std::copysign(448.0, v);
  const double r = round_to_binary_format(std::fabs(v), 3, -6);
  return std::copysign(std::min(r, 448.0), v);
}

double round_to_storage(double v, const std::string& dtype) {
  check_dtype(dtype);
  if (dtype == "float16") return round_to_float16(v);
  if (dtype == "float8_e4m3") return round_to_float8_e4m3(v);
  return static_cast<double>(static_cast<float>(v));
}

double reference_imbalance(const Eigen::MatrixXd& x) {
  check_varn_shape(x);
  const Eigen::VectorXd cs = column_stds(x), rs = row_stds(x);
  return cs.maxCoeff() / std::max(cs.minCoeff(), 1e-8) + rs.maxCoeff() / std::max(rs.minCoeff(), 1e-8);
}

ReferenceVarN reference_varn(const Eigen::MatrixXd& t, int iters) {
  check_varn_shape(t);
  if (iters < 0) throw std::invalid_argument("VarN iters must be >= 0, got " + std::to_string(iters));
  const int rows = static_cast<int>(t.rows()), cols = static_cast<int>(t.cols());
  Eigen::VectorXd a = Eigen::VectorXd::Zero(cols), b = Eigen::VectorXd::Zero(rows);
  double best = reference_imbalance(t);
  Eigen::VectorXd sc = Eigen::VectorXd::Ones(cols), sr = Eigen::VectorXd::Ones(rows);
  for (int it = 0; it < iters; ++it) {
    // Columns first; the row update sees the new column scales.
    const Eigen::VectorXd cs = column_stds(normalized(t, a, b));
    for (int c = 0; c < cols; ++c) a(c) = std::clamp(a(c) + std::log(std::clamp(cs(c), 1e-3, 1e3)), -0.3, 10.0);
    const Eigen::VectorXd rs = row_stds(normalized(t, a, b));
    for (int r = 0; r < rows; ++r) b(r) = std::clamp(b(r) + std::log(std::clamp(rs(r), 1e-3, 1e3)), -0.3, 10.0);
    const double i = reference_imbalance(normalized(t, a, b));
    if (i <= best) {  // ties take the later iterate
      best = i;
      sc = a.array().exp();
      sr = b.array().exp();
    }
  }
  ReferenceVarN out;
  out.balanced.resize(rows, cols);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) out.balanced(r, c) = (t(r, c) / sc(c)) / sr(r);
  }
  out.col_scale = sc;
  out.row_scale = sr;
  out.best_imbalance = best;
  return out;
}

ReferenceQuantized reference_quantize(const Eigen::MatrixXd& x, const ReferenceSettings& s) {
  const int tokens = static_cast<int>(x.rows()), dim = static_cast<int>(x.cols());
  if (tokens == 0 || dim == 0) throw std::invalid_argument("empty tile");
  if (s.bits < 1 || s.bits > 8) throw std::invalid_argument("bits must be in 1..8, got " + std::to_string(s.bits));
  check_dtype(s.scale_dtype);
  ReferenceQuantized out = empty_result(x);

  if (s.method == "rtn" || s.method == "quarot") {
    if (!(s.clip_ratio > 0.0 && s.clip_ratio <= 1.0)) {
      throw std::invalid_argument("clip_ratio must be in (0, 1], got " + std::to_string(s.clip_ratio));
    }
  }

  if (s.method == "rtn") {
    if (s.axis != "per_token" && s.axis != "per_channel") {
      throw std::invalid_argument("unknown rtn axis '" + s.axis + "' (per_token | per_channel)");
    }
    const bool along_tokens = s.axis == "per_channel";
    check_divides(s.group_size, along_tokens ? tokens : dim, along_tokens ? "token" : "channel");
    quantize_minmax_groups(x, along_tokens, s.group_size, s.bits, s.clip_ratio, s.scale_dtype, s.zero_dtype,
                           s.round_before_codes, out);
    return out;
  }
  if (s.method == "kivi") {
    // Keys per channel over groups of G tokens, values per token over groups of G channels. Only the
    // grouped axis is checked; "G divides head_dim" for keys is a config rule, not a tile one.
    check_divides(s.group_size, s.key ? tokens : dim, s.key ? "token" : "channel");
    quantize_minmax_groups(x, s.key, s.group_size, s.bits, 1.0, s.scale_dtype, s.zero_dtype, s.round_before_codes,
                           out);
    return out;
  }
  if (s.method == "quarot") {
    check_divides(s.group_size, dim, "channel");
    const Eigen::MatrixXd h = reference_hadamard(dim);
    const Eigen::MatrixXd xr = x * h;
    quantize_quarot(xr, s.key, s.group_size, s.bits, s.clip_ratio, s.scale_dtype, s.zero_dtype, s.round_before_codes,
                    out);
    out.dequantized = Eigen::MatrixXd(out.dequantized * h.transpose());
    return out;
  }
  if (s.method == "kvarn") {
    if (s.group_size != tokens) {
      throw std::invalid_argument("kvarn tile must hold group_size = " + std::to_string(s.group_size) +
                                  " tokens, got " + std::to_string(tokens));
    }
    if (!is_power_of_two(tokens) || tokens < 2) {
      throw std::invalid_argument("kvarn tile size must be a power of two >= 2, got " + std::to_string(tokens));
    }
    if (dim < 2) throw std::invalid_argument("kvarn needs head_dim >= 2, got " + std::to_string(dim));
    if (s.iters < 0 || s.iters > 64) {
      throw std::invalid_argument("kvarn iters must be in 0..64, got " + std::to_string(s.iters));
    }
    const Eigen::MatrixXd h = s.rotate ? reference_hadamard(dim) : Eigen::MatrixXd::Identity(dim, dim);
    quantize_kvarn(x * h, s, out);
    out.dequantized = Eigen::MatrixXd(out.dequantized * h.transpose());
    return out;
  }
  throw std::invalid_argument("unknown quantizer method '" + s.method + "' (rtn | kivi | quarot | kvarn)");
}

}  // namespace kvdrift::reference
