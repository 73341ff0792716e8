/* Compiled per-step eigensolver of SpectralRegularizer on chains of Linear layers (float32 and
 * float64 instances of _chain_step.h), loaded with ctypes by torch_modularity/_native.py. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
