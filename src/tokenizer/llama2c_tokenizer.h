#pragma once
// llama2.c tokenizer.bin: uint32 max_token_length, then per token id (until end of file) float32
// score, int32 byte length, bytes. Ids 0 <unk>, 1 BOS, 2 EOS, 3..258 byte-fallback tokens <0xNN>.
// Encoding and decoding reproduce llama2.c run.c encode()/decode() token for token.
#include <memory>
#include <string>

#include "tokenizer/tokenizer.h"

namespace kvdrift {

// Throws Error naming the file when it is missing, truncated, has a length field out of range, or
// holds fewer tokens than the 3 specials + 256 byte tokens the format assumes.
std::unique_ptr<Tokenizer> load_llama2c_tokenizer(const std::string& path);

}  // namespace kvdrift
