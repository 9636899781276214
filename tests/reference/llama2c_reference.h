#pragma once
// Independent test oracle: a slow, double-precision forward pass of a llama2.c ("legacy" format)
// checkpoint written directly with Eigen, sharing no code with src/. It exists to check that the
// LibTorch model computes the right logits, so it favours obvious correctness over speed.
#include <Eigen/Dense>
#include <cstdint>
#include <string>
#include <vector>

namespace kvdrift::reference {

// The 7 int32 header fields of a llama2.c checkpoint (vocab_size already made positive).
struct Llama2cConfig {
  int dim = 0;
  int hidden_dim = 0;
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int vocab_size = 0;
  int seq_len = 0;

  int head_dim() const { return dim / n_heads; }
  int kv_dim() const { return head_dim() * n_kv_heads; }
};

// Weights are stored as [out, in] matrices so that y = W x, as in run.c's matmul.
struct Llama2cLayerWeights {
  Eigen::VectorXd rms_att;  // [dim]
  Eigen::MatrixXd wq;       // [dim, dim]
  Eigen::MatrixXd wk;       // [kv_dim, dim]
  Eigen::MatrixXd wv;       // [kv_dim, dim]
  Eigen::MatrixXd wo;       // [dim, dim]
  Eigen::VectorXd rms_ffn;  // [dim]
  Eigen::MatrixXd w1;       // [hidden, dim]
  Eigen::MatrixXd w2;       // [dim, hidden]
  Eigen::MatrixXd w3;       // [hidden, dim]
};

// Keys and values of every position processed so far, indexed [layer][position]; each vector has
// kv_dim entries (all kv heads concatenated), keys already rotated by RoPE.
struct Llama2cKvCache {
  std::vector<std::vector<Eigen::VectorXd>> keys;
  std::vector<std::vector<Eigen::VectorXd>> values;

  int64_t length() const { return keys.empty() ? 0 : static_cast<int64_t>(keys.front().size()); }
};

class Llama2cReference {
 public:
  // Loads the header and all weights; throws std::runtime_error naming the path if the file is
  // unreadable, has an implausible header, or its size does not match the header.
  explicit Llama2cReference(const std::string& checkpoint_path);

  // Logits for every position of `tokens` (causal attention), recomputing the whole sequence at
  // once in matrix form. Deliberately a different code path from step() so the two check each other.
  std::vector<Eigen::VectorXd> logits(const std::vector<int64_t>& tokens) const;

  // Processes one token at position cache.length(), appends its keys/values to `cache` and returns
  // the logits for the next token (run.c's forward()).
  Eigen::VectorXd step(int64_t token, Llama2cKvCache& cache) const;

  int vocab_size() const { return config_.vocab_size; }
  const Llama2cConfig& config() const { return config_; }

 private:
  void check_token(int64_t token) const;

  std::string path_;
  Llama2cConfig config_;
  Eigen::MatrixXd token_embedding_;  // [vocab, dim]
  std::vector<Llama2cLayerWeights> layers_;
  Eigen::VectorXd rms_final_;   // [dim]
  Eigen::MatrixXd classifier_;  // [vocab, dim]; a copy of token_embedding_ when tied
};

// Greedy decoding as in llama2.c's run.c with temperature 0: starting from `first_token` at
// position 0, runs `steps` forward passes and returns the generated tokens (not `first_token`),
// taking the argmax (lowest id on ties) each time. Stops early, without including it, when BOS (1)
// is generated, as run.c does. Throws if `steps` exceeds the model's seq_len.
std::vector<int64_t> greedy(const Llama2cReference& model, int64_t first_token, int steps);

}  // namespace kvdrift::reference
