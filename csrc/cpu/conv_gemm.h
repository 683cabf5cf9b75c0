#pragma once
// The register tiles of conv_gemm.cpp as a plain row-major matrix product, for the other kernels
// that need one inside their own loops (Winograd's 16 products, winograd.cpp).
#include <cstdint>

namespace resnet_fast {

// c[m][k] = sum_d a[m][d] * b[d][k] for m < rows, k < K, d < depth: row-major, rows lda, ldb and
// ldc floats apart, on the calling thread (the caller parallelises). K must be a multiple of 16
// (the tiles read 16 columns at a time); zeros: K zeros (the tiles' bias). wide: the AVX-512 tiles
// (6 x 64), only where the CPU has AVX-512F; else AVX2's (6 x 16) or the generic ones.
void gemm_rows(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
               int64_t depth, int64_t K, const float* zeros, bool wide);

}  // namespace resnet_fast
