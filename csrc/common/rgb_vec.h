// 16-lane GCC vectors and RGB (de)interleaving between 48 interleaved values and three
// channel vectors, with two-register permutes (vpermt2d / vpermt2ps on AVX-512) and a select:
// the per-byte scalar loops they replace were a third of the preprocess row kernels' time.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__)
#define EF_VECTOR_SHUFFLE 1

namespace eagle_fast {

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint8_t v16u8 __attribute__((vector_size(16)));

namespace rgb_detail {
// Index tables. Interleaved value g (0..47) is pixel g / 3, channel g % 3; channel vector ch
// lane l is interleaved value 3 l + ch. Lanes drawn from the third source take the select.
struct Tables {
  int32_t il_ab[3][16], il_c[3][16], il_sel[3][16];  // interleave: output vector k
  int32_t de_ab[3][16], de_c[3][16], de_sel[3][16];  // deinterleave: channel ch
};
constexpr Tables make_tables() {
  Tables t{};
  for (int k = 0; k < 3; ++k)
    for (int j = 0; j < 16; ++j) {
      const int g = 16 * k + j, pix = g / 3, ch = g % 3;
      t.il_ab[k][j] = ch < 2 ? ch * 16 + pix : 0;
      t.il_c[k][j] = ch == 2 ? pix : 0;
      t.il_sel[k][j] = ch == 2 ? -1 : 0;
    }
  for (int ch = 0; ch < 3; ++ch)
    for (int l = 0; l < 16; ++l) {
      const int g = 3 * l + ch, vec = g / 16, lane = g % 16;
      t.de_ab[ch][l] = vec < 2 ? vec * 16 + lane : 0;
      t.de_c[ch][l] = vec == 2 ? lane : 0;
      t.de_sel[ch][l] = vec == 2 ? -1 : 0;
    }
  return t;
}
inline constexpr Tables kTables = make_tables();

inline v16i load_idx(const int32_t* p) {
  v16i v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The tables, hidden from the optimizer: with the indices known, GCC expands the permutes into
// long unpack/extract sequences through the stack; as opaque data they become one vpermt2d /
// vpermt2ps and one masked blend each.
inline const Tables* tables() {
  const Tables* t = &kTables;
  asm("" : "+r"(t));
  return t;
}
}  // namespace rgb_detail

// x0, x1, x2: 48 interleaved values -> channel vectors c[0..2] (lane l = pixel l).
template <typename V>
inline void deinterleave3(V x0, V x1, V x2, V c[3]) {
  using namespace rgb_detail;
  const Tables* t = tables();
  for (int ch = 0; ch < 3; ++ch) {
    const V ab = __builtin_shuffle(x0, x1, load_idx(t->de_ab[ch]));
    const V cc = __builtin_shuffle(x2, load_idx(t->de_c[ch]));
    c[ch] = load_idx(t->de_sel[ch]) ? cc : ab;
  }
}

// Channel vectors a, b, c (lane l = pixel l) -> 48 interleaved values o[0..2].
template <typename V>
inline void interleave3(V a, V b, V c, V o[3]) {
  using namespace rgb_detail;
  const Tables* t = tables();
  for (int k = 0; k < 3; ++k) {
    const V ab = __builtin_shuffle(a, b, load_idx(t->il_ab[k]));
    const V cc = __builtin_shuffle(c, load_idx(t->il_c[k]));
    o[k] = load_idx(t->il_sel[k]) ? cc : ab;
  }
}

// Three channel vectors with values in 0..255 -> 16 pixels of interleaved uint8 RGB (48 bytes).
inline void store_rgb16(v16i r, v16i g, v16i b, uint8_t* dst) {
  v16i o[3];
  interleave3(r, g, b, o);
  const v16u8 b0 = __builtin_convertvector(o[0], v16u8), b1 = __builtin_convertvector(o[1], v16u8),
              b2 = __builtin_convertvector(o[2], v16u8);
  std::memcpy(dst, &b0, 16);
  std::memcpy(dst + 16, &b1, 16);
  std::memcpy(dst + 32, &b2, 16);
}

}  // namespace eagle_fast
#endif
