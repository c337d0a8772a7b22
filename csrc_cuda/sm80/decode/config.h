// Tile sizes of the generic sm80+ decode kernels (plain C++: the binding reads them too).
//
// Three variants (DecodeParams::variant), chosen by the Python side from the rows a sequence
// has (max_query_len * num_heads) and the shared memory a block may opt in to:
//   kLegacy  32 rows x 32 tokens, 8 warps, 2 CTAs/SM, 115 KB (fits A100's 163 KB twice)
//   kNarrow  16 rows x 64 tokens, 8 warps, 1 CTA/SM  (few heads: memory-bound)
//   kWide    64 rows x 32 tokens, 8 warps, 3 cp.async stages, 1 CTA/SM (many heads: compute)
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

// kHopper (one KV tile at a time) / kHopperPair (tile pairs, one per warpgroup) /
// kHopperNarrow (16 rows a CTA, the products transposed): csrc_cuda/sm90/decode (sm_90a, 16-bit
// caches; the pair kernel fp8 / fp8_ds_mla too), dispatched by dispatch.cu.
// kHopperNarrowQuant: the narrow kernel's layout for fp8 / fp8_ds_mla caches (raw e4m3 in the
// stages, both KV operands from registers), two CTAs per SM.
// kQuant: quant_kernel.cuh, fp8 / fp8_ds_mla caches with 16 rows per CTA, raw e4m3 in shared
// memory, two CTAs per SM (sm80+; used on sm_89+).
constexpr int kQuantRows = 16, kQuantTokens = 64, kQuantThreads = 256;  // the kQuant shapes
enum DecodeVariant : int {
  kLegacy = 0, kNarrow = 1, kWide = 2, kHopper = 3, kHopperPair = 4, kQuant = 5,
  kHopperNarrow = 6, kHopperNarrowQuant = 7
};

// Tile kernel shape. 8 warps. S = Q K^T: warp (wr = w % WR, wt = w / WR) computes rows 16 wr..
// and TN tokens TN wt..; O += P V: every warp owns all BM rows and 64 output columns 64 w...
template <int BM_, int BN_, int STAGES_>
struct TileCfg {
  static constexpr int kBM = BM_, kBN = BN_, kStages = STAGES_;
  static constexpr int kWarps = 8, kThreads = 256;
  static constexpr int kWR = BM_ / 16;       // S row groups
  static constexpr int kWT = kWarps / kWR;   // S token groups
  static constexpr int kTN = BN_ / kWT;      // tokens per warp in S
  static constexpr int kNI = kTN / 8;        // n8 tiles per warp in S
  static constexpr int kMI = BM_ / 16;       // m16 tiles per warp in O
  static constexpr int kOC = kL / kWarps;    // output columns per warp (64)
  static constexpr int kPRow = BN_ + 8;      // padded P row (elements)
  static_assert(kWR * kWT == kWarps && kTN % 8 == 0 && kNI >= 1, "bad tile config");
  // KV buffers in shared memory: cp.async stages for 16-bit caches; 2 for fp8 (registers
  // carry the next tile, converted when stored).
  static constexpr int kv_bufs(bool kv16) { return kv16 ? STAGES_ : 2; }
  static constexpr int smem_bytes(bool kv16) {
    return (BM_ * kSRow + kv_bufs(kv16) * BN_ * kSRow + BM_ * kPRow) * 2 +
           kWT * BM_ * (int)sizeof(float) + 2 * BN_ * 8;  // + block-table offsets [2][BN]
  }
};
using NarrowCfg = TileCfg<16, 64, 2>;
using WideCfg = TileCfg<64, 32, 3>;

}  // namespace sm80
}  // namespace portmla
