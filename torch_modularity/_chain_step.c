/* Compiled per-step eigensolver of SpectralRegularizer on chains of Linear layers (float32 and
 * float64 instances of _chain_step.h), loaded with ctypes by torch_modularity/_native.py. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 64-byte aligned allocations (size rounded up to a multiple of 64, as aligned_alloc requires). */
#if defined(_WIN32)
#include <malloc.h>
static void *tm_aligned_alloc(size_t size) { return _aligned_malloc(size, 64); }
static void tm_aligned_free(void *p) { _aligned_free(p); }
#else
static void *tm_aligned_alloc(size_t size) { return aligned_alloc(64, (size + 63) / 64 * 64); }
static void tm_aligned_free(void *p) { free(p); }
#endif

/* Scratch memory of `bytes` bytes, 64-byte aligned: the caller's workspace when it is large enough, else a
 * fresh allocation (returned in *owned too: free it with tm_aligned_free). spec: NULL, or {address,
 * capacity in bytes, bytes needed (raised to the largest request seen)}: the caller grows its workspace to
 * the need after a call, so that later calls allocate nothing (the regularizer's per-step work arrays,
 * ~0.7 MB on the paper MLP, otherwise churn the heap and page-fault every step). */
static void *tm_scratch(int64_t *spec, int64_t bytes, void **owned) {
    *owned = NULL;
    if (bytes < 64) bytes = 64;
    if (spec != NULL) {
        if (bytes + 64 > spec[2]) spec[2] = bytes + 64;
        if (spec[0] != 0 && spec[1] >= bytes + 64) return (void *)(((uintptr_t)spec[0] + 63) & ~(uintptr_t)63);
    }
    *owned = tm_aligned_alloc((size_t)bytes);
    return *owned;
}

/* Elementwise loops compiled for AVX2 and for the x86-64 baseline, picked at load time (GCC
 * function multi-versioning); vectorizing them does not reorder any sum (see _kernels.c). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TM_CHAIN_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TM_CHAIN_CLONES
#endif

/* A team of torch's own OpenMP threads (libgomp's GOMP_parallel, which `#pragma omp parallel`
 * compiles to, looked up in torch's libgomp): the step's skinny products, which MKL runs on one
 * thread, are split over it by output units. Threads of our own beside torch's would wait for a
 * core that torch's spinning worker holds; its own team is awake and takes the work at once. */
typedef struct {
    void (*parallel)(void (*)(void *), void *, unsigned, unsigned);
    int (*thread_num)(void);
    int (*num_threads)(void);
    int (*set_local_threads)(int); /* MKL_Set_Num_Threads_Local, or NULL */
    unsigned n;
} tm_team;

/* spec: {GOMP_parallel, omp_get_thread_num, omp_get_num_threads, MKL_Set_Num_Threads_Local or 0, threads}
 * (addresses as int64), or NULL. Returns `team` filled, or NULL when there is nothing to split over. */
static const tm_team *tm_team_from(const int64_t *spec, tm_team *team) {
    if (spec == NULL || spec[0] == 0 || spec[1] == 0 || spec[2] == 0 || spec[4] <= 1) return NULL;
    team->parallel = (void (*)(void (*)(void *), void *, unsigned, unsigned))(intptr_t)spec[0];
    team->thread_num = (int (*)(void))(intptr_t)spec[1];
    team->num_threads = (int (*)(void))(intptr_t)spec[2];
    team->set_local_threads = (int (*)(int))(intptr_t)spec[3];
    team->n = (unsigned)spec[4];
    return team;
}

/* A kernel's work split into parts: part `part` of `parts`. */
typedef void (*tm_part_fn)(void *data, int part, int parts);

typedef struct {
    const tm_team *team;
    tm_part_fn fn;
    void *data;
} tm_team_job;

/* In a team member: its part of the number of parts (the team actually started, which may be smaller
 * than asked), with MKL on one thread inside. */
static void tm_team_member(void *p) {
    const tm_team_job *job = (const tm_team_job *)p;
    const tm_team *team = job->team;
    int before = team->set_local_threads != NULL ? team->set_local_threads(1) : 0;
    job->fn(job->data, team->thread_num(), team->num_threads());
    if (team->set_local_threads != NULL) team->set_local_threads(before);
}

/* fn over all parts: split over the team, or as one part on this thread when there is none. */
static void tm_team_split(const tm_team *team, tm_part_fn fn, void *data) {
    if (team == NULL) {
        fn(data, 0, 1);
        return;
    }
    tm_team_job job = {team, fn, data};
    team->parallel(tm_team_member, &job, team->n, 0);
}

/* [lo, hi) of part `part` of `parts` of n items, cut at multiples of `grain` (cache lines). */
static void tm_part_range(int64_t n, int64_t grain, int part, int parts, int64_t *lo, int64_t *hi) {
    int64_t units = (n + grain - 1) / grain;
    *lo = units * part / parts * grain;
    *hi = units * (part + 1) / parts * grain;
    if (*lo > n) *lo = n;
    if (*hi > n) *hi = n;
}

#define REAL float
#define SUF f32
#include "_chain_step.h"
#undef REAL
#undef SUF

#define REAL double
#define SUF f64
#include "_chain_step.h"
#undef REAL
#undef SUF
