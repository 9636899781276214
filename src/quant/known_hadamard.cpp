// The known Hadamard matrices H_K for the non-power-of-two factors of head dims, built exactly as
// docs/quantizers.md fixes them (Paley I, Paley II, and a doubling for K = 40), so the Eigen oracle
// and this implementation rotate with the same matrix.
#include <map>
#include <mutex>
#include <vector>

#include "core/error.h"
#include "quant/hadamard.h"

namespace kvdrift::quant {

namespace {

using SignMatrix = std::vector<std::vector<int>>;

// GF(q) for the Paley orders: q prime, or q = 25 with elements a + b·α (α² = 3, irreducible over
// GF(5) since 3 is not a square mod 5) at index a + 5b. For prime q the b part is always 0.
int64_t characteristic(int64_t q) { return q == 25 ? 5 : q; }

// Q[i][j] = χ(e_i − e_j), χ the quadratic character of GF(q) (χ(0) = 0).
SignMatrix quadratic_residue_matrix(int64_t q) {
  const int64_t p = characteristic(q);
  std::vector<bool> is_square(q, false);
  for (int64_t i = 1; i < q; ++i) {
    const int64_t a = i % p, b = i / p;
    // (a + b·α)² = (a² + 3b²) + 2ab·α
    is_square[(a * a + 3 * b * b) % p + p * ((2 * a * b) % p)] = true;
  }
  SignMatrix residues(q, std::vector<int>(q));
  for (int64_t i = 0; i < q; ++i) {
    for (int64_t j = 0; j < q; ++j) {
      const int64_t difference = (i % p - j % p + p) % p + p * ((i / p - j / p + p) % p);
      residues[i][j] = difference == 0 ? 0 : (is_square[difference] ? 1 : -1);
    }
  }
  return residues;
}

// [[0, 1ᵀ], [column_sign·1, Q]]: S of Paley I (column_sign −1) and C of Paley II (column_sign +1).
SignMatrix bordered_residues(int64_t q, int column_sign) {
  const SignMatrix residues = quadratic_residue_matrix(q);
  SignMatrix bordered(q + 1, std::vector<int>(q + 1));
  for (int64_t i = 0; i <= q; ++i) {
    for (int64_t j = 0; j <= q; ++j) {
      if (i == 0)
        bordered[i][j] = j == 0 ? 0 : 1;
      else
        bordered[i][j] = j == 0 ? column_sign : residues[i - 1][j - 1];
    }
  }
  return bordered;
}

// Paley I (q ≡ 3 mod 4): H = I + S, order q + 1.
SignMatrix paley_one(int64_t q) {
  SignMatrix hadamard = bordered_residues(q, -1);
  for (int64_t i = 0; i <= q; ++i) hadamard[i][i] += 1;
  return hadamard;
}

// Paley II (q ≡ 1 mod 4): H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]], order 2(q + 1).
SignMatrix paley_two(int64_t q) {
  static const int kConference[2][2] = {{1, 1}, {1, -1}};
  static const int kDiagonal[2][2] = {{1, -1}, {-1, -1}};
  const SignMatrix conference = bordered_residues(q, 1);
  const int64_t n = q + 1;
  SignMatrix hadamard(2 * n, std::vector<int>(2 * n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      for (int r = 0; r < 2; ++r)
        for (int s = 0; s < 2; ++s)
          hadamard[2 * i + r][2 * j + s] = conference[i][j] * kConference[r][s] + (i == j ? kDiagonal[r][s] : 0);
  return hadamard;
}

// [[H, H], [H, −H]].
SignMatrix doubled(const SignMatrix& half) {
  const size_t n = half.size();
  SignMatrix hadamard(2 * n, std::vector<int>(2 * n));
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j < n; ++j) {
      hadamard[i][j] = hadamard[i][j + n] = hadamard[i + n][j] = half[i][j];
      hadamard[i + n][j + n] = -half[i][j];
    }
  }
  return hadamard;
}

SignMatrix sign_matrix(int64_t k) {
  switch (k) {
    case 12: return paley_one(11);
    case 20: return paley_one(19);
    case 60: return paley_one(59);
    case 28: return paley_two(13);
    case 36: return paley_two(17);
    case 52: return paley_two(25);
    case 40: return doubled(paley_one(19));
    default: fail("no known Hadamard matrix of order {} (known: 12, 20, 28, 36, 40, 52, 60)", k);
  }
}

torch::Tensor to_tensor(const SignMatrix& signs) {
  const int64_t k = static_cast<int64_t>(signs.size());
  auto matrix = torch::empty({k, k}, torch::kFloat32);
  auto entries = matrix.accessor<float, 2>();
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) entries[i][j] = static_cast<float>(signs[i][j]);
  return matrix;
}

}  // namespace

torch::Tensor known_hadamard_matrix(int64_t k) {
  // Built once per order; callers only read it (hadamard_rotate copies it to the tile's device).
  static std::mutex mutex;
  static std::map<int64_t, torch::Tensor> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(k);
  if (it == cache.end()) it = cache.emplace(k, to_tensor(sign_matrix(k))).first;
  return it->second;
}

}  // namespace kvdrift::quant
