// Gather-free CPU kernels of the torch backend's segment layout; built and loaded by native.py.
//
// The kernels walk the valid (token, slot) pairs in a sorted order: row i is pair pair[i] of token token[i] and uses
// expert expert[i]; rows come in tiles of consecutive tokens and, within a tile, grouped by expert. In each run of
// one expert, its weights stay in registers or L1 while the tile's activation rows, in L2, are read or updated where
// they lie: no activation row is gathered into a copy or scattered from one.
// Vectors are GCC/Clang vector extensions of one register: 64 bytes with AVX-512, 32 bytes otherwise (wider vectors
// than the registers spill: GCC lowers their broadcasts and shuffles through the stack, measured 3-4x slower on AVX2).
// Ranks are walked in chunks known at compile time, so a chunk's accumulators live in registers.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef LORAHUB_VECTOR_BYTES  // -DLORAHUB_VECTOR_BYTES=64 builds the AVX-512 layout anywhere (tests/ops/test_native.py)
#ifdef __AVX512F__
#define LORAHUB_VECTOR_BYTES 64
#else
#define LORAHUB_VECTOR_BYTES 32
#endif
#endif

namespace {

template <typename S>
struct V {
  typedef S vec __attribute__((vector_size(LORAHUB_VECTOR_BYTES)));
  static constexpr int N = LORAHUB_VECTOR_BYTES / sizeof(S);
  static vec load(const S* p) { vec v; std::memcpy(&v, p, sizeof v); return v; }
  static void store(S* p, vec v) { std::memcpy(p, &v, sizeof v); }
  static S sum(vec v) { S s = 0; for (int l = 0; l < N; l++) s += v[l]; return s; }
};

#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
#define LORAHUB_SHUFFLES 1
typedef V<float>::vec fv;
constexpr int NF = V<float>::N;  // float lanes: 8 or 16
template <int... L>
using lanes = std::integer_sequence<int, L...>;
constexpr auto all_lanes = std::make_integer_sequence<int, NF>{};

// Lane l of the half `half` of a level that sums units of U lanes: lanes come in groups of 2U, the first U taken
// from a, the next U from b; half 0 picks each pair of units' first unit, half 1 its second.
constexpr int unit_lane(int U, int l, int half) {
  int group = l / (2 * U), within = l % (2 * U);
  return (within < U ? 0 : NF) + group * 2 * U + within % U + half * U;
}
// One level of a transposing reduction: each unit of U lanes of a and of b is summed with its neighbour, and the
// results of a and b interleave unit by unit. Levels U = 1, 2, .., NF / 2 turn NF vectors into one whose lane q is
// the sum of vector q.
template <int U, int... L>
inline fv sum_units(fv a, fv b, lanes<L...>) {
  return __builtin_shufflevector(a, b, unit_lane(U, L, 0)...) + __builtin_shufflevector(a, b, unit_lane(U, L, 1)...);
}
template <int U>
inline void sum_level(fv* v, int count) {
  for (int i = 0; i < count / 2; i++) v[i] = sum_units<U>(v[2 * i], v[2 * i + 1], all_lanes);
  if constexpr (2 * U < NF) sum_level<2 * U>(v, count / 2);
}
// sums[q] = the lanes of v[q] summed, for NF float vectors (v is overwritten).
inline void sum_vectors(fv* v, float* sums) {
  sum_level<1>(v, NF);
  std::memcpy(sums, v, sizeof(fv));
}

// One step of a transpose: two vectors that differ in one bit of their index trade the lanes where lane bit LB
// differs, swapping that index bit with lane bit LB. Half H = 0 gives the vector with the bit clear, 1 the other.
constexpr int swap_lane(int LB, int l, int H) {
  int bit = (l >> LB) & 1;
  if (H == 0) return bit ? NF + (l ^ (1 << LB)) : l;
  return bit ? NF + l : (l ^ (1 << LB));
}
template <int LB, int H, int... L>
inline fv swap_bits(fv a, fv b, lanes<L...>) {
  return __builtin_shufflevector(a, b, swap_lane(LB, L, H)...);
}
// Swaps index bit LB of the 8 vectors v with lane bit LB, into s.
template <int LB>
inline void swap_stage(const fv* v, fv* s) {
  for (int m = 0; m < 8; m++)
    if (!(m & (1 << LB))) {
      s[m] = swap_bits<LB, 0>(v[m], v[m | (1 << LB)], all_lanes);
      s[m | (1 << LB)] = swap_bits<LB, 1>(v[m], v[m | (1 << LB)], all_lanes);
    }
}
// Lane bits (c0 c3 c2 c1) back to column order (c3 c2 c1 c0) (16 lanes).
constexpr int column_lane(int l) { return ((l & 1) << 3) | (l >> 1); }
template <int... L>
inline fv to_columns(fv a, lanes<L...>) {
  return __builtin_shufflevector(a, a, column_lane(L)...);
}
// b[j] = rank j of NF columns c0.. of a weight stored column by column (8 ranks from p + c * sc, sc >= 8): the
// 8 x NF block the expand holds in registers, transposed from B's own [out, r] layout by shuffles.
inline void columns_by_rank(const float* p, int64_t sc, fv* b) {
  fv v[8], s[8];
  if constexpr (NF == 8) {  // v[c]: the 8 ranks of column c; three stages swap all index bits with lane bits
    for (int c = 0; c < 8; c++) std::memcpy(&v[c], p + c * sc, 32);
    swap_stage<0>(v, s);
    swap_stage<1>(s, v);
    swap_stage<2>(v, b);
  } else {  // v[m]: columns 2m and 2m + 1, 8 ranks each (lane = 8 * (c & 1) + j)
    for (int m = 0; m < 8; m++) {
      std::memcpy(&v[m], p + 2 * m * sc, 32);
      std::memcpy(reinterpret_cast<char*>(&v[m]) + 32, p + (2 * m + 1) * sc, 32);
    }
    for (int m = 0; m < 4; m++) {
      s[m] = swap_bits<2, 0>(v[m], v[m + 4], all_lanes);
      s[m + 4] = swap_bits<2, 1>(v[m], v[m + 4], all_lanes);
    }
    for (int m : {0, 1, 4, 5}) {
      v[m] = swap_bits<1, 0>(s[m], s[m + 2], all_lanes);
      v[m + 2] = swap_bits<1, 1>(s[m], s[m + 2], all_lanes);
    }
    for (int m : {0, 2, 4, 6}) {
      s[m] = swap_bits<0, 0>(v[m], v[m + 1], all_lanes);
      s[m + 1] = swap_bits<0, 1>(v[m], v[m + 1], all_lanes);
    }
    for (int j = 0; j < 8; j++) b[j] = to_columns(s[j], all_lanes);
  }
}
#endif

constexpr int RANK_CHUNK = 8;  // expand, outer: ranks per pass (weight or gradient columns in registers)
// expand, outer: vectors of columns per pass, W of them per rank chunk in registers: 16 with AVX-512 (32 registers),
// 8 with AVX2 (16 registers; two passes' worth spill and run slower)
constexpr int BLOCK_VECTORS = LORAHUB_VECTOR_BYTES == 64 ? 2 : 1;
constexpr int SHRINK_RANKS = 4, SHRINK_ROWS = 4;  // shrink: 4 ranks x 4 rows of accumulators (measured best)

// End of the run of rows sharing row i's expert, within [i, end) (a run may span two tiles: harmless).
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
  S sums[TB * W];
#ifdef LORAHUB_SHUFFLES
  if constexpr (std::is_same_v<S, float>) {
    // NF vectors at a time, zero-padded: each lane sum is the same tree wherever a row falls (threads cut blocks).
    constexpr int Q = TB * W, G = (Q + NF - 1) / NF;
    fv all[G * NF] = {};
    std::memcpy(all, acc, sizeof acc);
    float padded[G * NF];
    for (int g = 0; g < G; g++) sum_vectors(all + g * NF, padded + g * NF);
    std::copy(padded, padded + Q, sums);
  } else
#endif
    for (int q = 0; q < TB * W; q++) sums[q] = T::sum(acc[q / W][q % W]);
  for (int b = 0; b < TB; b++)
    for (int j = 0; j < W; j++) {
      S sum = sums[b * W + j];
      for (int64_t cc = c; cc < n; cc++) sum += Ae[j * n + cc] * rows[b][cc];
      u[pair[i + b] * r + j0 + j] = sum;
    }
}

template <typename S, int W>
void shrink_run(const S* x, int64_t n, const S* Ae, int64_t r, int64_t j0, const int64_t* token, const int64_t* pair,
                int64_t start, int64_t stop, S* u) {
  int64_t i = start;
  for (; i + SHRINK_ROWS <= stop; i += SHRINK_ROWS) shrink_block<S, W, SHRINK_ROWS>(x, n, Ae, r, j0, token, pair, i, u);
  if constexpr (SHRINK_ROWS > 2)  // a pair of rows left (decoding: 2 rows per expert) still shares the weight loads
    for (; i + 2 <= stop; i += 2) shrink_block<S, W, 2>(x, n, Ae, r, j0, token, pair, i, u);
  for (; i < stop; i++) shrink_block<S, W, 1>(x, n, Ae, r, j0, token, pair, i, u);
}

// The N columns c.. of rank row p of a weight read with column stride sc (1: contiguous, one vector load).
template <typename S>
inline typename V<S>::vec load_columns(const S* p, int64_t c, int64_t sc) {
  if (sc == 1) return V<S>::load(p + c);
  typename V<S>::vec v;
  for (int l = 0; l < V<S>::N; l++) v[l] = p[(c + l) * sc];
  return v;
}

// b[j] = the N columns c.. of rank j, j < W, of a weight read as Be[j * sj + c * sc]: 8 ranks of B's own layout
// (sj = 1) by a transpose in registers where the vectors allow it, else lane by lane.
template <typename S, int W>
inline void load_block(const S* Be, int64_t sj, int64_t sc, int64_t c, typename V<S>::vec* b) {
#ifdef LORAHUB_SHUFFLES
  if constexpr (std::is_same_v<S, float> && W == 8) {
    if (sj == 1 && sc >= 8) {
      columns_by_rank(Be + c * sc, sc, b);
      return;
    }
  }
#endif
  for (int j = 0; j < W; j++) b[j] = load_columns(Be + j * sj, c, sc);
}

// out[token[i], c0:c1] += coef[pair[i]] * sum_j u[pair[i], j0 + j] * Be[j, c0:c1] over the rows of one run, for W
// ranks of Be (rows j0.. of one expert's B^T; rank j, column c at Be[j * sj + c * sc]): the run's weight columns are
// held in registers while its output rows are updated in place.
template <typename S, int W>
void expand_run(const S* u, const S* coef, int64_t r, int64_t j0, const S* Be, int64_t sj, int64_t sc, int64_t m,
                const int64_t* token, const int64_t* pair, int64_t start, int64_t stop, int64_t c0, int64_t c1,
                S* out) {
  using T = V<S>;
  constexpr int64_t BLOCK = BLOCK_VECTORS * T::N;
  int64_t c = c0;
  for (; c + BLOCK <= c1; c += BLOCK) {
    typename T::vec b[BLOCK_VECTORS][W];
    for (int h = 0; h < BLOCK_VECTORS; h++) load_block<S, W>(Be, sj, sc, c + h * T::N, b[h]);
    for (int64_t i = start; i < stop; i++) {
      S* o = out + token[i] * m + c;
      const S* ui = u + pair[i] * r + j0;
      S ci = coef[pair[i]];
      typename T::vec ov[BLOCK_VECTORS];
      for (int h = 0; h < BLOCK_VECTORS; h++) ov[h] = T::load(o + h * T::N);
      for (int j = 0; j < W; j++) {
        S wj = ci * ui[j];
        for (int h = 0; h < BLOCK_VECTORS; h++) ov[h] += wj * b[h][j];
      }
      for (int h = 0; h < BLOCK_VECTORS; h++) T::store(o + h * T::N, ov[h]);
    }
  }
  for (int64_t i = start; i < stop; i++)
    for (int64_t cc = c; cc < c1; cc++) {
      S acc = 0;
      for (int j = 0; j < W; j++) acc += coef[pair[i]] * u[pair[i] * r + j0 + j] * Be[j * sj + cc * sc];
      out[token[i] * m + cc] += acc;
    }
}

// g[j, c0:c1] += sum_i left[i, j0 + j] * right[token[i], c0:c1] over the rows of one run, for W ranks (g: rows j0..
// of one expert's gradient).
template <typename S, int W>
void outer_run(const S* left, int64_t a, int64_t j0, const S* right, int64_t n, const int64_t* token, int64_t start,
               int64_t stop, int64_t c0, int64_t c1, S* g) {
  using T = V<S>;
  constexpr int64_t BLOCK = BLOCK_VECTORS * T::N;
  int64_t c = c0;
  for (; c + BLOCK <= c1; c += BLOCK) {
    typename T::vec gv[BLOCK_VECTORS][W] = {};
    for (int64_t i = start; i < stop; i++) {
      const S* row = right + token[i] * n + c;
      const S* li = left + i * a + j0;
      typename T::vec v[BLOCK_VECTORS];
      for (int h = 0; h < BLOCK_VECTORS; h++) v[h] = T::load(row + h * T::N);
      for (int j = 0; j < W; j++)
        for (int h = 0; h < BLOCK_VECTORS; h++) gv[h][j] += li[j] * v[h];
    }
    for (int j = 0; j < W; j++)
      for (int h = 0; h < BLOCK_VECTORS; h++)
        T::store(g + j * n + c + h * T::N, T::load(g + j * n + c + h * T::N) + gv[h][j]);
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
// Rows of expert -1 (pairs without an expert) are skipped, here and in expand and outer.
template <typename S>
void shrink(const S* x, int64_t n, const S* A, int64_t r, const int64_t* expert, const int64_t* token,
            const int64_t* pair, int64_t begin, int64_t end, S* u) {
  for (int64_t i = begin; i < end;) {
    int64_t stop = run_end(expert, i, end);
    for (int64_t j0 = 0; j0 < r && expert[i] >= 0; j0 += SHRINK_RANKS)
      with_width(std::min<int64_t>(SHRINK_RANKS, r - j0), [&]<int W>() {
        shrink_run<S, W>(x, n, A + (expert[i] * r + j0) * n, r, j0, token, pair, i, stop, u);
      });
    i = stop;
  }
}

// out [T, m]: out[token[i], c0:c1] += coef[pair[i]] * Bt[expert[i]]^T u[pair[i]] for all P rows; u [T*k, r],
// coef [T*k], Bt [E, r, m] with strides (se, sj, sc): contiguous (sc = 1), or B [E, m, r] read transposed (sj = 1,
// sc = r).
// The rows come in tiles of `tile` consecutive tokens (see shrink), so a tile's output rows stay in cache while its
// experts' runs update them; when not `accumulate`, each tile's rows are zeroed first (out need not be initialized).
template <typename S>
void expand(const S* u, const S* coef, const S* Bt, int64_t r, int64_t m, int64_t se, int64_t sj, int64_t sc,
            const int64_t* expert, const int64_t* token, const int64_t* pair, int64_t P, int64_t T, int64_t tile,
            int64_t c0, int64_t c1, bool accumulate, S* out) {
  int64_t i = 0;
  for (int64_t first = 0; first < T; first += tile) {
    int64_t last = std::min(first + tile, T);
    if (!accumulate)
      for (int64_t t = first; t < last; t++) std::fill(out + t * m + c0, out + t * m + c1, S(0));
    while (i < P && token[i] < last) {
      int64_t stop = i + 1;
      while (stop < P && expert[stop] == expert[i] && token[stop] < last) stop++;
      for (int64_t j0 = 0; j0 < r && expert[i] >= 0; j0 += RANK_CHUNK)
        with_width(std::min<int64_t>(RANK_CHUNK, r - j0), [&]<int W>() {
          expand_run<S, W>(u, coef, r, j0, Bt + expert[i] * se + j0 * sj, sj, sc, m, token, pair, i, stop, c0, c1,
                           out);
        });
      i = stop;
    }
  }
}

// g [E, a, n]: g[expert[i], :, c0:c1] += left[i]^T right[token[i], c0:c1] for all P rows; left [P, a] sorted rows.
template <typename S>
void outer(const S* left, int64_t a, const S* right, int64_t n, const int64_t* expert, const int64_t* token, int64_t P,
           int64_t c0, int64_t c1, S* g) {
  for (int64_t i = 0; i < P;) {
    int64_t stop = run_end(expert, i, P);
    for (int64_t j0 = 0; j0 < a && expert[i] >= 0; j0 += RANK_CHUNK)
      with_width(std::min<int64_t>(RANK_CHUNK, a - j0), [&]<int W>() {
        outer_run<S, W>(left, a, j0, right, n, token, i, stop, c0, c1, g + (expert[i] * a + j0) * n);
      });
    i = stop;
  }
}

// body(lo, hi) over [0, size) cut into `threads` ranges of a multiple of `align`, one per OpenMP thread: the team
// torch's own ops run on when the library shares torch's OpenMP runtime (native.py), so a fork costs a wake-up of
// threads already spinning, not a new thread. Ranges are disjoint and fixed by `threads` alone, so a team smaller than
// asked (nested, or a build without OpenMP) walks the same ranges and computes the same bits.
template <typename F>
void split(int64_t size, int64_t align, int64_t threads, F&& body) {
  int64_t step = std::max<int64_t>(1, (size + threads - 1) / threads);
  step = (step + align - 1) / align * align;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    for (int64_t lo = omp_get_thread_num() * step; lo < size; lo += omp_get_num_threads() * step)
      body(lo, std::min(lo + step, size));
  }
#else
  for (int64_t lo = 0; lo < size; lo += step) body(lo, std::min(lo + step, size));
#endif
}

}  // namespace

// Entry points: the P sorted rows' work split across `threads` threads, by rows (shrink) or by output columns in
// multiples of 64 (expand, outer), each thread owning disjoint outputs.
#define LORAHUB_KERNELS(S, suffix)                                                                                  \
  extern "C" void shrink_##suffix(const S* x, int64_t n, const S* A, int64_t r, const int64_t* expert,              \
                                  const int64_t* token, const int64_t* pair, int64_t P, int64_t threads, S* u) {    \
    split(P, 1, threads, [&](int64_t lo, int64_t hi) { shrink<S>(x, n, A, r, expert, token, pair, lo, hi, u); });  \
  }                                                                                                                 \
  extern "C" void expand_##suffix(const S* u, const S* coef, const S* Bt, int64_t r, int64_t m, int64_t se,       \
                                  int64_t sj, int64_t sc, const int64_t* expert, const int64_t* token,              \
                                  const int64_t* pair, int64_t P, int64_t T, int64_t tile, int64_t threads,         \
                                  int64_t accumulate, S* out) {                                                     \
    split(m, 64, threads, [&](int64_t lo, int64_t hi) {                                                             \
      expand<S>(u, coef, Bt, r, m, se, sj, sc, expert, token, pair, P, T, tile, lo, hi, accumulate != 0, out);      \
    });                                                                                                             \
  }                                                                                                                 \
  extern "C" void outer_##suffix(const S* left, int64_t a, const S* right, int64_t n, const int64_t* expert,        \
                                 const int64_t* token, int64_t P, int64_t threads, S* g) {                          \
    split(n, 64, threads, [&](int64_t lo, int64_t hi) { outer<S>(left, a, right, n, expert, token, P, lo, hi, g); }); \
  }

LORAHUB_KERNELS(float, f32)
LORAHUB_KERNELS(double, f64)
