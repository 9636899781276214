#include "reference/llama2c_pieces.h"

#include <cctype>
#include <fstream>
#include <stdexcept>

namespace kvdrift::reference {
namespace {

constexpr int64_t kBosToken = 1;

// True for pieces spelled exactly "<0xNN>" with two hex digits; stores NN in `byte`.
bool parse_byte_piece(const std::string& piece, char& byte) {
  if (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>') return false;
  if (!std::isxdigit(static_cast<unsigned char>(piece[3])) || !std::isxdigit(static_cast<unsigned char>(piece[4]))) {
    return false;
  }
  byte = static_cast<char>(std::stoi(piece.substr(3, 2), nullptr, 16));
  return true;
}

}  // namespace

Llama2cPieces::Llama2cPieces(const std::string& tokenizer_path) : path_(tokenizer_path) {
  std::ifstream in(tokenizer_path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open tokenizer " + tokenizer_path);
  uint32_t max_token_length = 0;
  if (!in.read(reinterpret_cast<char*>(&max_token_length), sizeof(max_token_length))) {
    throw std::runtime_error("tokenizer too short for its header: " + tokenizer_path);
  }
  // Each entry starts with a float score (unused when decoding); a clean end of file ends the list.
  float score = 0;
  while (in.read(reinterpret_cast<char*>(&score), sizeof(score))) {
    int32_t length = 0;
    if (!in.read(reinterpret_cast<char*>(&length), sizeof(length)) || length < 0 ||
        static_cast<uint32_t>(length) > max_token_length) {
      throw std::runtime_error("bad piece length for id " + std::to_string(pieces_.size()) + " in " + tokenizer_path);
    }
    std::string piece(static_cast<size_t>(length), '\0');
    if (!in.read(piece.data(), length)) {
      throw std::runtime_error("truncated piece for id " + std::to_string(pieces_.size()) + " in " + tokenizer_path);
    }
    pieces_.push_back(std::move(piece));
    scores_.push_back(score);
  }
  if (in.gcount() != 0) throw std::runtime_error("trailing partial entry in " + tokenizer_path);
  if (pieces_.empty()) throw std::runtime_error("tokenizer has no pieces: " + tokenizer_path);
}

std::string Llama2cPieces::decode(int64_t previous_token, int64_t token) const {
  if (token < 0 || token >= size()) {
    throw std::out_of_range("token " + std::to_string(token) + " outside the vocabulary of " + path_);
  }
  std::string piece = pieces_[token];
  if (previous_token == kBosToken && !piece.empty() && piece.front() == ' ') piece.erase(0, 1);
  char byte = 0;
  if (parse_byte_piece(piece, byte)) return std::string(1, byte);
  return piece;
}

int64_t Llama2cPieces::id_of(const std::string& piece) const {
  for (size_t id = 0; id < pieces_.size(); ++id)
    if (pieces_[id] == piece) return static_cast<int64_t>(id);
  return -1;
}

std::vector<int64_t> Llama2cPieces::encode(const std::string& text) const {
  std::vector<int64_t> tokens = {kBosToken};
  if (!text.empty()) tokens.push_back(id_of(" "));
  for (size_t start = 0; start < text.size();) {
    size_t end = start + 1;
    while (end < text.size() && end - start < 4 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) ++end;
    const int64_t id = id_of(text.substr(start, end - start));
    if (id >= 0) {
      tokens.push_back(id);
    } else {
      for (size_t i = start; i < end; ++i) tokens.push_back(static_cast<unsigned char>(text[i]) + 3);
    }
    start = end;
  }
  while (true) {
    float best_score = -1e10f;
    int64_t best_id = -1, best_index = -1;
    for (size_t i = 0; i + 1 < tokens.size(); ++i) {
      const int64_t id = id_of(pieces_[tokens[i]] + pieces_[tokens[i + 1]]);
      if (id != -1 && scores_[id] > best_score) {
        best_score = scores_[id];
        best_id = id;
        best_index = static_cast<int64_t>(i);
      }
    }
    if (best_index == -1) break;
    tokens[best_index] = best_id;
    tokens.erase(tokens.begin() + best_index + 1);
  }
  return tokens;
}

std::string Llama2cPieces::decode_all(int64_t first_token, const std::vector<int64_t>& tokens) const {
  std::string text;
  int64_t previous = first_token;
  for (int64_t token : tokens) {
    text += decode(previous, token);
    previous = token;
  }
  return text;
}

}  // namespace kvdrift::reference
