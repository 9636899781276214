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
