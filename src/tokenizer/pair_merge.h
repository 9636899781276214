#pragma once
// The merge loop both tokenizer formats share: repeatedly merge the adjacent pair with the best
// priority, the leftmost on ties. O(n log n) in the number of symbols of one piece of text.
#include <functional>
#include <optional>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace kvdrift {

struct PairMerge {
  double priority;  // lower merges first: BPE's merge rank, or minus a SentencePiece score
  TokenId merged;
};

// The merge of the pair (left, right), if the vocabulary has one.
using PairMergeLookup = std::function<std::optional<PairMerge>(TokenId left, TokenId right)>;

// Merges `tokens` in place until no adjacent pair has a merge.
void merge_pairs(std::vector<TokenId>& tokens, const PairMergeLookup& lookup);

}  // namespace kvdrift
