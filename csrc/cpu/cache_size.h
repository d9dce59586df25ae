// Size of the L3 cache that the calling thread's core shares with its neighbours, asked once
// per process.
#pragma once

#include <cstdint>
#include <fstream>
#include <string>

#if defined(__linux__)
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace ldm::cpu {

// Used when neither the OS nor cpuid says: the L3 of one AMD Zen 3 / Zen 4 core complex.
constexpr int64_t kFallbackL3Bytes = int64_t{32} << 20;

namespace detail {

// Linux sysfs: the level-3 entry of cpu0's cache list, e.g. "32768K". This is the cache of
// one core complex, where sysconf and cpuid leaf 0x80000006 report all L3 slices of an AMD
// package together (256 MB on a Zen 3 EPYC with 32 MB per complex).
inline int64_t l3_bytes_from_sysfs() {
#if defined(__linux__)
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    std::ifstream level_file(dir + "/level"), size_file(dir + "/size");
    int level = 0;
    if (!(level_file >> level) || level != 3) continue;
    int64_t size = 0;
    std::string unit;
    if (!(size_file >> size) || size <= 0) return 0;
    size_file >> unit;
    if (!unit.empty() && unit[0] == 'K') return size << 10;
    if (!unit.empty() && unit[0] == 'M') return size << 20;
    return size;
  }
#endif
  return 0;
}

// glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) (0 or -1 when unknown).
inline int64_t l3_bytes_from_sysconf() {
#if defined(__linux__) && defined(__GLIBC__) && defined(_SC_LEVEL3_CACHE_SIZE)
  const long bytes = sysconf(_SC_LEVEL3_CACHE_SIZE);
  return bytes > 0 ? static_cast<int64_t>(bytes) : 0;
#else
  return 0;
#endif
}

// x86 cpuid: AMD's leaf 0x80000006 (EDX[31:18], L3 size in 512 KB units; reserved, so 0, on
// Intel), else Intel's deterministic cache parameters, leaf 4 (ways x partitions x line size
// x sets of the level-3 data or unified cache).
inline int64_t l3_bytes_from_cpuid() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_max(0x80000000u, nullptr) >= 0x80000006u &&
      __get_cpuid(0x80000006u, &eax, &ebx, &ecx, &edx) && (edx >> 18) != 0) {
    return static_cast<int64_t>(edx >> 18) * (int64_t{512} << 10);
  }
  if (__get_cpuid_max(0, nullptr) >= 4) {
    for (unsigned sub = 0; sub < 16; ++sub) {
      __cpuid_count(4, sub, eax, ebx, ecx, edx);
      const unsigned type = eax & 0x1f, level = (eax >> 5) & 0x7;
      if (type == 0) break;  // no more caches
      if (level == 3 && (type == 1 || type == 3)) {
        return static_cast<int64_t>((ebx >> 22) + 1) * (((ebx >> 12) & 0x3ff) + 1) *
               ((ebx & 0xfff) + 1) * (static_cast<int64_t>(ecx) + 1);
      }
    }
  }
#endif
  return 0;
}

}  // namespace detail

// L3 bytes: sysfs, else sysconf, else cpuid, else kFallbackL3Bytes; computed on first use.
inline int64_t l3_cache_bytes() {
  static const int64_t bytes = [] {
    for (int64_t (*query)() : {detail::l3_bytes_from_sysfs, detail::l3_bytes_from_sysconf,
                               detail::l3_bytes_from_cpuid}) {
      if (const int64_t b = query(); b > 0) return b;
    }
    return kFallbackL3Bytes;
  }();
  return bytes;
}

}  // namespace ldm::cpu
