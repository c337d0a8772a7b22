// Tile sizes of the generic sm80+ decode kernel (plain C++: the binding reads them too).
#pragma once

namespace portmla {
namespace sm80 {

constexpr int kL = 512;  // kv_lora_rank
constexpr int kR = 64;   // rope_dim
constexpr int kD = kL + kR;
constexpr int kBM = 32;
constexpr int kBN = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kSRow = kD + 8;     // padded smem row (elements): 1168 bytes, conflict-free ldmatrix
constexpr int kPRow = kBN + 8;    // padded P row
constexpr int kChunks16 = kD / 8;  // 16-byte chunks per 16-bit entry (72)

constexpr int decode_smem_bytes() {
  return (kBM * kSRow + 2 * kBN * kSRow + kBM * kPRow) * 2 + 4 * kBM * (int)sizeof(float);
}

}  // namespace sm80
}  // namespace portmla
