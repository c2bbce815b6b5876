// Hard-positive / hard-negative-pair mining of HPHN triplet with Embedding Expansion on the
// CPU, without gradient: per anchor the indices of its farthest positive and of its closest
// (anchor-side point, negative point) pair. The caller recomputes those few distances with
// gradient from gathered rows (O(B·D)); no B×B or P×P matrix is ever needed for the loss.
//
// The rows are processed in chunks of whole classes (a segment's two endpoints are in the
// same chunk): U = X̂_chunk X̂ᵀ (chunk × B). An anchor-side point a = mix(i, j, λ) of the
// chunk has the cosines u = (λ U_i + (1−λ) U_j)/‖v‖ with the originals (formed only on the
// classes its search visits); then s(a, original k) = u_k and
// s(a, mix(k, l, μ)) = cu·u_k + cw·u_l with the per-segment coefficients cu, cw
// (common/expansion.h). The negative side of a class is the same for all its anchors, so
// each anchor-side point finds its best negative once and each anchor takes the best over
// its own points. Memory O(chunk·B + n·#segments).
//
// Pruning (never changes a pick: every skip is on a bound strictly below the best so far,
// with slack for rounding; ties are resolved by point index, not by visiting order): U's
// columns are in class-sorted slot order, so a negative class is one contiguous run; its
// largest cosine skips its originals and bounds all its segments at once (ee_mix_bound); a
// surviving segment is then skipped on ee_mix_bound and on its arc bound (ee_arc_below,
// the cosine at the continuous maximiser along the segment), and only the rest are
// evaluated at all n points. The originals search from a floor, their best original negative
// (a vectorised max over the row, ee_row_max): one vectorised pass marks the slots whose
// cosine, times the largest 1/‖v‖ of the segments they end (slot_kmax), reaches it
// (seg_marks), and only those classes are walked, a walked class's segments first bounded
// all at once on their arcs (class_arc_below).
// The synthetic points search a segment's n points together (segment_best_above), from the
// smaller of its endpoints' best so far (synthetic points included), so the floors rise as
// the search goes. Their marks take two vectorised passes: on the rows' maxima over groups
// of 8 slots, then on the slots of the marked groups. A kept slot brings its original and
// the segments it ends; those are filtered on their bound from both endpoints' largest
// cosines, then on the pair-of-arcs bound (ee_arcs_below: all n × n pairs of points of the
// two segments in one test), and only the few left are searched point by point. On random
// 128-d rows (B = 4096, ~8 per class) a segment keeps ~30 of 4096 slots, ~130 of their
// ~225 segments pass the first filter and ~6 the second.
//
// Ties as the reference (reference/expansion_mining.py): the hardest negative is the lowest
// point index (originals 0..B−1, then B + e·n + k−1), then the earliest anchor-side point
// (x_i, then the points of the segments (i, ·) and (·, i) in segment order); the farthest
// positive is the lowest column.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "common/checks.h"
#include "common/expansion.h"
#include "cpu/batch_hard_self.h"
#include "cpu/ee_closest.h"
#include "cpu/op_checks.h"
#include "common/op_tags.h"

namespace metrix_ops {

namespace {

void check_mine_inputs(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& seg_i,
                       const at::Tensor& seg_j, int64_t n, int64_t chunk) {
  check_ee_rows_segments(x, labels, seg_i, seg_j, n, chunk);
  TORCH_CHECK(seg_i.device().is_cpu() && seg_j.device().is_cpu() && x.device().is_cpu() &&
                  labels.device().is_cpu(), "ee_hphn_mine: all inputs must be CPU tensors");
}

struct Segs {  // the segment table and who owns what
  std::vector<int64_t> si, sj, cls;     // endpoints and class of each segment
  std::vector<std::vector<int64_t>> of_anchor;  // anchor-side segment order per original
};

template <typename T>
struct Miner {
  const T* xu;  // B × D unit rows
  const int64_t* labels;
  int64_t B, D, n;
  const std::vector<int64_t>& order;   // class-sorted slot -> original (U's column order)
  const std::vector<int64_t>& cstart;  // slots of class c: [cstart[c], cstart[c + 1])
  const std::vector<std::vector<int64_t>>& class_segs;  // segments of each class, in order
  Segs segs;
  std::vector<int64_t> pu, pw;  // per segment, the slots of its endpoints
  std::vector<T> cu, cw;  // S × n coefficients λ/‖v‖, (1−λ)/‖v‖
  std::vector<T> wmin, wmax;  // per segment, min and max over k of cu + cw (= 1/‖v‖)
  std::vector<EeArc<T>> arc;  // per segment, its arc bound (ee_arc)
  std::vector<T> cwmin, cwmax;  // per class, min and max of wmin, wmax over its segments
  // per slot, max(1, the largest wmax of the segments it ends)·(1 + 32ε): a bound on the
  // cosine of any negative point the slot ends, over its original's (segment_best_above)
  std::vector<T> slot_kmax;
  std::vector<int64_t> slot_cls;        // per slot, its class
  // slots in groups of kGroup (the last one shorter): per group the largest slot_kmax, for
  // segment_best_above's first marks on the group maxima of the rows
  static constexpr int64_t kGroup = 8;
  std::vector<T> group_kmax;
  // per slot, the segments it ends (CSR: inc_end[inc_ptr[s] .. inc_ptr[s + 1])), each with its
  // other endpoint's slot and its wmax side by side, for segment_best_above's candidate pass
  std::vector<int64_t> inc_ptr;
  struct IncEnd {
    int64_t seg;
    int32_t other;
    T wmax;
  };
  std::vector<IncEnd> inc_end;
  std::vector<T> arc_p, arc_q;  // per class: max of its segments' p, r and of |q| (NaN: none)
  EeSegMarksFn<T> seg_marks = ee_seg_marks<T>();  // the level in use (ee_simd.cpp)
  EeRowMaxFn<T> row_max = ee_row_max<T>();
  EeArcsFilterFn<T> arcs_filter = ee_arcs_filter<T>();

  T dot(int64_t a, int64_t b) const {
    const T* p = xu + a * D;
    const T* q = xu + b * D;
    T s = 0;
    for (int64_t d = 0; d < D; ++d) s += p[d] * q[d];
    return s;
  }

  // Segment e's n points against one anchor-side point whose cosines with e's endpoints are
  // uk, ul: into (best, bq) as visit_class's take, each bound first (ee_mix_bound, then the
  // tighter, dearer arc bound), then the n cosines.
  void segment_points(int64_t e, T uk, T ul, T& best, int64_t& bq) const {
    if (ee_mix_bound(wmin[e], wmax[e], uk, ul) < best) return;
    if (ee_arc_below(arc[e], uk, ul, best)) return;
    const T* a = cu.data() + e * n;
    const T* b = cw.data() + e * n;
    T mm = ee_mix_sim(a[0], b[0], uk, ul);
    for (int64_t t = 1; t < n; ++t) mm = std::max(mm, ee_mix_sim(a[t], b[t], uk, ul));
    if (!(mm >= best)) return;  // the common case: one max per segment, no index work
    for (int64_t t = 0; t < n; ++t) {
      const T v = ee_mix_sim(a[t], b[t], uk, ul);
      const int64_t q = B + e * n + t;
      if (v > best || (v == best && q < bq)) best = v, bq = q;
    }
  }

  // The hardest negative of one class m for anchor-side row u (class-sorted slots): its
  // originals, then its segments, into (best, bq), the largest cosine, lowest point index on
  // ties. Its originals are looked at only if their max (NaN ignored: NaN never wins) reaches
  // best, and its segments are skipped whole on the bound of their best cosine from that max
  // (ee_mix_bound is monotone in both), else one by one on their own and arc bounds.
  template <bool kMarked>
  void visit_class(const T* u, int64_t m, T& best, int64_t& bq) const {
    auto take = [&](T v, int64_t q) {
      if (v > best || (v == best && q < bq)) best = v, bq = q;
    };
    const int64_t s0 = cstart[m], s1 = cstart[m + 1];
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t s = s0; s < s1; ++s) mx = u[s] > mx ? u[s] : mx;
    if (mx >= best)
      for (int64_t s = s0; s < s1; ++s) take(u[s], order[s]);
    if (class_segs[m].empty() || ee_mix_bound(cwmin[m], cwmax[m], mx, mx) < best) return;
    auto segment = [&](int64_t e) { segment_points(e, u[pu[e]], u[pw[e]], best, bq); };
    if constexpr (!kMarked) {
      // the walk of every class (the originals' first pass): segment by segment, the
      // cheapest per class while the best is still rising
      for (int64_t e : class_segs[m]) segment(e);
    } else {
      // a class marked against a floor mostly has no point reaching it: first all of its
      // segments at once on their arcs, from the two largest |u| of its slots
      T t1 = T(0), t2 = T(0);
      for (int64_t s = s0; s < s1; ++s) {
        const T a = std::abs(u[s]);
        t2 = a > t1 ? t1 : (a > t2 ? a : t2);
        t1 = a > t1 ? a : t1;
      }
      if (class_arc_below(m, t1, t2, best)) return;
      // A segment passes its own bound only if one of its endpoints passes the class's
      // (monotone in the cosine), so its segments are walked from those endpoints: each
      // from the first one that passes (one that passes now passed at any earlier best).
      auto high = [&](int64_t s) { return ee_mix_bound(cwmin[m], cwmax[m], u[s], u[s]) >= best; };
      for (int64_t s = s0; s < s1; ++s) {
        if (!high(s)) continue;
        for (int64_t k = inc_ptr[s]; k < inc_ptr[s + 1]; ++k) {
          const int64_t e = inc_end[k].seg, o = inc_end[k].other;
          if (!(o < s && high(o))) segment(e);  // else walked from o
        }
      }
    }
  }

  // ee_arc_below for every segment of class m at once, from the two largest |u| of its
  // slots (t1 ≥ t2; NaN makes it false): each segment's bᵀG⁻¹b = p u_k² − 2q u_k u_l + r u_l²
  // is at most P(t1² + t2²) + 2Q t1 t2 (P, Q: the class's largest p or r and |q|), and its
  // slack term sl(|u_k| + |u_l|) at most sl(t1 + t2); one more sl covers the rounding of
  // this bound. A class with a segment without an arc bound (NaN, see ee_arc) is never
  // skipped here. On random 128-d data most classes the marks visit end here, where the
  // bound of their largest cosine (ee_mix_bound, × the largest 1/‖v‖ ≈ √2) let them through.
  bool class_arc_below(int64_t m, T t1, T t2, T best) const {
    const T P = arc_p[m], Q = arc_q[m];
    if (!(P >= T(0))) return false;  // NaN: some segment has no arc bound
    const T sl = T(4096) * std::numeric_limits<T>::epsilon();
    const T lo = best - sl * (t1 + t2);
    const T b2 = P * (t1 * t1 + t2 * t2) + T(2) * Q * t1 * t2;
    return lo > T(0) && b2 * (T(1) + 2 * sl) < lo * lo;
  }

  // best negative point of anchor-side row u (class c): (cosine, point index), over every
  // other class; the classes' order does not change the pick (ties go by index), only how
  // much the bounds skip
  std::pair<T, int64_t> best_negative(const T* u, int64_t c, int64_t first_neg,
                                      int64_t first_slot) const {
    // labels decide who is a negative; NaN rows stay on the first one
    T best = u[first_slot];
    int64_t bq = first_neg;
    const int64_t C = int64_t(cstart.size()) - 1;
    for (int64_t m = 0; m < C; ++m)
      if (m != c) visit_class<false>(u, m, best, bq);
    return {best, bq};
  }

  // The classes other than c (in order) with a slot that one of the points a[k]·Ui + b[k]·Uj
  // marks against fm (seg_marks), into `classes`.
  void marked_classes(const T* a, const T* b, int64_t np, const T* Ui, const T* Uj, T fm,
                      int64_t c, std::vector<int64_t>& marked,
                      std::vector<int64_t>& classes) const {
    if (int64_t(marked.size()) < B) marked.resize(B);
    const int64_t nm = seg_marks(a, b, np, Ui, Uj, slot_kmax.data(), fm, B, marked.data());
    const int64_t own0 = cstart[c], own1 = cstart[c + 1];
    int64_t last = -1;
    for (int64_t t = 0; t < nm; ++t) {
      const int64_t s = marked[t], m = slot_cls[s];
      if (m == last || (s >= own0 && s < own1)) continue;
      last = m;
      classes.push_back(m);
    }
  }

  // best_negative of an original's row u, searched from a floor: its best original negative
  // (the largest cosine outside its class, ee_row_max), which the result can only match or
  // beat. One vectorised pass marks the slots whose bound reaches it (seg_marks with the one
  // point 1·u + 0·u = u) and only their classes are walked, as a synthetic point's (below).
  // A row with a NaN outside its class, or a floor ≤ 0, walks every class (best_negative,
  // whose NaN rules are the reference's).
  std::pair<T, int64_t> best_negative_floored(const T* u, int64_t c, int64_t first_neg,
                                              int64_t first_slot, std::vector<int64_t>& marked,
                                              std::vector<int64_t>& classes) const {
    const int64_t own0 = cstart[c], own1 = cstart[c + 1];
    T floor = -std::numeric_limits<T>::infinity();
    int nan = 0;
    row_max(u, own0, &floor, &nan);
    row_max(u + own1, B - own1, &floor, &nan);
    if (nan || !(floor > T(0))) return best_negative(u, c, first_neg, first_slot);
    const T fm = floor_mark(floor);
    const T one = T(1), zero = T(0);
    marked_classes(&one, &zero, 1, u, u, fm, c, marked, classes);
    T best = floor;
    int64_t bq = kNone;  // found: the floor is one of the row's own entries, and is marked
    for (int64_t m : classes) visit_class<true>(u, m, best, bq);
    classes.clear();
    return {best, bq};
  }

  // The margin below a floor at which a cosine (times its slot's slot_kmax) still marks: room
  // for the rounding of ee_mix_bound, which slot_kmax bounds from above.
  static T floor_mark(T floor) {
    return floor * (T(1) - 64 * std::numeric_limits<T>::epsilon()) -
           4 * std::numeric_limits<T>::min();
  }

  static constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

  // segment_best_above's case of a floor ≤ 0 (or NaN), one point mix(U_i, U_j) with
  // coefficients (a, b): its row into u, then every other class, each on its own bounds,
  // counting only cosines ≥ floor (kNone when none reaches it).
  std::pair<T, int64_t> best_negative_everywhere(const T* Ui, const T* Uj, T a, T b, int64_t c,
                                                 T floor, T* u) const {
    T best = floor;
    int64_t bq = kNone;
    for (int64_t k = 0; k < B; ++k) u[k] = ee_mix_sim(a, b, Ui[k], Uj[k]);
    const int64_t C = int64_t(cstart.size()) - 1;
    for (int64_t m = 0; m < C; ++m)
      if (m != c) visit_class<true>(u, m, best, bq);
    return {best, bq};
  }

  // The largest entry of each group of kGroup slots of row u (B entries) into g (NaN never
  // wins: −inf for a group of NaN).
  void group_maxima(const T* u, T* g) const {
    const int64_t full = B / kGroup;
    for (int64_t k = 0; k < full; ++k) {  // a fixed trip count: unrolled
      const T* v = u + k * kGroup;
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t s = 0; s < kGroup; ++s) m = v[s] > m ? v[s] : m;
      g[k] = m;
    }
    if (full * kGroup < B) {
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t s = full * kGroup; s < B; ++s) m = u[s] > m ? u[s] : m;
      g[full] = m;
    }
  }

  // One thread's buffers for segment_best_above.
  struct Scratch {
    std::vector<T> u;  // B entries
    std::vector<int64_t> groups, kept;  // the marked groups; the kept slots
    std::vector<T> gx, gy, gk;  // the marked groups' entries of Ui, Uj and slot_kmax
    std::vector<int32_t> local;  // per slot, its row among the kept (−1: none); reset after
    std::vector<T> wtop;  // per kept slot, the n points' largest cosine with it
    std::vector<int64_t> cand;   // the segments left by a filter
  };

  // The best negative point (cosine, point index) of each of segment e's n synthetic points,
  // counting only cosines ≥ floor (kNone when none reaches it), into best[k], bq[k]; they
  // share the floor and the endpoints' rows Ui, Uj (and their group maxima Gi, Gj). A
  // negative point's cosine reaches the floor only if one of its segment's endpoints has,
  // times slot_kmax, a cosine that does (ee_mix_bound; for an original, the point itself):
  // such a slot is kept. One vectorised pass over the groups of kGroup slots (seg_marks,
  // ee_closest.h, on the rows' group maxima and group_kmax: an upper bound of each member's
  // mark, the coefficients being ≥ 0) marks the groups that can hold one; their slots,
  // gathered into whole vectors, are then marked by the same kernel. The kept slots' originals
  // are the points' candidates, and so are the segments that end at a kept slot, each from its
  // first kept endpoint: first on its bound from both endpoints' largest cosines
  // (ee_mix_bound), then on the pair-of-arcs bound of the two segments, one test for all
  // n × n pairs of points (ee_arcs_below), then point by point (segment_points). The two
  // filters test against the n points' smallest best after the originals. A floor ≤ 0 (every
  // class visited) goes point by point.
  void segment_best_above(int64_t e, const T* Ui, const T* Uj, const T* Gi, const T* Gj,
                          int64_t c, T floor, T* best, int64_t* bq, Scratch& sc) const {
    const T* a = cu.data() + e * n;
    const T* b = cw.data() + e * n;
    if (!(floor > T(0))) {
      if (int64_t(sc.u.size()) < B) sc.u.resize(B);
      for (int64_t k = 0; k < n; ++k) {
        const auto r = best_negative_everywhere(Ui, Uj, a[k], b[k], c, floor, sc.u.data());
        best[k] = r.first, bq[k] = r.second;
      }
      return;
    }
    for (int64_t k = 0; k < n; ++k) best[k] = floor, bq[k] = kNone;
    if (int64_t(sc.kept.size()) < B) {
      sc.groups.resize(B), sc.kept.resize(B), sc.local.assign(B, -1);
      sc.gx.resize(B + kGroup), sc.gy.resize(B + kGroup), sc.gk.resize(B + kGroup);
      sc.wtop.resize(B + 1);
    }
    const T fm = floor_mark(floor);
    const int64_t ng = int64_t(group_kmax.size());
    const int64_t nm = seg_marks(a, b, n, Gi, Gj, group_kmax.data(), fm, ng, sc.groups.data());
    auto take = [&](int64_t k, T v, int64_t q) {
      if (v > best[k] || (v == best[k] && q < bq[k])) best[k] = v, bq[k] = q;
    };
    const int64_t own0 = cstart[c], own1 = cstart[c + 1];
    // the marked groups' slots gathered into whole vectors (a short last group padded with
    // −inf, which never marks), then marked by the same kernel
    T* gx = sc.gx.data();
    T* gy = sc.gy.data();
    T* gk = sc.gk.data();
    for (int64_t t = 0; t < nm; ++t) {
      const int64_t s0 = sc.groups[t] * kGroup, len = std::min(kGroup, B - s0);
      T* x = gx + t * kGroup;
      T* y = gy + t * kGroup;
      T* k = gk + t * kGroup;
      if (len == kGroup) {  // a fixed size: inline vector moves, not a call
        std::memcpy(x, Ui + s0, kGroup * sizeof(T));
        std::memcpy(y, Uj + s0, kGroup * sizeof(T));
        std::memcpy(k, slot_kmax.data() + s0, kGroup * sizeof(T));
        continue;
      }
      for (int64_t l = 0; l < kGroup; ++l) {
        const bool in = l < len;
        x[l] = in ? Ui[s0 + l] : -std::numeric_limits<T>::infinity();
        y[l] = in ? Uj[s0 + l] : -std::numeric_limits<T>::infinity();
        k[l] = in ? slot_kmax[s0 + l] : T(1);
      }
    }
    int64_t* kept = sc.kept.data();
    const int64_t ns = seg_marks(a, b, n, gx, gy, gk, fm, nm * kGroup, kept);
    int64_t nk = 0;
    for (int64_t t = 0; t < ns; ++t) {
      const int64_t s = sc.groups[kept[t] / kGroup] * kGroup + kept[t] % kGroup;
      if (s >= own0 && s < own1) continue;
      T top = -std::numeric_limits<T>::infinity();  // NaN never wins, as in the marks
      for (int64_t k = 0; k < n; ++k) {
        const T w = ee_mix_sim(a[k], b[k], Ui[s], Uj[s]);
        top = w > top ? w : top;
        take(k, w, order[s]);
      }
      sc.wtop[nk] = top;
      sc.local[s] = int32_t(nk);
      kept[nk++] = s;  // compacted in place (nk ≤ t)
    }
    // The segments that end at a kept slot, each once (from its first kept endpoint): on their
    // bound from both endpoints' largest cosines (ee_mix_bound), then on the pair-of-arcs
    // bound, against the points' smallest best after the originals (it only rises); the
    // few left point by point. The two filters are branch-free passes (about half of the
    // first's candidates fail it, in no order a branch could predict); the second runs in
    // double lanes, per level (arcs_filter, ee_closest.h).
    T lo = best[0];
    for (int64_t k = 1; k < n; ++k) lo = best[k] < lo ? best[k] : lo;
    sc.wtop[nk] = -std::numeric_limits<T>::infinity();  // an endpoint not kept
    if (sc.cand.size() < inc_end.size()) sc.cand.resize(inc_end.size());
    int64_t* cand = sc.cand.data();
    int64_t nc = 0;
    for (int64_t r = 0; r < nk; ++r) {
      const int64_t s = kept[r];
      const T top_s = sc.wtop[r];
      for (int64_t i = inc_ptr[s]; i < inc_ptr[s + 1]; ++i) {
        const IncEnd& ie = inc_end[i];
        const int64_t f = ie.seg, o = ie.other;
        const int32_t ro = sc.local[o];
        // an endpoint not kept has cosines below the floor even times slot_kmax
        const T top_o = sc.wtop[ro >= 0 ? ro : nk];
        const T top = top_o > top_s ? top_o : top_s;
        const bool walked = ro >= 0 && o < s;  // walked from o
        cand[nc] = f;
        nc += !walked & !(ee_mix_bound(ie.wmax, ie.wmax, top, top) < lo);  // top > 0
      }
    }
    const int64_t np =
        arcs_filter(arc[e], arc.data(), Ui, Uj, pu.data(), pw.data(), lo, cand, nc);
    for (int64_t t = 0; t < np; ++t) {
      const int64_t f = cand[t];
      const T ik = Ui[pu[f]], il = Ui[pw[f]], jk = Uj[pu[f]], jl = Uj[pw[f]];
      for (int64_t k = 0; k < n; ++k)
        segment_points(f, ee_mix_sim(a[k], b[k], ik, jk), ee_mix_sim(a[k], b[k], il, jl),
                       best[k], bq[k]);
    }
    for (int64_t r = 0; r < nk; ++r) sc.local[kept[r]] = -1;
  }
};

}  // namespace

// Returns B × 7 int64 rows [p, a_u, a_w, a_k, q_u, q_w, q_k]: the farthest positive p and the
// closest pair (a, q), points as (u, w, k) with λ = k/(n+1) (originals (i, i, n+1)); −1 where
// the anchor has no positive (p) or no negative (the other six).
at::Tensor ee_hphn_mine_cpu(const at::Tensor& x_, const at::Tensor& labels_,
                            const at::Tensor& seg_i_, const at::Tensor& seg_j_, int64_t n,
                            int64_t chunk) {
  check_mine_inputs(x_, labels_, seg_i_, seg_j_, n, chunk);
  auto x = x_.contiguous();
  auto labels = labels_.contiguous();
  auto seg_i = seg_i_.contiguous(), seg_j = seg_j_.contiguous();
  const int64_t B = x.size(0), S = n > 0 ? seg_i.size(0) : 0;
  const int64_t* lab = labels.data_ptr<int64_t>();
  check_segments(lab, B, seg_i, seg_j);
  at::Tensor out = at::full({B, 7}, -1, labels.options());
  if (B == 0) return out;

  // dense classes in label order; members of a class in index order
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lab[a] < lab[b]; });
  std::vector<int64_t> cls(B), cstart{0};
  for (int64_t r = 0; r < B; ++r) {
    if (r > 0 && lab[order[r]] != lab[order[r - 1]]) cstart.push_back(r);
    cls[order[r]] = int64_t(cstart.size()) - 1;
  }
  cstart.push_back(B);
  const int64_t C = int64_t(cstart.size()) - 1;

  Segs segs;
  segs.of_anchor.resize(B);
  std::vector<std::vector<int64_t>> class_segs(C);
  if (S > 0) {
    const int64_t* pi = seg_i.data_ptr<int64_t>();
    const int64_t* pj = seg_j.data_ptr<int64_t>();
    segs.si.assign(pi, pi + S);
    segs.sj.assign(pj, pj + S);
    segs.cls.resize(S);
    for (int64_t e = 0; e < S; ++e) {
      const int64_t i = pi[e];
      segs.cls[e] = cls[i];
      class_segs[cls[i]].push_back(e);
      segs.of_anchor[i].push_back(e);  // (i, ·) first, then (·, i): the reference's order
    }
    for (int64_t e = 0; e < S; ++e) segs.of_anchor[pj[e]].push_back(e);
  }
  // first original of another class, per class (−1: the class has no negative), and its slot
  std::vector<int64_t> slot(B), first_neg(C, -1), first_slot(C, -1);
  for (int64_t r = 0; r < B; ++r) slot[order[r]] = r;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < B; ++k)
      if (cls[k] != c) { first_neg[c] = k, first_slot[c] = slot[k]; break; }

  int64_t* o = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ee_hphn_mine_cpu", [&] {
    using T = scalar_t;
    // X̂ in slot order: U's columns are then class-contiguous
    at::Tensor xo = x.index_select(0, at::from_blob(order.data(), {B}, labels.options()));
    if (S == 0) {  // no synthetic point: half of U serves (batch_hard_self.h)
      BatchHardSelf<T>{xo, order, cstart, first_neg, chunk}.run(n + 1, o);
      return;
    }
    Miner<T> mn{x.data_ptr<T>(), lab, B, x.size(1), n, order, cstart, class_segs, segs};
    mn.pu.resize(S);
    mn.pw.resize(S);
    for (int64_t e = 0; e < S; ++e) mn.pu[e] = slot[segs.si[e]], mn.pw[e] = slot[segs.sj[e]];
    mn.cu.resize(S * n);
    mn.cw.resize(S * n);
    mn.wmin.resize(S);
    mn.wmax.resize(S);
    mn.arc.resize(S);
    at::parallel_for(0, S, 64, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t i = segs.si[e], j = segs.sj[e];
        const T guu = mn.dot(i, i), guw = mn.dot(i, j), gww = mn.dot(j, j);
        mn.arc[e] = ee_arc(guu, guw, gww);
        for (int64_t t = 0; t < n; ++t) {
          const T lam = ee_lambda<T>(t + 1, n);
          const T nv = ee_point_norm(lam, guu, guw, gww);
          mn.cu[e * n + t] = lam / nv;
          mn.cw[e * n + t] = (T(1) - lam) / nv;
          const T w = mn.cu[e * n + t] + mn.cw[e * n + t];
          mn.wmin[e] = t == 0 ? w : std::min(mn.wmin[e], w);
          mn.wmax[e] = t == 0 ? w : std::max(mn.wmax[e], w);
        }
      }
    });
    mn.cwmin.assign(C, T(0));
    mn.cwmax.assign(C, T(0));
    for (int64_t c = 0; c < C; ++c)
      for (int64_t e : class_segs[c]) {
        const bool first = e == class_segs[c].front();
        mn.cwmin[c] = first ? mn.wmin[e] : std::min(mn.cwmin[c], mn.wmin[e]);
        mn.cwmax[c] = first ? mn.wmax[e] : std::max(mn.cwmax[c], mn.wmax[e]);
      }
    mn.arc_p.assign(C, std::numeric_limits<T>::quiet_NaN());
    mn.arc_q.assign(C, T(0));
    for (int64_t c = 0; c < C; ++c) {
      T P = T(0), Q = T(0);
      bool ok = !class_segs[c].empty();
      for (int64_t e : class_segs[c]) {
        const EeArc<T>& a = mn.arc[e];
        ok = ok && a.p >= T(0) && a.r >= T(0) && std::abs(a.q) >= T(0);  // false on NaN
        P = std::max(P, std::max(a.p, a.r));
        Q = std::max(Q, std::abs(a.q));
      }
      if (ok) mn.arc_p[c] = P, mn.arc_q[c] = Q;
    }
    mn.inc_ptr.assign(B + 1, 0);
    for (int64_t e = 0; e < S; ++e) {
      ++mn.inc_ptr[mn.pu[e] + 1];
      if (mn.pw[e] != mn.pu[e]) ++mn.inc_ptr[mn.pw[e] + 1];
    }
    for (int64_t k = 0; k < B; ++k) mn.inc_ptr[k + 1] += mn.inc_ptr[k];
    mn.inc_end.resize(mn.inc_ptr[B]);
    {
      std::vector<int64_t> fill(mn.inc_ptr.begin(), mn.inc_ptr.end() - 1);
      auto add = [&](int64_t s, int64_t e, int64_t o) {
        mn.inc_end[fill[s]++] = {e, int32_t(o), mn.wmax[e]};
      };
      for (int64_t e = 0; e < S; ++e) {
        add(mn.pu[e], e, mn.pw[e]);
        if (mn.pw[e] != mn.pu[e]) add(mn.pw[e], e, mn.pu[e]);
      }
    }
    mn.slot_kmax.resize(B);
    mn.slot_cls.resize(B);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = cstart[c]; s < cstart[c + 1]; ++s) {
        T w = T(1);  // the largest 1/‖v‖ of the segments the slot ends, at least 1
        for (int64_t k = mn.inc_ptr[s]; k < mn.inc_ptr[s + 1]; ++k)
          w = std::max(w, mn.inc_end[k].wmax);
        mn.slot_kmax[s] = w * (T(1) + 32 * std::numeric_limits<T>::epsilon());
        mn.slot_cls[s] = c;
      }
    const int64_t ng = (B + Miner<T>::kGroup - 1) / Miner<T>::kGroup;
    mn.group_kmax.assign(ng, T(0));
    for (int64_t s = 0; s < B; ++s) {
      T& g = mn.group_kmax[s / Miner<T>::kGroup];
      g = std::max(g, mn.slot_kmax[s]);
    }
    for (int64_t c0 = 0; c0 < C;) {
      // a chunk of whole classes: at least one, then while the rows fit in `chunk`
      int64_t c1 = c0 + 1;
      while (c1 < C && cstart[c1 + 1] - cstart[c0] <= chunk) ++c1;
      const int64_t r0 = cstart[c0], nr = cstart[c1] - r0;
      std::vector<int64_t> rows(order.begin() + r0, order.begin() + r0 + nr);
      std::vector<int64_t> local(B, -1);
      for (int64_t r = 0; r < nr; ++r) local[rows[r]] = r;
      // nr × B, row r: original rows[r] (slot r0 + r); columns in slot order
      at::Tensor U = at::mm(xo.narrow(0, r0, nr), xo.t()).contiguous();
      const T* Up = U.data_ptr<T>();
      // per row, the largest entry of each group of slots
      std::vector<T> GU(nr * ng);
      at::parallel_for(0, nr, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) mn.group_maxima(Up + r * B, GU.data() + r * ng);
      });

      // the chunk's anchor-side points: its originals, then (segment, k) of its classes
      std::vector<int64_t> pt_seg;  // segment of synthetic point r − nr
      std::vector<int64_t> seg_base(S, -1);  // first synthetic point of a chunk segment
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t e : class_segs[c]) {
          seg_base[e] = nr + int64_t(pt_seg.size());
          for (int64_t t = 0; t < n; ++t) pt_seg.push_back(e);
        }
      const int64_t npts = nr + int64_t(pt_seg.size());
      std::vector<T> best(npts);
      std::vector<int64_t> bestq(npts, -1);
      // Two passes. First the originals, each from its best original negative
      // (best_negative_floored). Then the synthetic points from a floor, a segment's n points
      // together (segment_best_above): a point can only change an owner's pick (its
      // segment's two endpoints, both anchors of this chunk) if it reaches the smaller of
      // their best cosines (ties with the floor still count, for the index tie rules).
      at::parallel_for(0, nr, 8, [&](int64_t p0, int64_t p1) {
        std::vector<int64_t> marked, classes;
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t c = cls[rows[p]];
          if (first_neg[c] < 0) continue;
          const auto r =
              mn.best_negative_floored(Up + p * B, c, first_neg[c], first_slot[c], marked,
                                       classes);
          best[p] = r.first;
          bestq[p] = r.second;
        }
      });
      // The floors rise as the segments are searched: an anchor's best so far over its
      // original and its searched synthetic points (abest) is at most its final best, so a
      // point below the smaller of its endpoints' abest changes neither pick, and one that
      // ties or beats it is still searched exactly. Any value abest held serves, so the
      // segments run in parallel (a thread's range is consecutive segments, mostly of one
      // class) with relaxed atomic loads and maxima: the picks do not depend on the timing.
      std::vector<std::atomic<T>> abest(nr);
      for (int64_t r = 0; r < nr; ++r) abest[r].store(best[r], std::memory_order_relaxed);
      auto raise = [](std::atomic<T>& a, T v) {  // NaN never raises
        T cur = a.load(std::memory_order_relaxed);
        while (v > cur && !a.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {}
      };
      std::vector<int64_t> chunk_segs;
      for (int64_t c = c0; c < c1; ++c)
        if (first_neg[c] >= 0)
          chunk_segs.insert(chunk_segs.end(), class_segs[c].begin(), class_segs[c].end());
      at::parallel_for(0, int64_t(chunk_segs.size()), 1, [&](int64_t g0, int64_t g1) {
        typename Miner<T>::Scratch sc;
        std::vector<int64_t> bq(n);
        for (int64_t g = g0; g < g1; ++g) {
          const int64_t e = chunk_segs[g], p = seg_base[e];
          const int64_t li = local[segs.si[e]], lj = local[segs.sj[e]];
          const T floor = std::min(abest[li].load(std::memory_order_relaxed),
                                   abest[lj].load(std::memory_order_relaxed));
          mn.segment_best_above(e, Up + li * B, Up + lj * B, GU.data() + li * ng,
                                GU.data() + lj * ng, segs.cls[e], floor,
                                best.data() + p, bq.data(), sc);
          for (int64_t t = 0; t < n; ++t) {
            bestq[p + t] = bq[t] == Miner<T>::kNone ? -1 : bq[t];
            if (bestq[p + t] < 0) continue;
            raise(abest[li], best[p + t]);
            raise(abest[lj], best[p + t]);
          }
        }
      });

      at::parallel_for(0, nr, 16, [&](int64_t q0, int64_t q1) {
        for (int64_t r = q0; r < q1; ++r) {
          const int64_t i = rows[r], c = cls[i];
          int64_t* oi = o + i * 7;
          // farthest positive: the smallest cosine, lowest column on ties
          const T* Ui = Up + r * B;
          for (int64_t s = cstart[c]; s < cstart[c + 1]; ++s) {
            const int64_t j = order[s];  // class members in index order
            if (j == i) continue;
            if (oi[0] < 0 || Ui[s] < Ui[slot[oi[0]]]) oi[0] = j;
          }
          if (bestq[r] < 0) continue;
          // closest pair: x_i, then its segments' points; ties to the lower negative index
          int64_t ba = r;
          auto better = [&](int64_t p) {  // a point below its floor (bestq −1) has no pick
            return bestq[p] >= 0 &&
                   (best[p] > best[ba] || (best[p] == best[ba] && bestq[p] < bestq[ba]));
          };
          for (int64_t e : segs.of_anchor[i])
            for (int64_t t = 0; t < n; ++t)
              if (better(seg_base[e] + t)) ba = seg_base[e] + t;
          if (ba < nr) {
            oi[1] = oi[2] = i;
            oi[3] = n + 1;
          } else {
            const int64_t e = pt_seg[ba - nr];
            oi[1] = segs.si[e];
            oi[2] = segs.sj[e];
            oi[3] = ba - seg_base[e] + 1;
          }
          const int64_t q = bestq[ba];
          if (q < B) {
            oi[4] = oi[5] = q;
            oi[6] = n + 1;
          } else {
            const int64_t e = (q - B) / n;
            oi[4] = segs.si[e];
            oi[5] = segs.sj[e];
            oi[6] = (q - B) % n + 1;
          }
        }
      });
      c0 = c1;
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // HPHN triplet mining with Embedding Expansion on unit rows x (no gradient): per anchor
  // [p, a_u, a_w, a_k, q_u, q_w, q_k] (see ee_mining_cpu.cpp). seg_i/seg_j: the positive
  // segments in the reference's order; n_points synthetic points on each; rows are
  // streamed in chunks of whole classes of about `chunk` rows.
  m.def("ee_hphn_mine(Tensor x, Tensor labels, Tensor seg_i, Tensor seg_j, int n_points, "
        "int chunk) -> Tensor",
        METRIX_HOST_READS);
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) { m.impl("ee_hphn_mine", &ee_hphn_mine_cpu); }

}  // namespace metrix_ops
