/* One warm-started eigensolver step of SpectralRegularizer on a chain of Linear layers, for one
 * floating-point type. Included twice by _chain_step.c, with REAL = float (suffix f32, BLAS/LAPACK
 * s-routines) and REAL = double (suffix f64, d-routines).
 *
 * It is regularizer._ChainGram.step written out: the same operations in the same order, on the
 * same row layout (a block of vectors is a row-major (rows, n_side) array; layer l of a side is
 * a column range), with every matrix product a BLAS gemm and the QR factorizations and the small
 * symmetric eigenproblem the LAPACK routines torch.linalg calls on the CPU (geqrf + orgqr,
 * syevd). The BLAS/LAPACK functions are passed in as pointers (_native.blas_lapack() finds the
 * ones torch itself uses), so the kernel links against nothing. Results equal the torch version
 * up to rounding (the order of a gemm's sums may differ).
 */

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define FN(name) CAT(name, SUF)

typedef void (*FN(gemm_fn))(const char *, const char *, const int *, const int *, const int *, const REAL *,
                            const REAL *, const int *, const REAL *, const int *, const REAL *, REAL *, const int *);
typedef void (*FN(syevd_fn))(const char *, const char *, const int *, REAL *, const int *, REAL *, REAL *,
                             const int *, int *, const int *, int *);
typedef void (*FN(geqrf_fn))(const int *, const int *, REAL *, const int *, REAL *, REAL *, const int *, int *);
typedef void (*FN(orgqr_fn))(const int *, const int *, const int *, REAL *, const int *, REAL *, REAL *,
                             const int *, int *);

typedef struct {
    FN(gemm_fn) gemm;
    FN(syevd_fn) syevd;
    FN(geqrf_fn) geqrf;
    FN(orgqr_fn) orgqr;
    int64_t n_layers;
    const int64_t *sizes;
    const REAL *const *blocks; /* blocks[l]: |W_l|, C-contiguous (sizes[l+1], sizes[l]) */
    const int64_t *side_off;   /* column offset of layer l within its side's row layout */
    const int64_t *is_small;   /* 1 if layer l is on the small side */
    int64_t ns, nl;            /* total width of the small and the large side */
    const tm_team *team;       /* torch's OpenMP team to split the products over, or NULL */
} FN(chain_ctx);

/* Row-major C (r x c) = alpha op(A) op(B) + beta C, with op(A) (r x p), op(B) (p x c): the
 * column-major gemm of the transposes. */
static void FN(rm_gemm)(const FN(chain_ctx) *cx, char ta, char tb, int64_t r, int64_t c, int64_t p, REAL alpha,
                        const REAL *a, int64_t lda, const REAL *b, int64_t ldb, REAL beta, REAL *out, int64_t ldc) {
    int ir = (int)r, ic = (int)c, ip = (int)p, ia = (int)lda, ib = (int)ldb, io = (int)ldc;
    cx->gemm(&tb, &ta, &ic, &ir, &ip, &alpha, b, &ib, a, &ia, &beta, out, &io);
}

typedef struct {
    const FN(chain_ctx) *cx;
    int64_t rows, ld_src, ld_out;
    const REAL *src;
    REAL *out;
    int to_small;
} FN(raw_job);

/* (A v)_j for the target layers on the side `to_small` of rows `rows` of the other side (already
 * scaled): out_j = below @ W_{j-1}^T + above @ W_j (regularizer._ChainGram._raw), for the units of part
 * `part` of `parts` of every target layer (each part reads only its rows of W_{j-1} and columns of W_j). */
static void FN(raw_part)(void *data, int part, int parts) {
    const FN(raw_job) *job = (const FN(raw_job) *)data;
    const FN(chain_ctx) *cx = job->cx;
    for (int64_t j = 0; j < cx->n_layers; j++) {
        if ((cx->is_small[j] != 0) != (job->to_small != 0)) continue;
        int64_t nj = cx->sizes[j], c0, c1;
        tm_part_range(nj, 64 / (int64_t)sizeof(REAL), part, parts, &c0, &c1);
        if (c1 <= c0) continue;
        REAL *dst = job->out + cx->side_off[j] + c0;
        int have = 0;
        if (j >= 1) {
            const REAL *below = job->src + cx->side_off[j - 1];
            int64_t np = cx->sizes[j - 1];
            FN(rm_gemm)(cx, 'N', 'T', job->rows, c1 - c0, np, (REAL)1, below, job->ld_src, cx->blocks[j - 1] + c0 * np,
                        np, (REAL)0, dst, job->ld_out);
            have = 1;
        }
        if (j + 1 < cx->n_layers) {
            const REAL *above = job->src + cx->side_off[j + 1];
            FN(rm_gemm)(cx, 'N', 'N', job->rows, c1 - c0, cx->sizes[j + 1], (REAL)1, above, job->ld_src,
                        cx->blocks[j] + c0, nj, have ? (REAL)1 : (REAL)0, dst, job->ld_out);
        }
    }
}

/* raw_part over all units, split over the team if there is one. */
static void FN(raw)(const FN(chain_ctx) *cx, int64_t rows, const REAL *src, int64_t ld_src, int to_small, REAL *out,
                    int64_t ld_out) {
    FN(raw_job) job = {cx, rows, ld_src, ld_out, src, out, to_small};
    tm_team_split(cx->team, FN(raw_part), &job);
}

TM_CHAIN_CLONES static void FN(scale_rows)(REAL *t, int64_t rows, int64_t n, const REAL *s) {
    for (int64_t i = 0; i < rows; i++) {
        REAL *r = t + i * n;
        for (int64_t c = 0; c < n; c++) r[c] *= s[c];
    }
}

/* tmp = t * s (each row scaled elementwise by s). */
TM_CHAIN_CLONES static void FN(scaled_rows)(REAL *tmp, const REAL *t, int64_t rows, int64_t n, const REAL *s) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t c = 0; c < n; c++) tmp[i * n + c] = t[i * n + c] * s[c];
}

/* B t (to_large) or B^T t for rows t of the other side (_ChainGram._half_rows); tmp: rows x width of t. */
static void FN(half_rows)(const FN(chain_ctx) *cx, const REAL *t, int64_t rows, int to_large, const REAL *inv_small,
                          const REAL *inv_large, REAL *tmp, REAL *out) {
    int64_t n_src = to_large ? cx->ns : cx->nl, n_dst = to_large ? cx->nl : cx->ns;
    const REAL *inv_src = to_large ? inv_small : inv_large, *inv_dst = to_large ? inv_large : inv_small;
    FN(scaled_rows)(tmp, t, rows, n_src, inv_src);
    FN(raw)(cx, rows, tmp, n_src, !to_large, out, n_dst);
    FN(scale_rows)(out, rows, n_dst, inv_dst);
}

/* G z = S_small A^T S_large^2 A S_small z for rows zt (_ChainGram._gram). */
static void FN(gram)(const FN(chain_ctx) *cx, const REAL *zt, int64_t rows, const REAL *inv_small, const REAL *inv2_large,
                     REAL *tmp_small, REAL *tmp_large, REAL *out) {
    FN(scaled_rows)(tmp_small, zt, rows, cx->ns, inv_small);
    FN(raw)(cx, rows, tmp_small, cx->ns, 0, tmp_large, cx->nl);
    FN(scale_rows)(tmp_large, rows, cx->nl, inv2_large);
    FN(raw)(cx, rows, tmp_large, cx->nl, 1, out, cx->ns);
    FN(scale_rows)(out, rows, cx->ns, inv_small);
}

/* Rows of t (rows x n, rows <= n) replaced by orthonormal rows spanning the same space: the reduced
 * QR of t^T (geqrf + orgqr on the column-major (n x rows) array that t's memory is). */
static int FN(orthonormal_rows)(const FN(chain_ctx) *cx, REAL *t, int64_t rows, int64_t n, REAL *tau, REAL *work,
                                int64_t lwork) {
    int im = (int)n, in = (int)rows, ilw = (int)lwork, info = 0;
    cx->geqrf(&im, &in, t, &im, tau, work, &ilw, &info);
    if (info != 0) return -2;
    cx->orgqr(&im, &in, &in, t, &im, tau, work, &ilw, &info);
    return info != 0 ? -2 : 0;
}

/* One 64-byte aligned block of scratch (tm_scratch: the workspace `spec`, or allocated into *owned) carved
 * into n arrays of lens[i] elements (each starting 64-byte aligned); NULL when out of memory. */
static REAL *FN(aligned_arrays)(const int64_t *lens, int n, REAL **out, int64_t *spec, void **owned) {
    const int64_t per_line = 64 / (int64_t)sizeof(REAL);
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += (lens[i] + per_line - 1) / per_line * per_line;
    REAL *mem = (REAL *)tm_scratch(spec, total * (int64_t)sizeof(REAL), owned);
    if (mem == NULL) return NULL;
    int64_t off = 0;
    for (int i = 0; i < n; i++) {
        out[i] = mem + off;
        off += (lens[i] + per_line - 1) / per_line * per_line;
    }
    return mem;
}

/* Returns the number of iterations (>= 1) on success; 0 when the step cannot be trusted (non-finite
 * values, no convergence within max_iter, a vanishing sigma_k: the caller falls back); -1 when out
 * of memory; -2 on a LAPACK error.
 *
 * Inputs: warm (m x ns) and theta (m, descending) of the last solve; previous (m x ns) or NULL;
 * inv, sqrt_d (node order, length N). Outputs: x_rows, mx_rows (k x N, node order), zt_out (m x ns),
 * theta_out (m), res_out (k), eig_out (k: the eigenvalues 1 - sigma), q_out (k: the Rayleigh quotients
 * x_i^T (M x)_i of the rows returned, summed in double: the penalty's terms), stats = {worst residual,
 * min sigma2, smallest Ritz value, number of sigma2 >= zero_sigma2, sum of the q_i in double}.
 *
 * set_local_threads (MKL's MKL_Set_Num_Threads_Local, or NULL): if given, the step runs its BLAS/LAPACK
 * calls on one thread (restored on return): the regularizer's worker thread, which runs next to torch's
 * threads, passes it. team_spec: see tm_team_from; work_spec: see tm_scratch (NULL: allocate). */
int FN(tm_chain_step)(void *gemm, void *syevd, void *geqrf, void *orgqr, void *set_local_threads,
                      const int64_t *team_spec, int64_t n_layers, const int64_t *sizes,
                      const int64_t *block_addrs, const int64_t *is_small, const REAL *inv, const REAL *sqrt_d,
                      const REAL *warm, const REAL *theta_in, const REAL *previous, int64_t m, int64_t k, int64_t degree,
                      double tol, int64_t max_iter, double zero_sigma2, double smallest, REAL *x_rows, REAL *mx_rows,
                      REAL *zt_out, REAL *theta_out, REAL *res_out, REAL *eig_out, REAL *q_out, double *stats,
                      int64_t *work_spec) {
    FN(chain_ctx) cx;
    cx.gemm = (FN(gemm_fn))gemm;
    cx.syevd = (FN(syevd_fn))syevd;
    cx.geqrf = (FN(geqrf_fn))geqrf;
    cx.orgqr = (FN(orgqr_fn))orgqr;
    cx.n_layers = n_layers;
    cx.sizes = sizes;
    cx.blocks = (const REAL *const *)block_addrs;
    cx.is_small = is_small;
    tm_team team;
    cx.team = tm_team_from(team_spec, &team);
    int64_t side_off[n_layers > 0 ? n_layers : 1], node_off[n_layers > 0 ? n_layers : 1];
    int64_t ns = 0, nl = 0, n_nodes = 0;
    for (int64_t l = 0; l < n_layers; l++) {
        node_off[l] = n_nodes;
        n_nodes += sizes[l];
        if (is_small[l]) {
            side_off[l] = ns;
            ns += sizes[l];
        } else {
            side_off[l] = nl;
            nl += sizes[l];
        }
    }
    cx.side_off = side_off;
    cx.ns = ns;
    cx.nl = nl;
    if (m < k || k < 1 || ns < m || degree < 1) return 0;
    typedef int (*set_threads_fn)(int);
    int threads_before = set_local_threads != NULL ? ((set_threads_fn)set_local_threads)(1) : 0;

    int64_t lwork = 64 * m + 64;
    int64_t n_syevd_work = 1 + 6 * m + 2 * m * m, n_syevd_iwork = 3 + 5 * m;
    /* Every work array 64-byte aligned: MKL may pick its code path by alignment, and a result that
     * depends on where malloc put an array would not be reproducible bit for bit. */
    const int64_t lens[] = {m * ns, m * ns, m * ns, m * ns, m * ns, m * ns, m * nl, m * nl, m * m, m * m,
                            m, m, ns, ns, nl, nl, lwork, n_syevd_work, k * nl, k * ns, k * ns, k};
    enum { N_ARRAYS = sizeof(lens) / sizeof(lens[0]) };
    REAL *arr[N_ARRAYS];
    void *owned;
    REAL *mem = FN(aligned_arrays)(lens, N_ARRAYS, arr, work_spec, &owned);
    int *iwork = (int *)malloc((size_t)n_syevd_iwork * sizeof(int));
    if (mem == NULL || iwork == NULL) {
        tm_aligned_free(owned);
        free(iwork);
        if (set_local_threads != NULL) ((set_threads_fn)set_local_threads)(threads_before);
        return -1;
    }
    REAL *zt = arr[0], *y = arr[1], *y_prev = arr[2], *y_next = arr[3], *tmp_s = arr[4], *q = arr[5];
    REAL *tmp_l = arr[6], *bq = arr[7], *h = arr[8], *ev = arr[9], *theta = arr[10], *tau = arr[11];
    REAL *inv_small = arr[12], *v0 = arr[13], *inv_large = arr[14], *inv2_large = arr[15], *work = arr[16];
    REAL *syevd_work = arr[17], *yk = arr[18], *gz = arr[19], *zp = arr[20], *sigma2_out = arr[21];

    const REAL tiny = (sizeof(REAL) == sizeof(float)) ? (REAL)1.17549435e-38F : (REAL)2.2250738585072014e-308;
    const double eps = (sizeof(REAL) == sizeof(float)) ? 1.1920928955078125e-07 : 2.220446049250313e-16;
    int status = 0;

    memcpy(zt, warm, (size_t)(m * ns) * sizeof(REAL));
    memcpy(theta, theta_in, (size_t)m * sizeof(REAL));
    if (previous != NULL) {
        /* zt[:k] = 2 b - (b a^T) a with a = previous[:k], b = zt[:k] (_extrapolate_rows). */
        FN(rm_gemm)(&cx, 'N', 'T', k, k, ns, (REAL)1, zt, ns, previous, ns, (REAL)0, h, k);
        FN(rm_gemm)(&cx, 'N', 'N', k, ns, k, (REAL)-1, h, k, previous, ns, (REAL)2, zt, ns);
    }
    for (int64_t l = 0; l < n_layers; l++) {
        const REAL *src_inv = inv + node_off[l], *src_sqrt = sqrt_d + node_off[l];
        if (is_small[l]) {
            memcpy(inv_small + side_off[l], src_inv, (size_t)sizes[l] * sizeof(REAL));
            memcpy(v0 + side_off[l], src_sqrt, (size_t)sizes[l] * sizeof(REAL));
        } else {
            memcpy(inv_large + side_off[l], src_inv, (size_t)sizes[l] * sizeof(REAL));
            for (int64_t c = 0; c < sizes[l]; c++) inv2_large[side_off[l] + c] = src_inv[c] * src_inv[c];
        }
    }
    {
        double acc = 0.0;
        for (int64_t c = 0; c < ns; c++) acc += (double)v0[c] * (double)v0[c];
        REAL nrm = (REAL)sqrt(acc);
        if (nrm < tiny) nrm = tiny;
        for (int64_t c = 0; c < ns; c++) v0[c] = v0[c] / nrm;
    }

    int64_t it = 0, converged = 0;
    double worst = 0.0, sigma2_k = 0.0, n_zero = 0.0;
    for (it = 0; it < (max_iter > 1 ? max_iter : 1); it++) {
        /* Chebyshev filter damping [0, cut], normalized recurrence. */
        double cut = smallest > 1e-4 ? smallest : 1e-4;
        if (cut > 1.0 - 1e-7) cut = 1.0 - 1e-7;
        double e = cut / 2.0, c = cut / 2.0, t0 = (1.0 - c) / e;
        double rho_prev = 1.0, rho = t0;
        FN(gram)(&cx, zt, m, inv_small, inv2_large, tmp_s, tmp_l, y);
        {
            REAL rc = (REAL)c, sc = (REAL)(1.0 / (e * t0));
            for (int64_t i = 0; i < m * ns; i++) y[i] = (y[i] - zt[i] * rc) * sc;
        }
        const REAL *yp = zt;
        for (int64_t d = 1; d < degree; d++) {
            double rho_next = 2.0 * t0 * rho - rho_prev;
            FN(gram)(&cx, y, m, inv_small, inv2_large, tmp_s, tmp_l, y_next);
            REAL rc = (REAL)c, s1 = (REAL)(2.0 * rho / (e * rho_next)), s2 = (REAL)(rho_prev / rho_next);
            for (int64_t i = 0; i < m * ns; i++) y_next[i] = (y_next[i] - y[i] * rc) * s1 - yp[i] * s2;
            /* rotate: y_prev <- y, y <- y_next */
            memcpy(y_prev, y, (size_t)(m * ns) * sizeof(REAL));
            memcpy(y, y_next, (size_t)(m * ns) * sizeof(REAL));
            yp = y_prev;
            rho_prev = rho;
            rho = rho_next;
        }
        memcpy(y, v0, (size_t)ns * sizeof(REAL)); /* the exact top eigenvector replaces row 0 */
        memcpy(q, y, (size_t)(m * ns) * sizeof(REAL));
        if ((status = FN(orthonormal_rows)(&cx, q, m, ns, tau, work, lwork)) != 0) goto done;
        FN(half_rows)(&cx, q, m, 1, inv_small, inv_large, tmp_s, bq);
        /* Rayleigh-Ritz: eigh of bq bq^T (syevd reads the lower triangle, as torch.linalg.eigh). */
        FN(rm_gemm)(&cx, 'N', 'T', m, m, nl, (REAL)1, bq, nl, bq, nl, (REAL)0, h, m);
        {
            char jobz = 'V', uplo = 'L';
            int im = (int)m, ilw = (int)n_syevd_work, iliw = (int)n_syevd_iwork, info = 0;
            REAL *w_asc = tau; /* scratch of length m */
            cx.syevd(&jobz, &uplo, &im, h, &im, w_asc, syevd_work, &ilw, iwork, &iliw, &info);
            if (info != 0) {
                status = -2;
                goto done;
            }
            /* Column-major eigenvectors: column i (= row i of h's memory) is eigenvector i. Flip to descending. */
            for (int64_t i = 0; i < m; i++) {
                theta[i] = w_asc[m - 1 - i];
                memcpy(ev + i * m, h + (m - 1 - i) * m, (size_t)m * sizeof(REAL));
            }
        }
        FN(rm_gemm)(&cx, 'N', 'N', m, ns, m, (REAL)1, ev, m, q, ns, (REAL)0, zt, ns); /* all m Ritz vectors */
        FN(rm_gemm)(&cx, 'N', 'N', k, nl, m, (REAL)1, ev, m, bq, nl, (REAL)0, yk, nl); /* B z, wanted ones */
        FN(half_rows)(&cx, yk, k, 0, inv_small, inv_large, tmp_l, gz);                 /* G z */
        /* Polish: one power step on the k wanted vectors, keeping each vector's sign. */
        memcpy(zp, gz, (size_t)(k * ns) * sizeof(REAL));
        if ((status = FN(orthonormal_rows)(&cx, zp, k, ns, tau, work, lwork)) != 0) goto done;
        for (int64_t i = 0; i < k; i++) {
            double ov = 0.0;
            for (int64_t c = 0; c < ns; c++) ov += (double)zp[i * ns + c] * (double)zt[i * ns + c];
            if (signbit(ov))
                for (int64_t c = 0; c < ns; c++) zp[i * ns + c] = -zp[i * ns + c];
        }
        FN(half_rows)(&cx, zp, k, 1, inv_small, inv_large, tmp_s, yk);
        FN(half_rows)(&cx, yk, k, 0, inv_small, inv_large, tmp_l, gz);
        worst = 0.0;
        sigma2_k = INFINITY;
        n_zero = 0.0;
        for (int64_t i = 0; i < k; i++) {
            double s2 = 0.0, r2 = 0.0;
            for (int64_t c = 0; c < nl; c++) s2 += (double)yk[i * nl + c] * (double)yk[i * nl + c];
            REAL s2r = (REAL)s2;
            for (int64_t c = 0; c < ns; c++) {
                double d = (double)(gz[i * ns + c] - s2r * zp[i * ns + c]);
                r2 += d * d;
            }
            sigma2_out[i] = s2r;
            res_out[i] = (REAL)sqrt(r2);
            double r = (double)res_out[i];
            if (!(r <= worst)) worst = r; /* NaN propagates */
            if (s2r < sigma2_k) sigma2_k = s2r;
            if ((double)s2r >= zero_sigma2) n_zero += 1.0;
        }
        smallest = (double)theta[m - 1];
        if (!isfinite(worst)) {
            status = 0;
            goto done_fail;
        }
        if (worst <= tol) {
            converged = 1;
            break;
        }
    }
    if (!converged || sigma2_k <= 1e3 * eps) goto done_fail;
    {
        const REAL r2 = (REAL)(1.0 / sqrt(2.0));
        int64_t n_nodes_total = n_nodes;
        double q_sum = 0.0;
        for (int64_t i = 0; i < k; i++) {
            REAL sg = (REAL)sqrt((double)sigma2_out[i]);
            if (sg < tiny) sg = tiny;
            eig_out[i] = (REAL)1 - sg;
            REAL inv_sg = (REAL)1 / sg;
            REAL *xr = x_rows + i * n_nodes_total, *mr = mx_rows + i * n_nodes_total;
            for (int64_t l = 0; l < n_layers; l++) {
                int64_t a = node_off[l], o = side_off[l];
                if (is_small[l]) {
                    for (int64_t c = 0; c < sizes[l]; c++) {
                        xr[a + c] = zp[i * ns + o + c] * r2;
                        mr[a + c] = (gz[i * ns + o + c] * inv_sg) * r2;
                    }
                } else {
                    for (int64_t c = 0; c < sizes[l]; c++) {
                        xr[a + c] = (yk[i * nl + o + c] * inv_sg) * r2;
                        mr[a + c] = yk[i * nl + o + c] * r2;
                    }
                }
            }
            double qi = 0.0;
            for (int64_t v = 0; v < n_nodes_total; v++) qi += (double)xr[v] * (double)mr[v];
            q_out[i] = (REAL)qi;
            q_sum += qi;
        }
        memcpy(zt_out, zt, (size_t)(m * ns) * sizeof(REAL));
        memcpy(theta_out, theta, (size_t)m * sizeof(REAL));
        stats[0] = worst;
        stats[1] = sigma2_k;
        stats[2] = smallest;
        stats[3] = n_zero;
        stats[4] = q_sum;
        status = (int)(it + 1);
        goto done;
    }
done_fail:
    status = 0;
done:
    tm_aligned_free(owned);
    free(iwork);
    if (set_local_threads != NULL) ((set_threads_fn)set_local_threads)(threads_before);
    return status;
}

typedef struct {
    int64_t n_layers, n_nodes;
    const int64_t *sizes, *w_addrs, *buf_addrs;
    double *acc_rows, *acc_cols;
} FN(prep_job);

/* Rows `part` of `parts` of every layer: |W| into its buffer, the row sums into acc_rows (each row its
 * own entry) and the column sums into this part's own array of acc_cols, in double. */
TM_CHAIN_CLONES static void FN(prepare_part)(void *data, int part, int parts) {
    const FN(prep_job) *job = (const FN(prep_job) *)data;
    double *cols = job->acc_cols + (int64_t)part * job->n_nodes;
    int64_t off = 0;
    for (int64_t l = 0; l + 1 < job->n_layers; l++) {
        const REAL *w = (const REAL *)job->w_addrs[l];
        REAL *a = (REAL *)job->buf_addrs[l];
        int64_t n_in = job->sizes[l], n_out = job->sizes[l + 1], r0, r1;
        tm_part_range(n_out, 1, part, parts, &r0, &r1);
        double *col = cols + off, *row = job->acc_rows + off + n_in;
        for (int64_t i = r0; i < r1; i++) {
            const REAL *wr = w + i * n_in;
            REAL *ar = a + i * n_in;
            double sums[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int64_t j = 0;
            for (; j + 8 <= n_in; j += 8)
                for (int t = 0; t < 8; t++) {
                    REAL v = (REAL)fabs((double)wr[j + t]);
                    ar[j + t] = v;
                    sums[t] += (double)v;
                    col[j + t] += (double)v;
                }
            for (; j < n_in; j++) {
                REAL v = (REAL)fabs((double)wr[j]);
                ar[j] = v;
                sums[0] += (double)v;
                col[j] += (double)v;
            }
            row[i] = ((sums[0] + sums[1]) + (sums[2] + sums[3])) + ((sums[4] + sums[5]) + (sums[6] + sums[7]));
        }
        off += n_in;
    }
}

/* |W| of every layer into its buffer and the node degrees, D^-1/2 and D^1/2 (SpectralRegularizer._prepare):
 * one pass over the weights instead of an abs and two sums per layer, split by rows over the team if there
 * is one (team_spec, see tm_team_from; the column sums of the parts are added in a fixed order). Degrees are
 * accumulated in double. w_addrs[l], buf_addrs[l]: C-contiguous (sizes[l+1], sizes[l]); deg, inv, sqrt_d:
 * node order. stats = {sum of the degrees (NaN/inf if a weight is not finite), number of nodes of degree
 * <= 0}. work_spec: see tm_scratch. Returns 0, or -1 when out of memory. */
int FN(tm_chain_prepare)(int64_t n_layers, const int64_t *sizes, const int64_t *w_addrs, const int64_t *buf_addrs,
                         REAL *deg, REAL *inv, REAL *sqrt_d, double *stats, const int64_t *team_spec,
                         int64_t *work_spec) {
    int64_t n_nodes = 0;
    for (int64_t l = 0; l < n_layers; l++) n_nodes += sizes[l];
    tm_team team;
    const tm_team *tp = tm_team_from(team_spec, &team);
    int64_t n_parts = tp != NULL ? (int64_t)tp->n : 1;
    int64_t n_acc = (1 + n_parts) * n_nodes + 1;
    void *owned;
    double *acc = (double *)tm_scratch(work_spec, n_acc * (int64_t)sizeof(double), &owned);
    if (acc == NULL) return -1;
    memset(acc, 0, (size_t)n_acc * sizeof(double));
    FN(prep_job) job = {n_layers, n_nodes, sizes, w_addrs, buf_addrs, acc, acc + n_nodes};
    tm_team_split(tp, FN(prepare_part), &job);
    double total = 0.0, n_iso = 0.0;
    for (int64_t v = 0; v < n_nodes; v++) {
        double dv = acc[v];
        for (int64_t t = 0; t < n_parts; t++) dv += acc[(1 + t) * n_nodes + v];
        REAL d = (REAL)dv;
        deg[v] = d;
        total += (double)d;
        if (d <= 0) {
            n_iso += 1.0;
            inv[v] = 0;
            sqrt_d[v] = 0;
        } else {
            sqrt_d[v] = (REAL)sqrt((double)d);
            inv[v] = (REAL)(1.0 / sqrt((double)d));
        }
    }
    tm_aligned_free(owned);
    stats[0] = total;
    stats[1] = n_iso;
    return 0;
}

/* g *= sign(w), elementwise (sign(0) = 0). */
TM_CHAIN_CLONES static void FN(times_sign)(REAL *g, const REAL *w, int64_t n) {
    for (int64_t e = 0; e < n; e++) {
        REAL wv = w[e], gv = g[e];
        g[e] = wv > 0 ? gv : (wv < 0 ? -gv : (REAL)0);
    }
}

typedef struct {
    const FN(chain_ctx) *cx;
    int64_t n_layers, n_nodes, rows;
    const int64_t *sizes, *w_addrs, *grad_addrs;
    const REAL *left, *right;
} FN(grad_job);

/* Rows `part` of `parts` of every layer's gradient: (rows r0..r1 of) left[:, layer l+1]^T @ right[:, layer l],
 * times sign(W_l). */
static void FN(grad_part)(void *data, int part, int parts) {
    const FN(grad_job) *job = (const FN(grad_job) *)data;
    int64_t off = 0;
    for (int64_t l = 0; l + 1 < job->n_layers; l++) {
        int64_t n_in = job->sizes[l], n_out = job->sizes[l + 1], r0, r1;
        tm_part_range(n_out, 1, part, parts, &r0, &r1);
        if (r1 > r0) {
            REAL *gr = (REAL *)job->grad_addrs[l] + r0 * n_in;
            const REAL *w = (const REAL *)job->w_addrs[l] + r0 * n_in;
            FN(rm_gemm)(job->cx, 'T', 'N', r1 - r0, n_in, job->rows, (REAL)1, job->left + off + n_in + r0, job->n_nodes,
                        job->right + off, job->n_nodes, (REAL)0, gr, n_in);
            FN(times_sign)(gr, w, (r1 - r0) * n_in);
        }
        off += n_in;
    }
}

/* The weight gradients of sum_i c_i x_i^T M(W) x_i for fixed vectors X (rows x_rows, (k, N)) with
 * M X given (mx_rows): _HFTrace.backward written out. Per layer one gemm with inner dimension k + 2
 * (dq/dA_l = 2 U_{l+1} diag(c) U_l^T + g_{l+1} 1^T + 1 g_l^T, U = D^-1/2 X, g the path through the
 * degrees) and one pass that applies sign(W), split by rows over the team if there is one.
 * grad_addrs[l]: C-contiguous (sizes[l+1], sizes[l]) outputs. work_spec: see tm_scratch. Returns 0, or -1
 * when out of memory. */
int FN(tm_chain_grad)(void *gemm, void *set_local_threads, const int64_t *team_spec, int64_t n_layers,
                      const int64_t *sizes, const int64_t *w_addrs, const REAL *x_rows, const REAL *mx_rows,
                      const REAL *inv, const REAL *sqrt_d, int64_t k, const REAL *c, const int64_t *grad_addrs,
                      int64_t *work_spec) {
    typedef int (*set_threads_fn)(int);
    int64_t n_nodes = 0;
    for (int64_t l = 0; l < n_layers; l++) n_nodes += sizes[l];
    int64_t rows = k + 2;
    const int64_t lens[] = {rows * n_nodes, rows * n_nodes};
    REAL *arr[2];
    void *owned;
    if (FN(aligned_arrays)(lens, 2, arr, work_spec, &owned) == NULL) return -1;
    REAL *left = arr[0], *right = arr[1];
    REAL *g = left + k * n_nodes; /* row k of left: the degree term */
    for (int64_t v = 0; v < n_nodes; v++) g[v] = 0;
    for (int64_t i = 0; i < k; i++) {
        const REAL *x = x_rows + i * n_nodes, *mx = mx_rows + i * n_nodes;
        REAL ci = c[i], two_c = (REAL)2 * c[i];
        REAL *lu = left + i * n_nodes, *ru = right + i * n_nodes;
        for (int64_t v = 0; v < n_nodes; v++) {
            REAL u = x[v] * inv[v];
            ru[v] = u;
            lu[v] = u * two_c;
            g[v] += (x[v] * ci) * (mx[v] * sqrt_d[v]);
        }
    }
    REAL *ones_l = left + (k + 1) * n_nodes, *ones_r = right + k * n_nodes, *g_r = right + (k + 1) * n_nodes;
    for (int64_t v = 0; v < n_nodes; v++) {
        REAL i3 = inv[v] * inv[v] * inv[v];
        g[v] = -(g[v] * i3);
        g_r[v] = g[v];
        ones_l[v] = 1;
        ones_r[v] = 1;
    }
    int threads_before = set_local_threads != NULL ? ((set_threads_fn)set_local_threads)(1) : 0;
    FN(chain_ctx) cx;
    cx.gemm = (FN(gemm_fn))gemm;
    tm_team team;
    cx.team = tm_team_from(team_spec, &team);
    FN(grad_job) job = {&cx, n_layers, n_nodes, rows, sizes, w_addrs, grad_addrs, left, right};
    tm_team_split(cx.team, FN(grad_part), &job);
    if (set_local_threads != NULL) ((set_threads_fn)set_local_threads)(threads_before);
    tm_aligned_free(owned);
    return 0;
}

#undef FN
#undef CAT
#undef CAT2
