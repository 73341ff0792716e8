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

/* Elementwise loops compiled for AVX2 and for the x86-64 baseline, picked at load time (GCC
 * function multi-versioning); vectorizing them does not reorder any sum (see _kernels.c). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TM_CHAIN_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TM_CHAIN_CLONES
#endif

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
