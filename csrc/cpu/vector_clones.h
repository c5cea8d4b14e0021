// Loops that run at memory speed only when vectorised, compiled once per vector ISA and picked
// when the library loads (GCC/Clang function multiversioning, x86-64 Linux): the extension's
// baseline flags give only SSE2. Elsewhere the plain function.
//
//   DK_VECTOR_CLONES          the clones, compiled as the rest of the library is (GCC may
//                             contract a multiply and an add into an FMA in the wider ones).
//   DK_VECTOR_CLONES_UNFUSED  the clones with no FMA contraction, so that every clone rounds
//                             as separate multiplies and adds do (GCC; Clang contracts only
//                             within one expression, so write the product and the sum as two),
//                             and with no floating-point exception watched, without which GCC
//                             sinks a product whose result a select may drop into a branch and
//                             vectorises nothing.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define DK_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#if defined(__clang__)
#define DK_VECTOR_CLONES_UNFUSED DK_VECTOR_CLONES
#else
#define DK_VECTOR_CLONES_UNFUSED \
  __attribute__((target_clones("avx512f", "avx2", "default"), optimize("no-trapping-math", "fp-contract=off")))
#endif
#else
#define DK_VECTOR_CLONES
#define DK_VECTOR_CLONES_UNFUSED
#endif
