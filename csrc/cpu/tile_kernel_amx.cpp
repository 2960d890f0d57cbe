// The certified bf16 pass on CPUs with AMX-BF16 (Sapphire Rapids and later):
// TDPBF16PS on 16 x 16 tiles, 8,192 multiply-adds per instruction. On those
// CPUs VDPBF16PS runs at half the fp32 FMA's rate (measured in RESULTS.md),
// so AMX is the only bf16 unit that pays there. Everything else (the fp32
// tile for uncertified rows, exact keys, logits, squares) is the AVX-512
// kernel's. Only this file is compiled for AMX; it runs only where the CPU
// reports AMX-BF16 and Linux grants the process the tile state.
//
// Intel does not specify the order or rounding of TDPBF16PS's accumulation
// (this CPU's results match no sequential model: RESULTS.md), so there is no
// bit-exact emulation of it; its error is bounded by certify::
// tensor_core_error's order-free model instead, 32 products a step, and the
// C++ tests check the instruction against that bound, exactly, where it runs.
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "fastvote/topk.h"
#include "tile_kernel.h"

#pragma GCC push_options
#pragma GCC target("avx512f,fma,amx-tile,amx-bf16")

#include "tile_kernel_avx512.h"
#include "tile_kernel_impl.h"

namespace fastvote {
namespace cpu {
namespace {

constexpr int kBlock = 16;  // a tile: 16 rows of 64 bytes (16 fp32, or 16 bf16 pairs)

// The tile registers' shapes (palette 1): 0-3 accumulate 2 x 2 blocks of
// 16 centroids x 16 rows; 4-5 hold two blocks of centroids, 6-7 two of rows.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) {
      bytes_per_row[t] = 64;
      rows[t] = kBlock;
    }
  }
};

// One job: for each block of 32 centroids (A: centroid rows, 16 pairs a tile
// row), every slab's two halves of 16 rows (B: the slab's [pair][lane] layout
// is TDPBF16PS's pair-interleaved B operand as it lies), accumulated over all
// pairs; then the tile kernel's epilogue on the 32 x 32 keys, centroids in
// increasing order.
void amx_tile(const Bf16TileJob& job) {
  const Mxcsr flush(Mxcsr::kFlushDenormals);  // the epilogue's fma, as run_bf16_tile's
  const TileConfig config;
  _tile_loadconfig(&config);
  const int64_t pairs = job.dim;  // a multiple of 16 (Kernels::candidate_pair_block)
  const int64_t num_slabs = (job.rows + kSlab - 1) / kSlab;
  const int64_t a_stride = job.ldc * sizeof(uint32_t), b_stride = kSlab * sizeof(uint32_t);
  // [buffer][centroid block][row half][centroid][lane]: a block's keys are
  // read by the epilogue while the next block's TDPBF16PS chain runs
  alignas(64) float acc[2][2][2][kBlock * kBlock];
  const auto epilogue = [&](const float (*keys)[2][kBlock * kBlock], int64_t j0, int64_t r0, int m) {
    for (int j = 0; j < m; ++j) {
      const int64_t cj = j0 + j;
      const __m512 bias = _mm512_set1_ps(job.bias[cj]), scale = _mm512_set1_ps(job.scale[cj]);
      for (int half = 0; half < 2; ++half) {
        const __m512 key = _mm512_fmadd_ps(scale, _mm512_load_ps(keys[j / kBlock][half] + (j % kBlock) * kBlock), bias);
        insert_admitted<Avx512>(job, r0 + half * kBlock, key, cj);
      }
    }
  };
  int buffer = 0, last_m = 0;  // the block whose keys wait in acc[buffer ^ 1] (last_m 0: none)
  int64_t last_j0 = 0, last_r0 = 0;

  for (int64_t j0 = 0; j0 < job.num_centroids; j0 += 2 * kBlock) {
    // Centroid rows up to a multiple of 32 are there, zero (candidate_centroid_block).
    const uint32_t* a0 = job.centroids + j0 * job.ldc;
    const uint32_t* a1 = a0 + kBlock * job.ldc;
    const int m = static_cast<int>(std::min<int64_t>(2 * kBlock, job.num_centroids - j0));
    for (int64_t s = 0; s < num_slabs; ++s) {
      const uint32_t* b = job.packed + s * pairs * kSlab;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t p = 0; p < pairs; p += kBlock) {
        _tile_loadd(4, a0 + p, a_stride);
        _tile_loadd(5, a1 + p, a_stride);
        _tile_loadd(6, b + p * kSlab, b_stride);
        _tile_loadd(7, b + p * kSlab + kBlock, b_stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      // The previous block's epilogue, after this block's chain in program order: the core runs
      // it while the tile unit works (each row still sees its centroids in increasing order).
      if (last_m > 0) epilogue(acc[buffer ^ 1], last_j0, last_r0, last_m);
      _tile_stored(0, acc[buffer][0][0], 64);
      _tile_stored(1, acc[buffer][0][1], 64);
      _tile_stored(2, acc[buffer][1][0], 64);
      _tile_stored(3, acc[buffer][1][1], 64);
      last_j0 = j0, last_r0 = s * kSlab, last_m = m;
      buffer ^= 1;
    }
  }
  if (last_m > 0) epilogue(acc[buffer ^ 1], last_j0, last_r0, last_m);
  _tile_release();
}

// AMX-BF16 in CPUID (leaf 7: EDX bit 22, AMX-TILE bit 24), and Linux's
// permission for this process to use the tile data (off until asked for).
bool amx_usable() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!(d & (1u << 22)) || !(d & (1u << 24))) return false;
#if defined(SYS_arch_prctl)
  constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

}  // namespace

bool cpu_has_amx_bf16() {
  static const bool usable = amx_usable();
  return usable;
}

Kernels kernels_amxbf16() {
  Kernels k = kernels_avx512();
  k.name = "amxbf16";
  k.candidates = amx_tile;
  k.candidate_shape = {kBlock, 2 * kBlock, 2 * kBlock};
  return k;
}

}  // namespace cpu
}  // namespace fastvote

#pragma GCC pop_options
#endif
