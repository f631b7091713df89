// Token sampling, in the order llama.cpp's default chain applies it: penalties, logit bias,
// then greedy (temperature <= 0) or top-k, typical-p, top-p, min-p, temperature and a draw.
//
// The chain in two halves, so that a backend can do the first on its own copy of the logits:
// "adjust and cut" (penalties and bias, then the `kept` best candidates in the one order below)
// and "finish" (the steps after the cut, which look at those candidates only). sample_token runs
// both on a row on the host; sample_candidates finishes from a backend's top_k (backend.h).
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
  // added to the logits; -inf bans a token; a token listed twice gets the sum of its biases
  std::vector<std::pair<int32_t, float>> logit_bias;
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

// A token and its logit (after the penalties and the bias).
struct Candidate {
  int32_t id;
  float logit;
};

// The order of every cut and of the steps after it: logit descending, then id ascending. It is
// total (ids are distinct; -0 and +0 tie and go by id), so the best k are one list whoever sorts.
inline bool before(const Candidate& a, const Candidate& b) {
  return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

// Whether a logit can be drawn: not NaN, not -inf (banned).
bool drawable(float logit);

// What the penalties and the bias do to one token's logit.
struct Adjustment {
  int32_t id;
  int32_t count = 0;    // occurrences in the penalty window (0: no penalty)
  bool biased = false;  // listed in logit_bias
  float bias = 0.0f;
};
// The tokens the penalties and the bias change, by ascending id (history ids outside the
// vocabulary are ignored). Throws std::invalid_argument when a bias names a token outside it.
std::vector<Adjustment> adjustments(const SamplingParams& p, const int32_t* history, int64_t n_history,
                                    int32_t n_vocab);
float adjust(float logit, const Adjustment& a, const SamplingParams& p);

// How many candidates the cut keeps: 1 when greedy, else top_k when on, else 0 (all of them).
int kept(const SamplingParams& p);
// The cut: c sorted by `before`, its first n kept (n <= 0: all).
void cut(std::vector<Candidate>& c, int n);
// Backend::top_k's default: the k best drawable logits of row[n] by `before`, the ids in skip
// (ascending) left out, into top[k] (id -1 past the last), and the skipped ids' logits into
// skipped[n_skip].
void top_k_host(const float* row, int32_t n, int k, const int32_t* skip, int n_skip, Candidate* top, float* skipped);

// The steps after the cut, on c sorted by `before`: greedy takes the first; else typical-p, top-p,
// min-p, temperature and a draw. Throws std::invalid_argument when c is empty (every token banned).
int32_t finish(std::vector<Candidate> c, const SamplingParams& p, Rng& rng);

// Picks the next token from logits[n_vocab] given the tokens so far (history). Throws
// std::invalid_argument if every token is banned or a bias names a token outside the vocabulary.
int32_t sample_token(const float* logits, int32_t n_vocab, const SamplingParams& p, const int32_t* history,
                     int64_t n_history, Rng& rng);
// The same pick from a backend's top_k of the row: top[n_top] (the row's best by `before`, the
// adjusted ids left out, id -1 past the last) and the adjusted ids' logits as the row has them
// (raw, by adj's order). The token is sample_token's whenever n_top >= kept(p) >= 1: every
// candidate that survives the full row's cut is either adjusted or among the unadjusted best.
int32_t sample_candidates(const Candidate* top, int n_top, const std::vector<Adjustment>& adj, const float* raw,
                          const SamplingParams& p, Rng& rng);

}  // namespace upg
