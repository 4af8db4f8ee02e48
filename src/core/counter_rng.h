#pragma once
// A counter-based normal generator: value i of stream `seed` is a pure function of (seed, i), so host and device
// code produce the same numbers in any order and in parallel (splitmix64 hashing + Box-Muller).
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FLUXSWAP_HD __host__ __device__ inline
#else
#define FLUXSWAP_HD inline
#endif

namespace fluxswap {

FLUXSWAP_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

FLUXSWAP_HD float normal_from_counter(uint64_t seed, uint64_t i) {
  const uint64_t h = splitmix64(seed * 0x2545f4914f6cdd1dull + i);
  // Two 24-bit uniforms in (0, 1].
  const float u1 = (float((h >> 40) & 0xffffff) + 1.0f) * (1.0f / 16777216.0f);
  const float u2 = float((h >> 16) & 0xffffff) * (1.0f / 16777216.0f);
  return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
}

}  // namespace fluxswap
