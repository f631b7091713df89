#include "upg/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>

namespace upg {

uint64_t Rng::next() {
  uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

bool drawable(float logit) { return !std::isnan(logit) && logit > -std::numeric_limits<float>::infinity(); }

std::vector<Adjustment> adjustments(const SamplingParams& p, const int32_t* history, int64_t n_history,
                                    int32_t n_vocab) {
  std::map<int32_t, Adjustment> by_id;
  // Penalties over the last penalty_last_n tokens.
  const int64_t window = p.penalty_last_n < 0 ? n_history : std::min<int64_t>(p.penalty_last_n, n_history);
  if (window > 0 && (p.repeat_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f))
    for (int64_t i = n_history - window; i < n_history; ++i)
      if (history[i] >= 0 && history[i] < n_vocab) by_id.try_emplace(history[i], Adjustment{history[i]}).first->second.count++;
  for (const auto& [tok, bias] : p.logit_bias) {
    if (tok < 0 || tok >= n_vocab) throw std::invalid_argument("logit_bias token " + std::to_string(tok) + " is outside the vocabulary");
    Adjustment& a = by_id.try_emplace(tok, Adjustment{tok}).first->second;
    a.bias = a.biased ? a.bias + bias : bias;
    a.biased = true;
  }
  std::vector<Adjustment> out;
  out.reserve(by_id.size());
  for (const auto& [tok, a] : by_id) out.push_back(a);
  return out;
}

float adjust(float x, const Adjustment& a, const SamplingParams& p) {
  if (a.count > 0) {
    if (p.repeat_penalty != 1.0f) x = x > 0 ? x / p.repeat_penalty : x * p.repeat_penalty;
    x -= float(a.count) * p.frequency_penalty + p.presence_penalty;
  }
  if (a.biased) x += a.bias;
  return x;
}

int kept(const SamplingParams& p) { return p.temperature <= 0.0f ? 1 : std::max(p.top_k, 0); }

void cut(std::vector<Candidate>& c, int n) {
  if (n > 0 && size_t(n) < c.size()) {
    std::partial_sort(c.begin(), c.begin() + n, c.end(), before);
    c.resize(size_t(n));
  } else {
    std::sort(c.begin(), c.end(), before);
  }
}

void top_k_host(const float* row, int32_t n, int k, const int32_t* skip, int n_skip, Candidate* top, float* skipped) {
  std::vector<Candidate> c;
  c.reserve(size_t(n));
  for (int32_t i = 0, s = 0; i < n; ++i) {
    if (s < n_skip && skip[s] == i) {
      skipped[s++] = row[i];
      continue;
    }
    if (drawable(row[i])) c.push_back({i, row[i]});
  }
  cut(c, k);
  for (int i = 0; i < k; ++i) top[i] = size_t(i) < c.size() ? c[size_t(i)] : Candidate{-1, 0.0f};
}

namespace {

struct Scored {
  int32_t id;
  float logit;
  float p;
};
bool scored_before(const Scored& a, const Scored& b) { return before({a.id, a.logit}, {b.id, b.logit}); }

// Softmax over the candidates' logits into p (candidates sorted by logit, descending).
void softmax(std::vector<Scored>& c) {
  const float mx = c.front().logit;
  double sum = 0;
  for (auto& x : c) sum += (x.p = std::exp(x.logit - mx));
  for (auto& x : c) x.p = float(x.p / sum);
}

void keep(std::vector<Scored>& c, size_t n) { c.resize(std::max<size_t>(1, std::min(n, c.size()))); }

}  // namespace

int32_t finish(std::vector<Candidate> cut_candidates, const SamplingParams& p, Rng& rng) {
  if (cut_candidates.empty()) throw std::invalid_argument("every token is banned");
  if (p.temperature <= 0.0f) return cut_candidates.front().id;  // greedy: the first maximum
  std::vector<Scored> c;
  c.reserve(cut_candidates.size());
  for (const auto& x : cut_candidates) c.push_back({x.id, x.logit, 0.0f});

  if (p.typical_p < 1.0f) {  // keep the tokens whose surprise is closest to the entropy
    softmax(c);
    double entropy = 0;
    for (const auto& x : c) entropy -= x.p > 0 ? x.p * std::log(x.p) : 0;
    std::vector<std::pair<double, size_t>> dev;
    for (size_t i = 0; i < c.size(); ++i) dev.push_back({std::fabs(-std::log(std::max(c[i].p, 1e-30f)) - entropy), i});
    std::stable_sort(dev.begin(), dev.end());
    double cum = 0;
    std::vector<Scored> kept_tokens;
    for (const auto& [d, i] : dev) {
      kept_tokens.push_back(c[i]);
      cum += c[i].p;
      if (cum >= p.typical_p) break;
    }
    std::sort(kept_tokens.begin(), kept_tokens.end(), scored_before);
    c.swap(kept_tokens);
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

int32_t sample_token(const float* logits, int32_t n_vocab, const SamplingParams& p, const int32_t* history,
                     int64_t n_history, Rng& rng) {
  std::vector<float> l(logits, logits + n_vocab);
  for (const Adjustment& a : adjustments(p, history, n_history, n_vocab)) l[size_t(a.id)] = adjust(l[size_t(a.id)], a, p);
  std::vector<Candidate> c;
  c.reserve(size_t(n_vocab));
  for (int32_t i = 0; i < n_vocab; ++i)
    if (drawable(l[size_t(i)])) c.push_back({i, l[size_t(i)]});
  cut(c, kept(p));
  return finish(std::move(c), p, rng);
}

int32_t sample_candidates(const Candidate* top, int n_top, const std::vector<Adjustment>& adj, const float* raw,
                          const SamplingParams& p, Rng& rng) {
  std::vector<Candidate> c;
  c.reserve(size_t(n_top) + adj.size());
  for (int i = 0; i < n_top && top[i].id >= 0; ++i) c.push_back(top[i]);
  for (size_t i = 0; i < adj.size(); ++i) {
    const float x = adjust(raw[i], adj[i], p);
    if (drawable(x)) c.push_back({adj[i].id, x});
  }
  cut(c, kept(p));
  return finish(std::move(c), p, rng);
}

}  // namespace upg
