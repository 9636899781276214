#include "reference/llama2c_reference.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <stdexcept>

namespace kvdrift::reference {
namespace {

constexpr double kRmsNormEps = 1e-5;
constexpr double kRopeBase = 10000.0;
constexpr int64_t kBosToken = 1;

using RowMajorFloatMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Hands out the checkpoint's float32 arrays in file order, converted to double.
class FloatCursor {
 public:
  explicit FloatCursor(const std::vector<float>& data) : data_(data) {}

  Eigen::VectorXd vector(int size) { return Eigen::Map<const Eigen::VectorXf>(take(size), size).cast<double>(); }

  // The file stores each matrix row-major as [rows, cols].
  Eigen::MatrixXd matrix(int rows, int cols) {
    return Eigen::Map<const RowMajorFloatMatrix>(take(int64_t{rows} * cols), rows, cols).cast<double>();
  }

  void skip(int64_t count) { take(count); }

 private:
  const float* take(int64_t count) {
    // The constructor checked the file size against the header, so running past the end is a bug here.
    if (offset_ + count > static_cast<int64_t>(data_.size())) throw std::logic_error("checkpoint cursor overrun");
    const float* start = data_.data() + offset_;
    offset_ += count;
    return start;
  }

  const std::vector<float>& data_;
  int64_t offset_ = 0;
};

Eigen::VectorXd rmsnorm(const Eigen::VectorXd& x, const Eigen::VectorXd& weight) {
  const double mean_square = x.squaredNorm() / static_cast<double>(x.size());
  return weight.cwiseProduct(x) / std::sqrt(mean_square + kRmsNormEps);
}

// Rotates interleaved pairs (i, i+1); a pair's frequency depends on its offset inside its head, so
// the same function serves q (dim entries) and k (kv_dim entries).
Eigen::VectorXd rope(const Eigen::VectorXd& x, int64_t pos, int head_dim) {
  Eigen::VectorXd rotated = x;
  for (Eigen::Index i = 0; i + 1 < x.size(); i += 2) {
    const double freq = 1.0 / std::pow(kRopeBase, static_cast<double>(i % head_dim) / head_dim);
    const double angle = static_cast<double>(pos) * freq;
    const double c = std::cos(angle), s = std::sin(angle);
    rotated[i] = x[i] * c - x[i + 1] * s;
    rotated[i + 1] = x[i] * s + x[i + 1] * c;
  }
  return rotated;
}

Eigen::VectorXd softmax(const Eigen::VectorXd& scores) {
  const Eigen::VectorXd exps = (scores.array() - scores.maxCoeff()).exp().matrix();
  return exps / exps.sum();
}

Eigen::VectorXd swiglu_ffn(const Eigen::VectorXd& x, const Llama2cLayerWeights& layer) {
  const Eigen::ArrayXd gate = (layer.w1 * x).array();
  const Eigen::ArrayXd silu = gate / (1.0 + (-gate).exp());
  return layer.w2 * (silu * (layer.w3 * x).array()).matrix();
}

// Applies function(row, position) -> vector of `result_cols` entries to every row of a
// [positions, features] matrix.
template <typename Function>
Eigen::MatrixXd map_rows(const Eigen::MatrixXd& rows, Eigen::Index result_cols, Function function) {
  Eigen::MatrixXd result(rows.rows(), result_cols);
  for (Eigen::Index t = 0; t < rows.rows(); ++t) {
    result.row(t) = function(Eigen::VectorXd(rows.row(t).transpose()), t).transpose();
  }
  return result;
}

int64_t argmax_lowest_id(const Eigen::VectorXd& values) {
  Eigen::Index best = 0;
  for (Eigen::Index i = 1; i < values.size(); ++i) {
    if (values[i] > values[best]) best = i;
  }
  return best;
}

}  // namespace

Llama2cReference::Llama2cReference(const std::string& checkpoint_path) : path_(checkpoint_path) {
  std::ifstream in(checkpoint_path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("cannot open checkpoint " + checkpoint_path);
  const int64_t file_bytes = static_cast<int64_t>(in.tellg());
  in.seekg(0);

  // Little-endian int32 header, read natively (the project only targets little-endian hosts).
  int32_t header[7];
  if (!in.read(reinterpret_cast<char*>(header), sizeof(header))) {
    throw std::runtime_error("checkpoint too short for its header: " + checkpoint_path);
  }
  config_ = {header[0], header[1], header[2], header[3], header[4], std::abs(header[5]), header[6]};
  const bool tied_classifier = header[5] > 0;
  const Llama2cConfig& c = config_;
  if (c.dim <= 0 || c.hidden_dim <= 0 || c.n_layers <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 || c.vocab_size <= 0 ||
      c.seq_len <= 0 || c.dim % c.n_heads != 0 || c.n_heads % c.n_kv_heads != 0 || c.head_dim() % 2 != 0) {
    throw std::runtime_error("implausible llama2.c header in " + checkpoint_path);
  }

  const int64_t dim = c.dim, hidden = c.hidden_dim, kv_dim = c.kv_dim(), vocab = c.vocab_size;
  const int64_t per_layer = 2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden * dim;
  const int64_t rope_tables = int64_t{c.seq_len} * c.head_dim();  // two tables of seq_len*head_dim/2
  const int64_t float_count =
      vocab * dim + c.n_layers * per_layer + dim + rope_tables + (tied_classifier ? 0 : vocab * dim);
  if (file_bytes != static_cast<int64_t>(sizeof(header)) + 4 * float_count) {
    throw std::runtime_error("checkpoint size " + std::to_string(file_bytes) + " does not match its header (expected " +
                             std::to_string(sizeof(header) + 4 * float_count) + " bytes): " + checkpoint_path);
  }
  std::vector<float> floats(float_count);
  if (!in.read(reinterpret_cast<char*>(floats.data()), 4 * float_count)) {
    throw std::runtime_error("cannot read weights from " + checkpoint_path);
  }

  // llama2.c stores each tensor for all layers contiguously, so fill the layers tensor by tensor.
  FloatCursor cursor(floats);
  token_embedding_ = cursor.matrix(c.vocab_size, c.dim);
  layers_.resize(c.n_layers);
  for (auto& layer : layers_) layer.rms_att = cursor.vector(c.dim);
  for (auto& layer : layers_) layer.wq = cursor.matrix(c.dim, c.dim);
  for (auto& layer : layers_) layer.wk = cursor.matrix(c.kv_dim(), c.dim);
  for (auto& layer : layers_) layer.wv = cursor.matrix(c.kv_dim(), c.dim);
  for (auto& layer : layers_) layer.wo = cursor.matrix(c.dim, c.dim);
  for (auto& layer : layers_) layer.rms_ffn = cursor.vector(c.dim);
  for (auto& layer : layers_) layer.w1 = cursor.matrix(c.hidden_dim, c.dim);
  for (auto& layer : layers_) layer.w2 = cursor.matrix(c.dim, c.hidden_dim);
  for (auto& layer : layers_) layer.w3 = cursor.matrix(c.hidden_dim, c.dim);
  rms_final_ = cursor.vector(c.dim);
  cursor.skip(rope_tables);  // legacy precomputed RoPE tables; recomputed in rope() instead
  classifier_ = tied_classifier ? token_embedding_ : cursor.matrix(c.vocab_size, c.dim);
}

void Llama2cReference::check_token(int64_t token) const {
  if (token < 0 || token >= config_.vocab_size) {
    throw std::out_of_range("token " + std::to_string(token) + " outside the vocabulary of " + path_);
  }
}

std::vector<Eigen::VectorXd> Llama2cReference::logits(const std::vector<int64_t>& tokens) const {
  const Llama2cConfig& c = config_;
  const Eigen::Index length = static_cast<Eigen::Index>(tokens.size());
  if (length > c.seq_len) throw std::out_of_range("sequence longer than seq_len of " + path_);
  const int head_dim = c.head_dim();
  const int queries_per_kv_head = c.n_heads / c.n_kv_heads;
  const double score_scale = 1.0 / std::sqrt(static_cast<double>(head_dim));

  // Hidden states of all positions, one row each: [length, dim].
  Eigen::MatrixXd hidden(length, c.dim);
  for (Eigen::Index t = 0; t < length; ++t) {
    check_token(tokens[t]);
    hidden.row(t) = token_embedding_.row(tokens[t]);
  }

  for (const auto& layer : layers_) {
    const Eigen::MatrixXd normed =
        map_rows(hidden, c.dim, [&](const Eigen::VectorXd& x, Eigen::Index) { return rmsnorm(x, layer.rms_att); });
    // Position t's row is rotated by angle t * freq: the row index is the position.
    const Eigen::MatrixXd queries =
        map_rows(normed * layer.wq.transpose(), c.dim,
                 [&](const Eigen::VectorXd& q, Eigen::Index t) { return rope(q, t, head_dim); });
    const Eigen::MatrixXd keys =
        map_rows(normed * layer.wk.transpose(), c.kv_dim(),
                 [&](const Eigen::VectorXd& k, Eigen::Index t) { return rope(k, t, head_dim); });
    const Eigen::MatrixXd values = normed * layer.wv.transpose();

    Eigen::MatrixXd attention(length, c.dim);
    for (int head = 0; head < c.n_heads; ++head) {
      const int kv_head = head / queries_per_kv_head;
      const Eigen::MatrixXd head_queries = queries.middleCols(head * head_dim, head_dim);
      const Eigen::MatrixXd head_keys = keys.middleCols(kv_head * head_dim, head_dim);
      const Eigen::MatrixXd head_values = values.middleCols(kv_head * head_dim, head_dim);
      const Eigen::MatrixXd scores = head_queries * head_keys.transpose() * score_scale;  // [query, key]
      // Causal mask: position t attends to keys 0..t only, so weights beyond t stay zero.
      Eigen::MatrixXd weights = Eigen::MatrixXd::Zero(length, length);
      for (Eigen::Index t = 0; t < length; ++t) {
        weights.row(t).head(t + 1) = softmax(scores.row(t).head(t + 1).transpose()).transpose();
      }
      attention.middleCols(head * head_dim, head_dim) = weights * head_values;
    }
    hidden += attention * layer.wo.transpose();

    hidden += map_rows(hidden, c.dim, [&](const Eigen::VectorXd& x, Eigen::Index) {
      return swiglu_ffn(rmsnorm(x, layer.rms_ffn), layer);
    });
  }

  std::vector<Eigen::VectorXd> result;
  result.reserve(length);
  for (Eigen::Index t = 0; t < length; ++t) {
    result.push_back(classifier_ * rmsnorm(hidden.row(t).transpose(), rms_final_));
  }
  return result;
}

Eigen::VectorXd Llama2cReference::step(int64_t token, Llama2cKvCache& cache) const {
  const Llama2cConfig& c = config_;
  check_token(token);
  const int64_t pos = cache.length();
  if (pos >= c.seq_len) throw std::out_of_range("KV cache already holds seq_len positions of " + path_);
  cache.keys.resize(c.n_layers);
  cache.values.resize(c.n_layers);
  const int head_dim = c.head_dim();
  const int queries_per_kv_head = c.n_heads / c.n_kv_heads;
  const double score_scale = 1.0 / std::sqrt(static_cast<double>(head_dim));

  Eigen::VectorXd x = token_embedding_.row(token).transpose();
  for (int l = 0; l < c.n_layers; ++l) {
    const Llama2cLayerWeights& layer = layers_[l];
    const Eigen::VectorXd normed = rmsnorm(x, layer.rms_att);
    const Eigen::VectorXd query = rope(layer.wq * normed, pos, head_dim);
    std::vector<Eigen::VectorXd>& keys = cache.keys[l];
    std::vector<Eigen::VectorXd>& values = cache.values[l];
    keys.push_back(rope(layer.wk * normed, pos, head_dim));
    values.push_back(layer.wv * normed);

    Eigen::VectorXd attention(c.dim);
    for (int head = 0; head < c.n_heads; ++head) {
      const int kv_head = head / queries_per_kv_head;
      const Eigen::VectorXd head_query = query.segment(head * head_dim, head_dim);
      Eigen::VectorXd scores(pos + 1);
      for (int64_t j = 0; j <= pos; ++j) {
        scores[j] = head_query.dot(keys[j].segment(kv_head * head_dim, head_dim)) * score_scale;
      }
      const Eigen::VectorXd weights = softmax(scores);
      Eigen::VectorXd head_output = Eigen::VectorXd::Zero(head_dim);
      for (int64_t j = 0; j <= pos; ++j) head_output += weights[j] * values[j].segment(kv_head * head_dim, head_dim);
      attention.segment(head * head_dim, head_dim) = head_output;
    }
    x += layer.wo * attention;
    x += swiglu_ffn(rmsnorm(x, layer.rms_ffn), layer);
  }
  return classifier_ * rmsnorm(x, rms_final_);
}

std::vector<int64_t> greedy(const Llama2cReference& model, int64_t first_token, int steps) {
  if (steps < 0 || steps > model.config().seq_len) throw std::out_of_range("greedy: steps outside [0, seq_len]");
  Llama2cKvCache cache;
  std::vector<int64_t> generated;
  int64_t token = first_token;
  for (int pos = 0; pos < steps; ++pos) {
    const int64_t next = argmax_lowest_id(model.step(token, cache));
    if (next == kBosToken) break;  // run.c treats a generated BOS as the end of the sequence
    generated.push_back(next);
    token = next;
  }
  return generated;
}

}  // namespace kvdrift::reference
