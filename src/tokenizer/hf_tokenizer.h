#pragma once
// Hugging Face tokenizer.json, byte-level BPE only (GPT-2, Llama-3, Qwen2 style):
//   normalizer: null or NFC; pre_tokenizer: ByteLevel, or Sequence of Split(Regex|String, Isolated)
//   stages ending in ByteLevel; model: BPE with vocab, merges and optional ignore_merges;
//   added_tokens matched literally in the input before anything else.
// BOS is the special token the post-processor's template starts with, if any (encode's add_bos adds
// nothing without one, as for GPT-2 and Qwen2); add_eos appends the lowest of eos_ids().
#include <memory>
#include <string>

#include "tokenizer/tokenizer.h"

namespace kvdrift {

// Throws Error naming the file when it is unreadable, not JSON, or uses a component outside the
// list above (the message names the component).
std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& path);

}  // namespace kvdrift
