/* Compiled kernels of the clustering pipeline, loaded with ctypes (torch_modularity/_native.py).
 *
 * Plain C (no Python or numpy headers). Each kernel reproduces a numpy implementation that
 * stays in the package as the reference and the fallback (used when no C compiler was
 * available at install time):
 *   - tm_refine_dense_f32 / _f64: refine.refine_partition on dense blocks;
 *   - tm_kmeans: spectral.kmeans (k-means++ seeding and Lloyd iterations).
 *
 * Refinement: the algorithm and its floating-point expressions follow refine.py step by step
 * (same gains, same stable candidate order, same halving prefixes), so both choose the same
 * moves up to rounding in the cluster totals. On a few thousand nodes the numpy version spends
 * its time in ~80 small array calls per batch of moves; here a batch costs a pass over the
 * group's nodes and the moved nodes' weight rows and columns.
 *
 * Layout: labels and degrees in node order; e[i * k + c] is node i's edge weight to cluster c;
 * every block is a C-contiguous (n_dst, n_src) array of |W| (float or double).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The arithmetic loops are compiled twice, for AVX2 and for the x86-64 baseline (SSE2), and
 * the CPU picks at load time (GCC function multi-versioning). Vectorizing across independent
 * points does not change any result: no reassociation, no fused multiply-add (setup.py). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TM_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TM_VECTOR_CLONES
#endif

/* Stable merge sort of idx[0..m) by key descending (ties keep ascending position). */
static void sort_desc(int64_t *idx, int64_t *tmp, int64_t m, const double *key) {
    if (m < 2) return;
    int64_t h = m / 2;
    sort_desc(idx, tmp, h, key);
    sort_desc(idx + h, tmp, m - h, key);
    int64_t i = 0, j = h, o = 0;
    while (i < h && j < m) {
        if (key[idx[j]] > key[idx[i]]) tmp[o++] = idx[j++];
        else tmp[o++] = idx[i++];
    }
    while (i < h) tmp[o++] = idx[i++];
    while (j < m) tmp[o++] = idx[j++];
    memcpy(idx, tmp, (size_t)m * sizeof(int64_t));
}

static int cmp_i64(const void *x, const void *y) {
    int64_t a = *(const int64_t *)x, b = *(const int64_t *)y;
    return (a > b) - (a < b);
}

static double ncut_from_totals(const double *w_in, const double *vol, int64_t k, double eps) {
    double s = 0.0;
    for (int64_t c = 0; c < k; c++) {
        double cut = vol[c] - w_in[c];
        s += (cut > 0.0 ? cut : 0.0) / (vol[c] + eps);
    }
    return s;
}

/* Totals after moving batch[0..m) (positions in the group) from a[] to b[]; as _totals_after. */
static void totals_after(const int64_t *batch, int64_t m, const int64_t *nodes, const int64_t *a,
                         const int64_t *b, const double *e, const double *deg, int64_t k,
                         const double *w_in, const double *vol, double *new_w, double *new_vol,
                         double *s_out, double *s_in, double *v_out, double *v_in) {
    memset(s_out, 0, (size_t)k * sizeof(double));
    memset(s_in, 0, (size_t)k * sizeof(double));
    memset(v_out, 0, (size_t)k * sizeof(double));
    memset(v_in, 0, (size_t)k * sizeof(double));
    for (int64_t t = 0; t < m; t++) {
        int64_t p = batch[t], i = nodes[p];
        s_out[a[p]] += e[i * k + a[p]];
        s_in[b[p]] += e[i * k + b[p]];
        v_out[a[p]] += deg[i];
        v_in[b[p]] += deg[i];
    }
    for (int64_t c = 0; c < k; c++) {
        new_w[c] = w_in[c] - 2.0 * s_out[c] + 2.0 * s_in[c];
        new_vol[c] = vol[c] - v_out[c] + v_in[c];
    }
}

/* Whether moving batch[0..m) gives an n-cut below current (scratch: 6 k doubles). */
static int lowers_ncut(const int64_t *batch, int64_t m, const int64_t *nodes, const int64_t *a, const int64_t *b,
                       const double *e, const double *deg, int64_t k, const double *w_in, const double *vol,
                       double *scratch, double current, double eps) {
    double *new_w = scratch, *new_vol = scratch + k;
    totals_after(batch, m, nodes, a, b, e, deg, k, w_in, vol, new_w, new_vol, scratch + 2 * k, scratch + 3 * k,
                 scratch + 4 * k, scratch + 5 * k);
    return ncut_from_totals(new_w, new_vol, k, eps) < current - 1e-12;
}

#define DEFINE_REFINE(NAME, T)                                                                          \
int NAME(int64_t n_layers, const int64_t *sizes, const int64_t *offsets, int64_t n_blocks,            \
         const int64_t *bsrc, const int64_t *bdst, const T *const *bdata, int64_t n_groups,            \
         const int64_t *group_ptr, const int64_t *group_layers, int64_t *labels, const double *deg,    \
         int64_t k, int64_t max_passes, int64_t inner_passes, double eps, double *out_values) {        \
    int64_t n = offsets[n_layers];                                                                     \
    int status = 0;                                                                                    \
    double *e = calloc((size_t)(n * k), sizeof(double));                                               \
    double *work = malloc((size_t)(17 * k + 8) * sizeof(double));                                      \
    int64_t *counts = calloc((size_t)k, sizeof(int64_t));                                              \
    int64_t *left = malloc((size_t)k * sizeof(int64_t));                                               \
    int64_t *nodes = malloc((size_t)(n + 1) * sizeof(int64_t));                                        \
    int64_t *layer_of = malloc((size_t)(n + 1) * sizeof(int64_t));                                     \
    int64_t *a = malloc((size_t)(n + 1) * sizeof(int64_t));                                            \
    int64_t *bb = malloc((size_t)(n + 1) * sizeof(int64_t));                                           \
    double *best = malloc((size_t)(n + 1) * sizeof(double));                                           \
    int64_t *cand = malloc((size_t)(n + 1) * sizeof(int64_t));                                         \
    int64_t *tmp = malloc((size_t)(n + 1) * sizeof(int64_t));                                          \
    int64_t *keep = malloc((size_t)(n + 1) * sizeof(int64_t));                                         \
    double *quad = malloc((size_t)(4 * k) * sizeof(double));                                          \
    int64_t *col_local = malloc((size_t)(3 * (n + 1)) * sizeof(int64_t));                              \
    int64_t *col_old = col_local + (n + 1), *col_new = col_local + 2 * (n + 1);                        \
    if (!e || !work || !counts || !left || !nodes || !layer_of || !a || !bb || !best || !cand ||        \
        !tmp || !keep || !quad || !col_local) {                                                         \
        status = -1;                                                                                   \
        goto done;                                                                                     \
    }                                                                                                  \
    double *w_in = work, *vol = work + k, *new_w = work + 2 * k, *new_vol = work + 3 * k;              \
    double *s_out = work + 4 * k, *s_in = work + 5 * k, *v_out = work + 6 * k, *v_in = work + 7 * k;   \
    double *pw = work + 8 * k, *volp = work + 9 * k, *gains = work + 10 * k, *scratch = work + 11 * k;  \
    for (int64_t l = 0; l < n_layers; l++)                                                             \
        for (int64_t i = offsets[l]; i < offsets[l + 1]; i++) layer_of[i] = l;                         \
    /* Edge weight of every node to every cluster: one pass over each block. A row's weights   \
     * go to its node by source label (scalar) and, whole, into the sums by destination label  \
     * (a contiguous, vectorizable add), which are then transposed into the source nodes. */    \
    for (int64_t bi = 0; bi < n_blocks; bi++) {                                                        \
        const T *w = bdata[bi];                                                                        \
        int64_t ns = sizes[bsrc[bi]], nd = sizes[bdst[bi]];                                            \
        int64_t os = offsets[bsrc[bi]], od = offsets[bdst[bi]];                                        \
        const int64_t *lab_s = labels + os;                                                            \
        double *by_dst = calloc((size_t)(k * ns), sizeof(double));                                     \
        if (!by_dst) {                                                                                 \
            status = -1;                                                                               \
            goto done;                                                                                 \
        }                                                                                              \
        for (int64_t r = 0; r < nd; r++) {                                                             \
            const T *row = w + r * ns;                                                                 \
            double *er = e + (od + r) * k;                                                             \
            double *acc = by_dst + labels[od + r] * ns;                                                \
            /* Four interleaved sets of cluster sums: consecutive weights of one label would      \
             * otherwise wait on each other's additions. */                                       \
            memset(quad, 0, (size_t)(4 * k) * sizeof(double));                                        \
            int64_t j4 = ns - ns % 4;                                                                  \
            for (int64_t j = 0; j < j4; j += 4) {                                                      \
                quad[lab_s[j]] += (double)row[j];                                                      \
                quad[k + lab_s[j + 1]] += (double)row[j + 1];                                          \
                quad[2 * k + lab_s[j + 2]] += (double)row[j + 2];                                      \
                quad[3 * k + lab_s[j + 3]] += (double)row[j + 3];                                      \
            }                                                                                          \
            for (int64_t j = j4; j < ns; j++) quad[lab_s[j]] += (double)row[j];                        \
            for (int64_t c = 0; c < k; c++) er[c] += (quad[c] + quad[k + c]) + (quad[2 * k + c] + quad[3 * k + c]); \
            for (int64_t j = 0; j < ns; j++) acc[j] += (double)row[j];                                 \
        }                                                                                              \
        for (int64_t j = 0; j < ns; j++)                                                               \
            for (int64_t c = 0; c < k; c++) e[(os + j) * k + c] += by_dst[c * ns + j];                 \
        free(by_dst);                                                                                  \
    }                                                                                                  \
    memset(w_in, 0, (size_t)(2 * k) * sizeof(double));                                                \
    for (int64_t i = 0; i < n; i++) {                                                                  \
        vol[labels[i]] += deg[i];                                                                      \
        w_in[labels[i]] += e[i * k + labels[i]];                                                       \
        counts[labels[i]] += 1;                                                                        \
    }                                                                                                  \
    double current = ncut_from_totals(w_in, vol, k, eps);                                              \
    out_values[1] = current;                                                                           \
    for (int64_t pass = 0; pass < max_passes; pass++) {                                                \
        int improved = 0;                                                                              \
        for (int64_t g = 0; g < n_groups; g++) {                                                       \
            int64_t ng = 0;                                                                            \
            for (int64_t q = group_ptr[g]; q < group_ptr[g + 1]; q++) {                                \
                int64_t l = group_layers[q];                                                           \
                for (int64_t i = offsets[l]; i < offsets[l + 1]; i++) nodes[ng++] = i;                 \
            }                                                                                          \
            if (ng == 0) continue;                                                                     \
            for (int64_t inner = 0; inner < inner_passes; inner++) {                                   \
                /* Best single move of every node (as refine.py: gain_b - loss_a). */                  \
                int64_t m = 0;                                                                         \
                for (int64_t c = 0; c < k; c++) {                                                      \
                    pw[c] = -(w_in[c] / (vol[c] + eps));                                               \
                    volp[c] = vol[c] + eps;                                                            \
                }                                                                                      \
                for (int64_t p = 0; p < ng; p++) {                                                     \
                    int64_t i = nodes[p], ai = labels[i];                                              \
                    const double *ei = e + i * k;                                                      \
                    double d = deg[i];                                                                 \
                    double vol_a_new = vol[ai] - d;                                                    \
                    double loss = w_in[ai] / (vol[ai] + eps);                                          \
                    if (vol_a_new > 0) loss -= (w_in[ai] - 2 * ei[ai]) / (vol_a_new + eps);            \
                    /* All k gains first (a vectorizable loop), then the best other cluster. */         \
                    for (int64_t c = 0; c < k; c++) {                                                  \
                        double t = pw[c] * d;                                                          \
                        t += ei[c];                                                                    \
                        t += ei[c];                                                                    \
                        gains[c] = t / (volp[c] + d);                                                  \
                    }                                                                                  \
                    gains[ai] = -INFINITY;                                                             \
                    double gmax = gains[0];                                                            \
                    int64_t gb = 0;                                                                    \
                    for (int64_t c = 1; c < k; c++)                                                    \
                        if (gains[c] > gmax) { gmax = gains[c]; gb = c; }                              \
                    a[p] = ai;                                                                         \
                    bb[p] = gb;                                                                        \
                    best[p] = gmax - loss;                                                             \
                    if (best[p] > 1e-12) cand[m++] = p;                                                \
                }                                                                                      \
                if (m == 0) break;                                                                     \
                sort_desc(cand, tmp, m, best);                                                         \
                /* Longest improving prefix of length m, m/2, ..., 1 (as _best_prefix). */            \
                int64_t n_ends = 0;                                                                    \
                for (int64_t s = m; s > 0; s /= 2) n_ends++;                                           \
                int64_t *batch = NULL, nb = 0;                                                         \
                int all_valid = 1;                                                                     \
                memset(left, 0, (size_t)k * sizeof(int64_t));                                          \
                for (int64_t t = 0; t < m; t++) left[a[cand[t]]] += 1;                                 \
                for (int64_t c = 0; c < k; c++) if (left[c] >= counts[c]) all_valid = 0;               \
                for (int64_t idx = 0; idx < n_ends && batch == NULL; idx++) {                          \
                    int64_t size = m >> idx;                                                           \
                    int valid = all_valid;                                                             \
                    if (!valid) {                                                                      \
                        memset(left, 0, (size_t)k * sizeof(int64_t));                                  \
                        for (int64_t t = 0; t < size; t++) {                                           \
                            left[a[cand[t]]] -= 1;                                                     \
                            left[bb[cand[t]]] += 1;                                                    \
                        }                                                                              \
                        valid = 1;                                                                     \
                        for (int64_t c = 0; c < k; c++) if (counts[c] + left[c] <= 0) valid = 0;       \
                    }                                                                                  \
                    if (valid) {                                                                        \
                        if (lowers_ncut(cand, size, nodes, a, bb, e, deg, k, w_in, vol, scratch,        \
                                        current, eps)) {                                                \
                            batch = cand;                                                               \
                            nb = size;                                                                  \
                        }                                                                               \
                        continue;                                                                       \
                    }                                                                                   \
                    /* Keep the moves that leave every cluster non-empty (_keep_nonempty). */        \
                    for (int64_t c = 0; c < k; c++) left[c] = counts[c];                               \
                    int64_t nk = 0;                                                                    \
                    for (int64_t t = 0; t < size; t++) {                                               \
                        int64_t p = cand[t];                                                           \
                        if (left[a[p]] > 1) {                                                          \
                            left[a[p]] -= 1;                                                           \
                            left[bb[p]] += 1;                                                          \
                            keep[nk++] = p;                                                            \
                        }                                                                              \
                    }                                                                                  \
                    if (nk > 0 && lowers_ncut(keep, nk, nodes, a, bb, e, deg, k, w_in, vol, scratch,    \
                                              current, eps)) {                                          \
                        batch = keep;                                                                   \
                        nb = nk;                                                                        \
                    }                                                                                   \
                }                                                                                      \
                if (batch == NULL) break;                                                              \
                totals_after(batch, nb, nodes, a, bb, e, deg, k, w_in, vol, new_w, new_vol,            \
                             s_out, s_in, v_out, v_in);                                                \
                memcpy(w_in, new_w, (size_t)k * sizeof(double));                                       \
                memcpy(vol, new_vol, (size_t)k * sizeof(double));                                      \
                current = ncut_from_totals(w_in, vol, k, eps);                                         \
                /* Move the nodes; their neighbours' edge totals change by the moved weights.           \
                 * Moved destinations are rows of a block (contiguous); moved sources are               \
                 * columns, updated row by row over the block for all of them at once (in               \
                 * ascending order), so each cache line of the block is read at most once. */           \
                memcpy(tmp, batch, (size_t)nb * sizeof(int64_t));                                       \
                qsort(tmp, (size_t)nb, sizeof(int64_t), cmp_i64);                                       \
                for (int64_t t = 0; t < nb; t++) {                                                      \
                    int64_t p = tmp[t], i = nodes[p];                                                   \
                    labels[i] = bb[p];                                                                  \
                    counts[a[p]] -= 1;                                                                  \
                    counts[bb[p]] += 1;                                                                 \
                }                                                                                       \
                for (int64_t bi = 0; bi < n_blocks; bi++) {                                             \
                    const T *w = bdata[bi];                                                             \
                    int64_t ns = sizes[bsrc[bi]], nd = sizes[bdst[bi]];                                 \
                    int64_t n_cols = 0;                                                                 \
                    for (int64_t t = 0; t < nb; t++) {                                                  \
                        int64_t p = tmp[t], i = nodes[p], l = layer_of[i], old = a[p], nw = bb[p];      \
                        if (l == bdst[bi]) { /* a row: edges to the source layer */                     \
                            const T *row = w + (i - offsets[l]) * ns;                                   \
                            double *es = e + offsets[bsrc[bi]] * k;                                     \
                            for (int64_t j = 0; j < ns; j++) {                                          \
                                double v = (double)row[j];                                              \
                                es[j * k + old] -= v;                                                   \
                                es[j * k + nw] += v;                                                    \
                            }                                                                           \
                        }                                                                               \
                        if (l == bsrc[bi]) {                                                            \
                            col_local[n_cols] = i - offsets[l];                                         \
                            col_old[n_cols] = old;                                                      \
                            col_new[n_cols] = nw;                                                       \
                            n_cols++;                                                                   \
                        }                                                                               \
                    }                                                                                   \
                    if (n_cols == 0) continue;                                                          \
                    double *ed = e + offsets[bdst[bi]] * k;                                             \
                    for (int64_t r = 0; r < nd; r++) {                                                  \
                        const T *row = w + r * ns;                                                      \
                        double *er = ed + r * k;                                                        \
                        for (int64_t t = 0; t < n_cols; t++) {                                          \
                            double v = (double)row[col_local[t]];                                       \
                            er[col_old[t]] -= v;                                                        \
                            er[col_new[t]] += v;                                                        \
                        }                                                                               \
                    }                                                                                   \
                }                                                                                       \
                improved = 1;                                                                          \
            }                                                                                          \
        }                                                                                              \
        if (!improved) break;                                                                          \
    }                                                                                                  \
    out_values[0] = current;                                                                           \
done:                                                                                                  \
    free(e); free(work); free(counts); free(left); free(nodes); free(layer_of);                        \
    free(a); free(bb); free(best); free(cand); free(tmp); free(keep); free(quad); free(col_local);      \
    return status;                                                                                     \
}

DEFINE_REFINE(tm_refine_dense_f32, float)
DEFINE_REFINE(tm_refine_dense_f64, double)

/* ------------------------------------------------------------------------------------------ */
/* k-means++ seeding and Lloyd iterations: spectral.kmeans in C.
 *
 * Same algorithm and expressions as spectral._kmeans_plusplus / spectral._lloyd (squared
 * distances as |c|^2 - 2 x.c (+ |x|^2), the restarts' potentials in one running sum, the same
 * stopping rules); the random numbers are drawn by the caller (numpy's Generator) and passed
 * in, so a seed gives the same centres as the numpy version up to rounding.
 * x is (n, d) C-contiguous float64.
 */

/* out[i * k + c] = |c_c|^2 - 2 x_i . c_c for every point and centre (centres (k, d)). */
TM_VECTOR_CLONES static void distances_less_norms(int64_t n, int64_t d, int64_t k, const double *x,
                                                  const double *centres, double *ct, double *c2, double *out) {
    for (int64_t c = 0; c < k; c++) {
        double s = 0.0;
        for (int64_t j = 0; j < d; j++) {
            ct[j * k + c] = -2.0 * centres[c * d + j];
            s += centres[c * d + j] * centres[c * d + j];
        }
        c2[c] = s;
    }
    for (int64_t i = 0; i < n; i++) {
        double *o = out + i * k;
        const double *xi = x + i * d;
        for (int64_t c = 0; c < k; c++) o[c] = 0.0;
        for (int64_t j = 0; j < d; j++) {
            const double v = xi[j], *row = ct + j * k;
            for (int64_t c = 0; c < k; c++) o[c] += v * row[c];
        }
        for (int64_t c = 0; c < k; c++) o[c] += c2[c];
    }
}

static int64_t argmin_row(const double *row, int64_t k) {
    int64_t b = 0;
    for (int64_t c = 1; c < k; c++)
        if (row[c] < row[b]) b = c;
    return b;
}

/* Squared distances of every point to point p, clamped at 0 (as _kmeans_plusplus's sq_dist:
 * -2 x_p . x_i + |x_p|^2 + |x_i|^2). xt2 is -2 x^T, (d, n): the loop runs across points,
 * independent and vectorizable, with the same order of additions per point. */
TM_VECTOR_CLONES static void sq_dist_to(int64_t n, int64_t d, const double *x, const double *xt2,
                                        const double *sq_norms, int64_t p, double *out) {
    const double *xp = x + p * d;
    for (int64_t i = 0; i < n; i++) out[i] = 0.0;
    for (int64_t j = 0; j < d; j++) {
        const double v = xp[j], *col = xt2 + j * n;
        for (int64_t i = 0; i < n; i++) out[i] += v * col[i];
    }
    const double sp = sq_norms[p];
    for (int64_t i = 0; i < n; i++) {
        double s = out[i] + sp;
        s += sq_norms[i];
        out[i] = s > 0.0 ? s : 0.0;
    }
}

/* Returns 1 when a restart's potential is all zero (every point on a centre): the caller
 * then runs the numpy version, which draws a distinct point at random. */
static int kmeans_plusplus(int64_t n, int64_t d, const double *x, const double *xt2, const double *sq_norms, int64_t k,
                           int64_t n_seeds, int64_t trials, const int64_t *first, const double *uniforms,
                           int64_t *centres, double *closest, double *cum, double *dist, double *total) {
    for (int64_t r = 0; r < n_seeds; r++) {
        centres[r * k] = first[r];
        sq_dist_to(n, d, x, xt2, sq_norms, first[r], closest + r * n);
    }
    for (int64_t c = 1; c < k; c++) {
        double run = 0.0;
        for (int64_t t = 0; t < n_seeds * n; t++) {
            run += closest[t];
            cum[t] = run;
        }
        for (int64_t r = 0; r < n_seeds; r++) {
            double s = 0.0;
            for (int64_t i = 0; i < n; i++) s += closest[r * n + i];
            total[r] = s;
            if (!(s > 0.0)) return 1;
        }
        for (int64_t r = 0; r < n_seeds; r++) {
            double best_pot = INFINITY;
            int64_t best_cand = 0;
            double *best_row = NULL;
            for (int64_t t = 0; t < trials; t++) {
                double draw = uniforms[((c - 1) * n_seeds + r) * trials + t] * total[r];
                draw += cum[r * n + n - 1] - total[r];
                /* searchsorted(cum, draw, side="left") over all restarts, then this restart's index */
                int64_t lo = 0, hi = n_seeds * n;
                while (lo < hi) {
                    int64_t mid = lo + (hi - lo) / 2;
                    if (cum[mid] < draw) lo = mid + 1;
                    else hi = mid;
                }
                int64_t cand = lo - r * n;
                if (cand < 0) cand = 0;
                if (cand > n - 1) cand = n - 1;
                double *row = dist + t * n;
                sq_dist_to(n, d, x, xt2, sq_norms, cand, row);
                double pot = 0.0;
                for (int64_t i = 0; i < n; i++) {
                    double m = closest[r * n + i];
                    if (row[i] > m) row[i] = m;
                    pot += row[i];
                }
                if (pot < best_pot) {
                    best_pot = pot;
                    best_cand = cand;
                    best_row = row;
                }
            }
            if (best_row == NULL) return 1; /* non-finite potentials (the caller checks x) */
            centres[r * k + c] = best_cand;
            memcpy(closest + r * n, best_row, (size_t)n * sizeof(double));
        }
    }
    return 0;
}

/* One restart of Lloyd from centres (k, d), as spectral._lloyd; fills labels, dist (n, k:
 * squared distances) and returns the inertia. */
static double lloyd(int64_t n, int64_t d, int64_t k, const double *x, const double *sq_norms, double *centres,
                    int64_t max_iter, double tol, int64_t min_changes, int64_t *labels, int64_t *new_labels,
                    double *dist, double *sums, int64_t *counts, double *ct, double *c2, double *fresh) {
    int have_labels = 0;
    for (int64_t it = 0; it < max_iter; it++) {
        distances_less_norms(n, d, k, x, centres, ct, c2, dist);
        int64_t moved = 0;
        for (int64_t i = 0; i < n; i++) {
            new_labels[i] = argmin_row(dist + i * k, k);
            if (have_labels && new_labels[i] != labels[i]) moved++;
        }
        if (have_labels && moved <= min_changes) break;
        if (!have_labels || moved > n / 8) {
            memset(sums, 0, (size_t)(k * d) * sizeof(double));
            memset(counts, 0, (size_t)k * sizeof(int64_t));
            for (int64_t i = 0; i < n; i++) {
                double *s = sums + new_labels[i] * d;
                for (int64_t j = 0; j < d; j++) s[j] += x[i * d + j];
                counts[new_labels[i]]++;
            }
        } else {
            for (int64_t i = 0; i < n; i++) {
                int64_t a = labels[i], b = new_labels[i];
                if (a == b) continue;
                for (int64_t j = 0; j < d; j++) {
                    sums[a * d + j] -= x[i * d + j];
                    sums[b * d + j] += x[i * d + j];
                }
                counts[a]--;
                counts[b]++;
            }
        }
        memcpy(labels, new_labels, (size_t)n * sizeof(int64_t));
        have_labels = 1;
        int64_t n_empty = 0;
        for (int64_t c = 0; c < k; c++) n_empty += counts[c] == 0;
        if (n_empty) {
            /* Re-seed empty clusters with the points farthest from their centres (never the
             * last point of a cluster). */
            for (int64_t i = 0; i < n; i++) {
                fresh[i] = dist[i * k + labels[i]] + sq_norms[i];
            }
            for (int64_t c = 0; c < k; c++) {
                if (counts[c] != 0) continue;
                int64_t far = -1;
                for (int64_t i = 0; i < n; i++)
                    if (counts[labels[i]] > 1 && (far < 0 || fresh[i] > fresh[far])) far = i;
                if (far < 0) break;
                int64_t a = labels[far];
                for (int64_t j = 0; j < d; j++) {
                    sums[a * d + j] -= x[far * d + j];
                    sums[c * d + j] = x[far * d + j];
                }
                counts[a]--;
                counts[c] = 1;
                labels[far] = c;
                fresh[far] = -INFINITY;
            }
        }
        double step = 0.0;
        for (int64_t c = 0; c < k; c++) {
            for (int64_t j = 0; j < d; j++) {
                double v = counts[c] > 0 ? sums[c * d + j] / (double)counts[c] : centres[c * d + j];
                double dv = v - centres[c * d + j];
                step += dv * dv;
                centres[c * d + j] = v;
            }
        }
        if (step <= tol) break;
    }
    distances_less_norms(n, d, k, x, centres, ct, c2, dist);
    double inertia = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double *row = dist + i * k;
        for (int64_t c = 0; c < k; c++) row[c] += sq_norms[i];
        labels[i] = argmin_row(row, k);
        double v = row[labels[i]];
        inertia += v > 0.0 ? v : 0.0;
    }
    return inertia;
}

/* k-means++ with n_seeds restarts, Lloyd from each, the restart of lowest inertia kept:
 * labels (n) and squared distances dist (n, k) of that restart. Returns 0, 1 (degenerate
 * seeding: use the numpy version) or -1 (out of memory). */
int tm_kmeans(int64_t n, int64_t d, const double *x, const double *sq_norms, int64_t k, int64_t n_seeds,
              int64_t trials, const int64_t *first, const double *uniforms, int64_t max_iter, double tol,
              int64_t min_changes, int64_t *labels_out, double *dist_out, double *inertia_out) {
    int status = 0;
    int64_t *centre_idx = malloc((size_t)(n_seeds * k) * sizeof(int64_t));
    double *closest = malloc((size_t)(n_seeds * n) * sizeof(double));
    double *cum = malloc((size_t)(n_seeds * n) * sizeof(double));
    double *tdist = malloc((size_t)(trials * n) * sizeof(double));
    double *xt2 = malloc((size_t)(n * d) * sizeof(double));
    double *total = malloc((size_t)n_seeds * sizeof(double));
    double *centres = malloc((size_t)(k * d) * sizeof(double));
    double *sums = malloc((size_t)(k * d) * sizeof(double));
    double *ct = malloc((size_t)(k * d) * sizeof(double));
    double *c2 = malloc((size_t)k * sizeof(double));
    double *fresh = malloc((size_t)n * sizeof(double));
    double *dist = malloc((size_t)(n * k) * sizeof(double));
    int64_t *counts = malloc((size_t)k * sizeof(int64_t));
    int64_t *labels = malloc((size_t)n * sizeof(int64_t));
    int64_t *new_labels = malloc((size_t)n * sizeof(int64_t));
    if (!centre_idx || !closest || !cum || !tdist || !xt2 || !total || !centres || !sums || !ct || !c2 || !fresh ||
        !dist || !counts || !labels || !new_labels) {
        status = -1;
        goto done;
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < d; j++) xt2[j * n + i] = -2.0 * x[i * d + j];
    if (kmeans_plusplus(n, d, x, xt2, sq_norms, k, n_seeds, trials, first, uniforms, centre_idx, closest, cum, tdist,
                        total)) {
        status = 1;
        goto done;
    }
    double best = INFINITY;
    for (int64_t r = 0; r < n_seeds; r++) {
        for (int64_t c = 0; c < k; c++)
            memcpy(centres + c * d, x + centre_idx[r * k + c] * d, (size_t)d * sizeof(double));
        double inertia = lloyd(n, d, k, x, sq_norms, centres, max_iter, tol, min_changes, labels, new_labels,
                               dist, sums, counts, ct, c2, fresh);
        if (r == 0 || inertia < best) {
            best = inertia;
            memcpy(labels_out, labels, (size_t)n * sizeof(int64_t));
            memcpy(dist_out, dist, (size_t)(n * k) * sizeof(double));
        }
    }
    *inertia_out = best;
done:
    free(centre_idx); free(closest); free(cum); free(tdist); free(xt2); free(total); free(centres); free(sums);
    free(ct);
    free(c2); free(fresh); free(dist); free(counts); free(labels); free(new_labels);
    return status;
}
