// Token sampling, in the order llama.cpp's default chain applies it: penalties, logit bias,
// then greedy (temperature <= 0) or top-k, typical-p, top-p, min-p, temperature and a draw.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

namespace upg {

struct SamplingParams {
  float temperature = 0.8f;     // <= 0: greedy
  int top_k = 40;               // <= 0: off
  float top_p = 0.95f;          // >= 1: off
  float min_p = 0.05f;          // <= 0: off
  float typical_p = 1.0f;       // >= 1: off
  float repeat_penalty = 1.0f;  // 1: off; divides positive logits, multiplies negative ones
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int penalty_last_n = 64;      // tokens of history the penalties look at; -1: all
  std::vector<std::pair<int32_t, float>> logit_bias;  // added to the logits; -inf bans a token
};

// A small deterministic generator (splitmix64), so the same seed gives the same text everywhere.
class Rng {
 public:
  explicit Rng(uint64_t seed = 0) : state_(seed) {}
  uint64_t next();
  double uniform() { return double(next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)

 private:
  uint64_t state_;
};

// Picks the next token from logits[n_vocab] given the tokens so far (history). Throws
// std::invalid_argument if every token is banned or a bias names a token outside the vocabulary.
int32_t sample_token(const float* logits, int32_t n_vocab, const SamplingParams& p, const int32_t* history,
                     int64_t n_history, Rng& rng);

}  // namespace upg
