#include "tokenizer/pair_merge.h"

#include <queue>

namespace kvdrift {

// Rescanning the whole sequence per merge (run.c, and Hugging Face's reference order) is quadratic:
// a 200 KB word took 28 s. Here the candidate pairs wait in a priority queue ordered by (priority,
// leftmost), the sequence is a linked list over the original positions, and a merge queues only its
// two new neighbour pairs; a candidate that an earlier merge changed is skipped when it comes up. The
// merges made, and so the tokens, are the same as the rescanning loop's.
void merge_pairs(std::vector<TokenId>& tokens, const PairMergeLookup& lookup) {
  const size_t n = tokens.size();
  if (n < 2) return;
  constexpr size_t kNone = static_cast<size_t>(-1);
  std::vector<size_t> next(n), previous(n);  // a merge keeps the left position
  for (size_t i = 0; i < n; ++i) {
    next[i] = i + 1 < n ? i + 1 : kNone;
    previous[i] = i > 0 ? i - 1 : kNone;
  }
  struct Candidate {
    double priority;
    size_t left;  // original position of the pair's left symbol: positions keep their order
    TokenId left_id, right_id, merged_id;
  };
  const auto after = [](const Candidate& a, const Candidate& b) {
    return a.priority != b.priority ? a.priority > b.priority : a.left > b.left;
  };
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(after)> queue(after);
  const auto offer = [&](size_t left) {
    if (left == kNone || next[left] == kNone) return;
    if (const auto merge = lookup(tokens[left], tokens[next[left]])) {
      queue.push({merge->priority, left, tokens[left], tokens[next[left]], merge->merged});
    }
  };
  for (size_t i = 0; i + 1 < n; ++i) offer(i);
  std::vector<bool> alive(n, true);
  while (!queue.empty()) {
    const Candidate best = queue.top();
    queue.pop();
    const size_t right = alive[best.left] ? next[best.left] : kNone;
    if (right == kNone || tokens[best.left] != best.left_id || tokens[right] != best.right_id) continue;
    tokens[best.left] = best.merged_id;
    alive[right] = false;
    next[best.left] = next[right];
    if (next[right] != kNone) previous[next[right]] = best.left;
    offer(previous[best.left]);
    offer(best.left);
  }
  size_t kept = 0;
  for (size_t i = 0; i != kNone; i = next[i]) tokens[kept++] = tokens[i];
  tokens.resize(kept);
}

}  // namespace kvdrift
