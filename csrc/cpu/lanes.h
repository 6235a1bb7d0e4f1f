// Lanes<T, L>: L values of T in vector registers (GCC's vector extensions), the type the CPU
// passes (fused_unit_passes.h) compute in, with the shared formulas of ../fused_unit_math.h
// taking it as their T. Every operation acts lane by lane exactly as the scalar one does
// (no contraction into FMAs: the including file turns it off), so results depend neither
// on L nor on the instruction set. Every function here is always inlined, so it compiles
// for the instruction set of the pass that calls it, also through the shared formulas
// (which, compiled for the baseline, could not inline a function compiled for AVX-512);
// and each build has its own copy, in an anonymous namespace.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#define VGGBENCH_LANES inline __attribute__((always_inline))
#define VGGBENCH_LANES_LAMBDA __attribute__((always_inline))

namespace vggbench {
namespace {

// The bytes of one vector register of this build (fused_unit_kernel*.cpp define which).
#if defined(VGGBENCH_CPU_PASSES_AVX512)
constexpr int kRegisterBytes = 64;
#elif defined(VGGBENCH_CPU_PASSES_AVX2)
constexpr int kRegisterBytes = 32;
#else
constexpr int kRegisterBytes = 16;
#endif

// Whether the inline asm below may name this build's vectors as registers: in the AVX2 and
// AVX-512 builds, except the emulated AVX-512 one (VGGBENCH_EMULATE_AVX512, a test build for
// CPUs without AVX-512: its 64-byte vectors live in pairs of AVX2 registers; same bits).
#if defined(VGGBENCH_CPU_PASSES_AVX2) || (defined(VGGBENCH_CPU_PASSES_AVX512) && !defined(VGGBENCH_EMULATE_AVX512))
#define VGGBENCH_LANES_ASM 1
#else
#define VGGBENCH_LANES_ASM 0
#endif

template <typename T, int N>
struct VectorOf {
  using type [[gnu::vector_size(sizeof(T) * N)]] = T;
  // the same at any address, aliasing anything: how lanes are read and written in memory
  // (a memcpy into a vector goes through the stack in the AVX2 build)
  using unaligned [[gnu::vector_size(sizeof(T) * N), gnu::aligned(1), gnu::may_alias]] = T;
};

// Lane l lives in part l / kPart, a vector of at most one register: GCC turns a select
// (`?:`) on wider vectors into scalar code.
template <typename T, int L>
struct Lanes {
  static constexpr int kPart = L < kRegisterBytes / int(sizeof(T)) ? L : kRegisterBytes / int(sizeof(T));
  static constexpr int kParts = L / kPart;
  using part = typename VectorOf<T, kPart>::type;
  using part_mask = decltype(part{} < part{});  // all bits set in a lane where true
  struct Mask {
    part_mask m[kParts];
  };
  part v[kParts];

  Lanes() = default;
  // a number in every lane
  template <typename S, std::enable_if_t<std::is_arithmetic_v<S>, int> = 0>
  VGGBENCH_LANES Lanes(S value) {
    const part all = splat(static_cast<T>(value));
    for (int p = 0; p < kParts; ++p) v[p] = all;
  }
  // converted lane by lane
  template <typename U>
  VGGBENCH_LANES explicit Lanes(const Lanes<U, L>& other) {
    convert(other, std::make_integer_sequence<int, kParts>{});
  }

  VGGBENCH_LANES T operator[](int l) const { return v[l / kPart][l % kPart]; }

  // r.v[p] = expression(p) for every part
  template <typename F>
  static VGGBENCH_LANES Lanes of_parts(F expression) {
    Lanes r;
    for (int p = 0; p < kParts; ++p) r.v[p] = expression(p);
    return r;
  }
  template <typename F>
  static VGGBENCH_LANES Mask mask_of_parts(F expression) {
    Mask r;
    for (int p = 0; p < kParts; ++p) r.m[p] = expression(p);
    return r;
  }

  // Part P of a conversion from other: its lanes sliced out of a wider part of other, or
  // joined from two narrower ones, and converted.
  template <typename U, int... P>
  VGGBENCH_LANES void convert(const Lanes<U, L>& other, std::integer_sequence<int, P...>) {
    ((v[P] = converted<P>(other)), ...);
  }
  template <int P, typename U>
  static VGGBENCH_LANES part converted(const Lanes<U, L>& other) {
    constexpr int kOther = Lanes<U, L>::kPart;
    if constexpr (kOther == kPart) {
      return __builtin_convertvector(other.v[P], part);
    } else if constexpr (kOther > kPart) {  // converted whole (GCC widens a register at once)
      const auto wide = __builtin_convertvector(other.v[P * kPart / kOther], typename VectorOf<T, kOther>::type);
      return slice<P * kPart % kOther>(wide, std::make_integer_sequence<int, kPart>{});
    } else {
      static_assert(kPart == 2 * kOther, "parts of 2 registers at most");
      const auto joined = slice<0>(other.v[2 * P], other.v[2 * P + 1], std::make_integer_sequence<int, kPart>{});
      return __builtin_convertvector(joined, part);
    }
  }
  // x in every lane of a part: a variable with one broadcast instruction in the AVX builds,
  // where GCC 12 otherwise inserts it lane by lane (a masked broadcast per lane); a
  // constant as a constant (which then folds: x - 0 is x).
  static VGGBENCH_LANES part splat(T x) {
    part all;
#if VGGBENCH_LANES_ASM
    if (!__builtin_constant_p(x)) {
      if constexpr (std::is_same_v<T, float> && kPart > 1) {
        asm("vbroadcastss %1, %0" : "=v"(all) : "v"(x));
        return all;
      } else if constexpr (std::is_same_v<T, double> && kPart > 1) {
        asm("vbroadcastsd %1, %0" : "=v"(all) : "v"(x));
        return all;
      }
    }
#endif
    for (int l = 0; l < kPart; ++l) all[l] = x;
    return all;
  }
  template <int First, typename V, int... I>
  static VGGBENCH_LANES auto slice(V x, std::integer_sequence<int, I...>) {
    return __builtin_shufflevector(x, x, (First + I)...);
  }
  template <int First, typename V, int... I>
  static VGGBENCH_LANES auto slice(V x, V y, std::integer_sequence<int, I...>) {
    return __builtin_shufflevector(x, y, (First + I)...);
  }

  friend VGGBENCH_LANES Lanes operator+(const Lanes& a, const Lanes& b) {
    return of_parts([&](int p) VGGBENCH_LANES_LAMBDA { return a.v[p] + b.v[p]; });
  }
  friend VGGBENCH_LANES Lanes operator-(const Lanes& a, const Lanes& b) {
    return of_parts([&](int p) VGGBENCH_LANES_LAMBDA { return a.v[p] - b.v[p]; });
  }
  friend VGGBENCH_LANES Lanes operator*(const Lanes& a, const Lanes& b) {
    return of_parts([&](int p) VGGBENCH_LANES_LAMBDA { return a.v[p] * b.v[p]; });
  }
  friend VGGBENCH_LANES Lanes operator/(const Lanes& a, const Lanes& b) {
    return of_parts([&](int p) VGGBENCH_LANES_LAMBDA { return a.v[p] / b.v[p]; });
  }
  friend VGGBENCH_LANES Lanes operator-(const Lanes& a) {
    return of_parts([&](int p) VGGBENCH_LANES_LAMBDA { return -a.v[p]; });
  }
  friend VGGBENCH_LANES Mask operator<(const Lanes& a, const Lanes& b) {
    return mask_of_parts([&](int p) VGGBENCH_LANES_LAMBDA { return a.v[p] < b.v[p]; });
  }
  friend VGGBENCH_LANES Mask operator>(const Lanes& a, const Lanes& b) {
    return mask_of_parts([&](int p) VGGBENCH_LANES_LAMBDA { return a.v[p] > b.v[p]; });
  }
  // math::select for lanes
  friend VGGBENCH_LANES Lanes select(const Mask& m, const Lanes& a, const Lanes& b) {
    return of_parts([&](int p) VGGBENCH_LANES_LAMBDA { return m.m[p] ? a.v[p] : b.v[p]; });
  }
  // math::abs_of for lanes: the sign bit cleared, one instruction. Unlike the scalar
  // formula it maps -0 to +0 (and clears a NaN's sign), which no sum of the rule's terms
  // (all started at +0) can tell apart.
  friend VGGBENCH_LANES Lanes abs_of(const Lanes& a) {
    const part_mask magnitude = ~(part_mask)(T(-0.0) - part{});
    return of_parts([&](int p) VGGBENCH_LANES_LAMBDA { return (part)((part_mask)a.v[p] & magnitude); });
  }
};

// Activations in memory: float, double, or c10::BFloat16 as its bits (a float's upper
// half), widened to the compute type T on load and rounded back on store.
template <typename S>
constexpr bool kIsBFloat16 = std::is_same_v<S, c10::BFloat16>;

// The lanes of p[0, L) as they are in memory.
template <typename T, int L>
VGGBENCH_LANES Lanes<T, L> read_lanes(const T* p) {
  using Memory = typename VectorOf<T, Lanes<T, L>::kPart>::unaligned;
  return Lanes<T, L>::of_parts([&](int q) VGGBENCH_LANES_LAMBDA {
    return *reinterpret_cast<const Memory*>(p + q * Lanes<T, L>::kPart);
  });
}
template <typename T, int L>
VGGBENCH_LANES void write_lanes(T* p, const Lanes<T, L>& a) {
  using Memory = typename VectorOf<T, Lanes<T, L>::kPart>::unaligned;
  for (int q = 0; q < Lanes<T, L>::kParts; ++q) *reinterpret_cast<Memory*>(p + q * Lanes<T, L>::kPart) = a.v[q];
}

// The same lanes' bits as another type of the same size (float <-> uint32_t).
template <typename U, typename T, int L>
VGGBENCH_LANES Lanes<U, L> bits_as(const Lanes<T, L>& a) {
  static_assert(sizeof(U) == sizeof(T));
  return Lanes<U, L>::of_parts([&](int q) VGGBENCH_LANES_LAMBDA { return (typename Lanes<U, L>::part)a.v[q]; });
}

template <typename T, int L, typename S>
VGGBENCH_LANES Lanes<T, L> load_lanes(const S* p) {
  if constexpr (kIsBFloat16<S>) {
    const Lanes<uint32_t, L> bits(read_lanes<uint16_t, L>(reinterpret_cast<const uint16_t*>(p)));
    return bits_as<T>(Lanes<uint32_t, L>::of_parts([&](int q) VGGBENCH_LANES_LAMBDA { return bits.v[q] << 16; }));
  } else {
    return read_lanes<T, L>(p);
  }
}

template <typename T, int L, typename S>
VGGBENCH_LANES void store_lanes(S* p, const Lanes<T, L>& a) {
  if constexpr (kIsBFloat16<S>) {
    // rounded to nearest even, NaN to 0x7fc0: c10::BFloat16's rounding, bit for bit
    using Bits = Lanes<uint32_t, L>;
    const Bits u = bits_as<uint32_t>(a);
    const Bits rounded = Bits::of_parts([&](int q) VGGBENCH_LANES_LAMBDA {
      const auto nan = (typename Bits::part)(a.v[q] != a.v[q]);
      const auto even = (u.v[q] + ((u.v[q] >> 16) & 1u) + 0x7fffu) >> 16;
      return (even & ~nan) | (nan & 0x7fc0u);
    });
    write_lanes(reinterpret_cast<uint16_t*>(p), Lanes<uint16_t, L>(rounded));
  } else {
    write_lanes(p, a);
  }
}

// *p in every lane: a float straight from memory into a register with one broadcast in
// the AVX builds (Lanes(*p) first loads it, then broadcasts it).
template <int L>
VGGBENCH_LANES Lanes<float, L> broadcast_lanes(const float* p) {
#if VGGBENCH_LANES_ASM
  if constexpr (Lanes<float, L>::kPart > 1) {
    typename Lanes<float, L>::part all;
    asm("vbroadcastss %1, %0" : "=v"(all) : "m"(*p));
    return Lanes<float, L>::of_parts([&](int) VGGBENCH_LANES_LAMBDA { return all; });
  }
#endif
  return Lanes<float, L>(*p);
}

// a * b + c: rounded once (an FMA) in the AVX builds, twice in the baseline, which has no
// FMA. Only for sums whose bits may differ from the baseline's (the passes add rounded
// products everywhere else).
template <int L>
VGGBENCH_LANES Lanes<float, L> multiply_add(const Lanes<float, L>& a, const Lanes<float, L>& b,
                                            const Lanes<float, L>& c) {
#if VGGBENCH_LANES_ASM
  if constexpr (Lanes<float, L>::kPart > 4) {
    return Lanes<float, L>::of_parts([&](int q) VGGBENCH_LANES_LAMBDA {
      auto sum = c.v[q];
      asm("vfmadd231ps %2, %1, %0" : "+v"(sum) : "v"(a.v[q]), "vm"(b.v[q]));
      return sum;
    });
  }
#elif defined(VGGBENCH_CPU_PASSES_AVX512)  // emulated
  if constexpr (Lanes<float, L>::kPart > 4) {  // rounded once, as the AVX-512 build's FMAs
    return Lanes<float, L>::of_parts([&](int q) VGGBENCH_LANES_LAMBDA {
      auto sum = c.v[q];
      for (int l = 0; l < Lanes<float, L>::kPart; ++l) sum[l] = __builtin_fmaf(a.v[q][l], b.v[q][l], c.v[q][l]);
      return sum;
    });
  }
#endif
  return a * b + c;
}

// The first n < L values (the rest read as 0, and not written).
template <typename T, int L, typename S>
VGGBENCH_LANES Lanes<T, L> load_some(const S* p, int64_t n) {
  S part[L] = {};
  __builtin_memcpy(part, p, n * sizeof(S));
  return load_lanes<T, L>(part);
}

template <typename T, int L, typename S>
VGGBENCH_LANES void store_some(S* p, const Lanes<T, L>& a, int64_t n) {
  S part[L];
  store_lanes(part, a);
  __builtin_memcpy(p, part, n * sizeof(S));
}

}  // namespace
}  // namespace vggbench

#undef VGGBENCH_LANES
#undef VGGBENCH_LANES_LAMBDA
