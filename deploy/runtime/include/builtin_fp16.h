/*
 * tvmq: the float <-> half conversions the runtime sources (builtin_fp16.cc, the random-fill
 * used by MetaSchedule's RPC runner) expect. On aarch64 GCC's __fp16 converts in hardware
 * (fcvt, round to nearest even), so the generic templates reduce to a cast.
 */
#ifndef TVMQ_BUILTIN_FP16_H_
#define TVMQ_BUILTIN_FP16_H_

#include <cstdint>
#include <cstring>

#if !defined(__aarch64__)
#error "tvmq's builtin_fp16.h is for the aarch64 board runtime"
#endif

template <typename SrcT, typename SrcRepT, int SrcSigBits, typename DstT, typename DstRepT,
          int DstSigBits>
inline DstT __truncXfYf2__(SrcT a) {
  static_assert(DstSigBits == 10 && sizeof(DstT) == 2, "only IEEE half results");
  __fp16 h = static_cast<__fp16>(a);
  DstT out;
  std::memcpy(&out, &h, sizeof(out));
  return out;
}

template <typename SrcT, typename SrcRepT, int SrcSigBits, typename DstT, typename DstRepT,
          int DstSigBits>
inline DstT __extendXfYf2__(SrcT a) {
  static_assert(SrcSigBits == 10 && sizeof(SrcT) == 2, "only IEEE half inputs");
  __fp16 h;
  std::memcpy(&h, &a, sizeof(h));
  return static_cast<DstT>(h);
}

#endif  // TVMQ_BUILTIN_FP16_H_
