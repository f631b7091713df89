#include "upg/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace upg {

uint64_t Rng::next() {
  uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

namespace {

struct Candidate {
  int32_t id;
  float logit;
  float p;
};

// Softmax over the candidates' logits into p (candidates sorted by logit, descending).
void softmax(std::vector<Candidate>& c) {
  const float mx = c.front().logit;
  double sum = 0;
  for (auto& x : c) sum += (x.p = std::exp(x.logit - mx));
  for (auto& x : c) x.p = float(x.p / sum);
}

void keep(std::vector<Candidate>& c, size_t n) { c.resize(std::max<size_t>(1, std::min(n, c.size()))); }

}  // namespace

int32_t sample_token(const float* logits, int32_t n_vocab, const SamplingParams& p, const int32_t* history,
                     int64_t n_history, Rng& rng) {
  std::vector<float> l(logits, logits + n_vocab);

  // Penalties over the last penalty_last_n tokens.
  const int64_t window = p.penalty_last_n < 0 ? n_history : std::min<int64_t>(p.penalty_last_n, n_history);
  if (window > 0 && (p.repeat_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f)) {
    std::unordered_map<int32_t, int> counts;
    for (int64_t i = n_history - window; i < n_history; ++i)
      if (history[i] >= 0 && history[i] < n_vocab) ++counts[history[i]];
    for (const auto& [tok, n] : counts) {
      float& x = l[tok];
      if (p.repeat_penalty != 1.0f) x = x > 0 ? x / p.repeat_penalty : x * p.repeat_penalty;
      x -= float(n) * p.frequency_penalty + p.presence_penalty;
    }
  }
  for (const auto& [tok, bias] : p.logit_bias) {
    if (tok < 0 || tok >= n_vocab) throw std::invalid_argument("logit_bias token " + std::to_string(tok) + " is outside the vocabulary");
    l[tok] += bias;
  }

  if (p.temperature <= 0.0f) {  // greedy: the first maximum
    int32_t best = -1;
    for (int32_t i = 0; i < n_vocab; ++i)
      if (!std::isnan(l[i]) && l[i] > -std::numeric_limits<float>::infinity() && (best < 0 || l[i] > l[best])) best = i;
    if (best < 0) throw std::invalid_argument("every token is banned");
    return best;
  }

  std::vector<Candidate> c;
  c.reserve(n_vocab);
  for (int32_t i = 0; i < n_vocab; ++i)
    if (!std::isnan(l[i]) && l[i] > -std::numeric_limits<float>::infinity()) c.push_back({i, l[i], 0.0f});
  if (c.empty()) throw std::invalid_argument("every token is banned");
  auto by_logit = [](const Candidate& a, const Candidate& b) { return a.logit > b.logit || (a.logit == b.logit && a.id < b.id); };

  if (p.top_k > 0 && size_t(p.top_k) < c.size()) {
    std::partial_sort(c.begin(), c.begin() + p.top_k, c.end(), by_logit);
    c.resize(p.top_k);
  } else {
    std::sort(c.begin(), c.end(), by_logit);
  }

  if (p.typical_p < 1.0f) {  // keep the tokens whose surprise is closest to the entropy
    softmax(c);
    double entropy = 0;
    for (const auto& x : c) entropy -= x.p > 0 ? x.p * std::log(x.p) : 0;
    std::vector<std::pair<double, size_t>> dev;
    for (size_t i = 0; i < c.size(); ++i) dev.push_back({std::fabs(-std::log(std::max(c[i].p, 1e-30f)) - entropy), i});
    std::stable_sort(dev.begin(), dev.end());
    double cum = 0;
    std::vector<Candidate> kept;
    for (const auto& [d, i] : dev) {
      kept.push_back(c[i]);
      cum += c[i].p;
      if (cum >= p.typical_p) break;
    }
    std::sort(kept.begin(), kept.end(), by_logit);
    c.swap(kept);
  }
  if (p.top_p < 1.0f) {
    softmax(c);
    double cum = 0;
    size_t n = 0;
    while (n < c.size()) {
      cum += c[n++].p;
      if (cum >= p.top_p) break;
    }
    keep(c, n);
  }
  if (p.min_p > 0.0f) {
    softmax(c);
    const float floor = c.front().p * p.min_p;
    size_t n = 0;
    while (n < c.size() && c[n].p >= floor) ++n;
    keep(c, n);
  }

  for (auto& x : c) x.logit /= p.temperature;
  softmax(c);
  double r = rng.uniform(), cum = 0;
  for (const auto& x : c) {
    cum += x.p;
    if (r < cum) return x.id;
  }
  return c.back().id;
}

}  // namespace upg
