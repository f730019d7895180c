// AVX-512 BF16 versions of the bfloat16 row passes declared in vec_math.h, chosen at
// run time by vec_math.cpp; see vec_math_avx512.cpp.
#pragma once

#include <cstdint>

#include "cpu/vec_math.h"

namespace longnet::cpu {

// Whether the bfloat16 row passes run the AVX-512 BF16 code: the processor has
// AVX-512 F/BW/VL and BF16, the build targets x86-64 with GCC or Clang, and the
// environment variable LONGNET_CPU_AVX512 is not "0". choose_bf16_row_pass() decides
// (the fused kernels call it on entry, so the switch acts per call like the others);
// avx512_bf16_rows() returns the last decision.
bool choose_bf16_row_pass();
bool avx512_bf16_rows();

// exp_scaled_sum_bf16 and softmax_grad_pair_bf16 of vec_math.h; only to be called when
// avx512_bf16_rows() is true.
float exp_scaled_sum_bf16_avx512(const float* s, float scale, float m, uint16_t* p, int64_t n,
                                 int64_t n_pad);
void softmax_grad_pair_bf16_avx512(const GradRowPair& g, float scale, int64_t n, uint16_t* p_pairs,
                                   uint16_t* ds_pairs, uint16_t* ds_rows, int64_t ld_rows,
                                   int64_t rows, int64_t n_pad);

}  // namespace longnet::cpu
