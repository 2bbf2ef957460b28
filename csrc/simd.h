// VECTOR_CLONES: the function is compiled for AVX-512, AVX2 and the baseline, and the loader picks
// the widest the machine has. The package is built for the baseline x86-64 (so that one build runs
// everywhere); the extensions' loops over rows and caches want wider vectors where there are some.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif
