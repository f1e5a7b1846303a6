// Gather-free CPU kernels of the torch backend's segment layout; built and loaded by native.py.
//
// shrink and outer walk the valid (token, slot) pairs sorted by expert: row i is pair pair[i] of token token[i] and
// uses expert expert[i]; in each run of one expert, that expert's weights stay in cache while activation rows are
// read where they lie. expand walks tokens grouped by their experts and updates each output row once, in place.
// No activation row is gathered into a copy or scattered from one.
// Vectors are GCC/Clang vector extensions of 64 bytes (16 floats, 8 doubles): one AVX-512 register, two AVX2 ones.
// Ranks are walked in chunks known at compile time, so a chunk's accumulators live in registers.
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

template <typename S>
struct V {
  typedef S vec __attribute__((vector_size(64)));
  static constexpr int64_t N = 64 / sizeof(S);
  static vec load(const S* p) { vec v; std::memcpy(&v, p, sizeof v); return v; }
  static void store(S* p, vec v) { std::memcpy(p, &v, sizeof v); }
  static S sum(vec v) { S s = 0; for (int64_t l = 0; l < N; l++) s += v[l]; return s; }
};

constexpr int RANK_CHUNK = 8;  // outer: ranks per pass (their gradient columns in registers)
constexpr int SHRINK_RANKS = 4, SHRINK_ROWS = 4;  // shrink: 4 ranks x 4 rows of accumulators (measured best)

// End of the run of rows sharing row i's expert, within [i, end).
inline int64_t run_end(const int64_t* expert, int64_t i, int64_t end) {
  int64_t stop = i + 1;
  while (stop < end && expert[stop] == expert[i]) stop++;
  return stop;
}

// u[pair[i], j0 + j] = Ae[j] . x[token[i]] for the W ranks of Ae (rows j0.. of one expert's A) and the TB rows from
// i: each weight vector loaded once serves TB activation rows.
template <typename S, int W, int TB>
void shrink_block(const S* x, int64_t n, const S* Ae, int64_t r, int64_t j0, const int64_t* token, const int64_t* pair,
                  int64_t i, S* u) {
  using T = V<S>;
  const S* rows[TB];
  for (int b = 0; b < TB; b++) rows[b] = x + token[i + b] * n;
  typename T::vec acc[TB][W] = {};
  int64_t c = 0;
  for (; c + T::N <= n; c += T::N) {
    typename T::vec xv[TB];
    for (int b = 0; b < TB; b++) xv[b] = T::load(rows[b] + c);
    for (int j = 0; j < W; j++) {
      typename T::vec a = T::load(Ae + j * n + c);
      for (int b = 0; b < TB; b++) acc[b][j] += a * xv[b];
    }
  }
  for (int b = 0; b < TB; b++)
    for (int j = 0; j < W; j++) {
      S sum = T::sum(acc[b][j]);
      for (int64_t cc = c; cc < n; cc++) sum += Ae[j * n + cc] * rows[b][cc];
      u[pair[i + b] * r + j0 + j] = sum;
    }
}

template <typename S, int W>
void shrink_run(const S* x, int64_t n, const S* Ae, int64_t r, int64_t j0, const int64_t* token, const int64_t* pair,
                int64_t start, int64_t stop, S* u) {
  int64_t i = start;
  for (; i + SHRINK_ROWS <= stop; i += SHRINK_ROWS) shrink_block<S, W, SHRINK_ROWS>(x, n, Ae, r, j0, token, pair, i, u);
  for (; i < stop; i++) shrink_block<S, W, 1>(x, n, Ae, r, j0, token, pair, i, u);
}

// g[j, c0:c1] += sum_i left[i, j0 + j] * right[token[i], c0:c1] over the rows of one run, for W ranks (g: rows j0..
// of one expert's gradient).
template <typename S, int W>
void outer_run(const S* left, int64_t a, int64_t j0, const S* right, int64_t n, const int64_t* token, int64_t start,
               int64_t stop, int64_t c0, int64_t c1, S* g) {
  using T = V<S>;
  constexpr int64_t BLOCK = 2 * T::N;
  int64_t c = c0;
  for (; c + BLOCK <= c1; c += BLOCK) {
    typename T::vec g0[W] = {}, g1[W] = {};
    for (int64_t i = start; i < stop; i++) {
      const S* row = right + token[i] * n + c;
      const S* li = left + i * a + j0;
      typename T::vec v0 = T::load(row), v1 = T::load(row + T::N);
      for (int j = 0; j < W; j++) {
        g0[j] += li[j] * v0;
        g1[j] += li[j] * v1;
      }
    }
    for (int j = 0; j < W; j++) {
      T::store(g + j * n + c, T::load(g + j * n + c) + g0[j]);
      T::store(g + j * n + c + T::N, T::load(g + j * n + c + T::N) + g1[j]);
    }
  }
  for (int64_t cc = c; cc < c1; cc++)
    for (int j = 0; j < W; j++) {
      S acc = 0;
      for (int64_t i = start; i < stop; i++) acc += left[i * a + j0 + j] * right[token[i] * n + cc];
      g[j * n + cc] += acc;
    }
}

// Calls f.template operator()<W>() with W = the width of the rank chunk (1..RANK_CHUNK) known at compile time.
template <typename F>
void with_width(int64_t width, F&& f) {
  switch (width) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 3: f.template operator()<3>(); break;
    case 4: f.template operator()<4>(); break;
    case 5: f.template operator()<5>(); break;
    case 6: f.template operator()<6>(); break;
    case 7: f.template operator()<7>(); break;
    default: f.template operator()<8>(); break;
  }
}

// u [T*k, r]: u[pair[i]] = A[expert[i]] @ x[token[i]] for rows i in [begin, end); x [T, n], A [E, r, n].
template <typename S>
void shrink(const S* x, int64_t n, const S* A, int64_t r, const int64_t* expert, const int64_t* token,
            const int64_t* pair, int64_t begin, int64_t end, S* u) {
  for (int64_t i = begin; i < end;) {
    int64_t stop = run_end(expert, i, end);
    for (int64_t j0 = 0; j0 < r; j0 += SHRINK_RANKS)
      with_width(std::min<int64_t>(SHRINK_RANKS, r - j0), [&]<int W>() {
        shrink_run<S, W>(x, n, A + (expert[i] * r + j0) * n, r, j0, token, pair, i, stop, u);
      });
    i = stop;
  }
}

// out [T, m]: out[t, c0:c1] (+)= sum_j Bt[idx[t, j]]^T w[t * k + j] for every token t (added, or written when not
// `accumulate`: out need not be initialized); w [T*k, r] per pair, Bt [E, r, m], idx [T, k] (-1 = none). Tokens are walked in `order`, where tokens with equal rows of idx are adjacent:
// for each such group and block of columns, the group's weight columns stay in L1 while its output rows are updated,
// each row once with all its slots (no per-expert pass over the output).
template <typename S>
void expand(const S* w, const S* Bt, int64_t r, int64_t m, const int64_t* idx, int64_t k, const int64_t* order,
            int64_t T, int64_t c0, int64_t c1, bool accumulate, S* out) {
  using Vec = V<S>;
  constexpr int64_t H = 4, BLOCK = H * Vec::N;  // 4 vectors of columns, 2 accumulators each: 8 FMA chains
  for (int64_t i = 0; i < T;) {
    const int64_t* experts = idx + order[i] * k;
    int64_t stop = i + 1;
    while (stop < T && std::equal(experts, experts + k, idx + order[stop] * k)) stop++;
    int64_t c = c0;
    for (; c + BLOCK <= c1; c += BLOCK)
      for (int64_t g = i; g < stop; g++) {
        typename Vec::vec even[H] = {}, odd[H] = {};
        for (int64_t j = 0; j < k; j++) {
          if (experts[j] < 0) continue;
          const S* wp = w + (order[g] * k + j) * r;
          const S* B = Bt + experts[j] * r * m + c;
          int64_t q = 0;
          for (; q + 2 <= r; q += 2)
            for (int h = 0; h < H; h++) {
              even[h] += wp[q] * Vec::load(B + q * m + h * Vec::N);
              odd[h] += wp[q + 1] * Vec::load(B + (q + 1) * m + h * Vec::N);
            }
          if (q < r)
            for (int h = 0; h < H; h++) even[h] += wp[q] * Vec::load(B + q * m + h * Vec::N);
        }
        S* o = out + order[g] * m + c;
        for (int h = 0; h < H; h++)
          Vec::store(o + h * Vec::N, (accumulate ? Vec::load(o + h * Vec::N) : typename Vec::vec{}) + even[h] + odd[h]);
      }
    for (int64_t g = i; g < stop; g++)
      for (int64_t cc = c; cc < c1; cc++) {
        S acc = accumulate ? out[order[g] * m + cc] : 0;
        for (int64_t j = 0; j < k; j++) {
          if (experts[j] < 0) continue;
          const S* wp = w + (order[g] * k + j) * r;
          for (int64_t q = 0; q < r; q++) acc += wp[q] * Bt[(experts[j] * r + q) * m + cc];
        }
        out[order[g] * m + cc] = acc;
      }
    i = stop;
  }
}

// g [E, a, n]: g[expert[i], :, c0:c1] += left[i]^T right[token[i], c0:c1] for all P rows; left [P, a] sorted rows.
template <typename S>
void outer(const S* left, int64_t a, const S* right, int64_t n, const int64_t* expert, const int64_t* token, int64_t P,
           int64_t c0, int64_t c1, S* g) {
  for (int64_t i = 0; i < P;) {
    int64_t stop = run_end(expert, i, P);
    for (int64_t j0 = 0; j0 < a; j0 += RANK_CHUNK)
      with_width(std::min<int64_t>(RANK_CHUNK, a - j0), [&]<int W>() {
        outer_run<S, W>(left, a, j0, right, n, token, i, stop, c0, c1, g + (expert[i] * a + j0) * n);
      });
    i = stop;
  }
}

}  // namespace

#define LORAHUB_KERNELS(S, suffix)                                                                                  \
  extern "C" void shrink_##suffix(const S* x, int64_t n, const S* A, int64_t r, const int64_t* expert,              \
                                  const int64_t* token, const int64_t* pair, int64_t begin, int64_t end, S* u) {    \
    shrink<S>(x, n, A, r, expert, token, pair, begin, end, u);                                                      \
  }                                                                                                                 \
  extern "C" void expand_##suffix(const S* w, const S* Bt, int64_t r, int64_t m, const int64_t* idx, int64_t k,     \
                                  const int64_t* order, int64_t T, int64_t c0, int64_t c1, int64_t accumulate,      \
                                  S* out) {                                                                         \
    expand<S>(w, Bt, r, m, idx, k, order, T, c0, c1, accumulate != 0, out);                                         \
  }                                                                                                                 \
  extern "C" void outer_##suffix(const S* left, int64_t a, const S* right, int64_t n, const int64_t* expert,        \
                                 const int64_t* token, int64_t P, int64_t c0, int64_t c1, S* g) {                   \
    outer<S>(left, a, right, n, expert, token, P, c0, c1, g);                                                       \
  }

LORAHUB_KERNELS(float, f32)
LORAHUB_KERNELS(double, f64)
