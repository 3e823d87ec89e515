// Host-only tests (label cpu) of the kernel launchers' argument checks: a launcher rejects
// arguments it cannot serve before any CUDA call, naming the failed precondition. No device is
// needed.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "kernels/cuda/attention_launch.h"
#include "kernels/cuda/identification.h"
#include "kernels/cuda/identification_types.h"
#include "kernels/cuda/launch_result.h"

namespace anchorserve::cuda {
namespace {

void ExpectInvalidArgument(const LaunchResult& result, const std::string& mentions) {
  EXPECT_FALSE(result.ok());
  EXPECT_EQ(result.code, cudaErrorInvalidValue);
  ASSERT_TRUE(result.precondition_failed());
  EXPECT_NE(std::string(result.what).find(mentions), std::string::npos) << result.what;
}

TEST(LaunchResultTest, Kinds) {
  EXPECT_TRUE(LaunchResult::Ok().ok());
  EXPECT_TRUE(LaunchResult::Cuda(cudaSuccess).ok());
  const LaunchResult cuda = LaunchResult::Cuda(cudaErrorLaunchFailure);
  EXPECT_FALSE(cuda.ok());
  EXPECT_FALSE(cuda.precondition_failed());
  const LaunchResult device = LaunchResult::UnsupportedDevice("sm_90a only");
  EXPECT_EQ(device.code, cudaErrorInvalidDevice);
  EXPECT_TRUE(device.precondition_failed());
}

// Valid identification shape: d = 128, GQA 4, step 16 in one pooled row tile.
IdentificationParams ValidIdentificationParams() {
  IdentificationParams p{};
  p.elem_type = ElemType::kBf16;
  p.num_q_heads = 8;
  p.num_kv_heads = 2;
  p.head_dim = 128;
  p.softmax_scale = 0.1f;
  p.geometry = AnchorGeometry{2048, 128, 16, 1, 1};
  p.pooled_rows = 16;
  return p;
}

TEST(LaunchChecksTest, IdentificationStagesNameTheFailedShapeCheck) {
  using Launcher = LaunchResult (*)(const IdentificationParams&, cudaStream_t);
  for (const Launcher launch :
       {&LaunchAnchorStage, &LaunchPooling, &LaunchStripeStage, &LaunchStripeCompaction}) {
    IdentificationParams p = ValidIdentificationParams();
    p.head_dim = 96;
    ExpectInvalidArgument(launch(p, nullptr), "head_dim");
    p = ValidIdentificationParams();
    p.num_kv_heads = 0;
    ExpectInvalidArgument(launch(p, nullptr), "num_kv_heads");
    p = ValidIdentificationParams();
    p.num_kv_heads = 3;
    ExpectInvalidArgument(launch(p, nullptr), "multiple of num_kv_heads");
    p = ValidIdentificationParams();
    p.pooled_rows = 24;
    ExpectInvalidArgument(launch(p, nullptr), "kPooledRowTile");
    p = ValidIdentificationParams();
    p.geometry.step = 20;
    ExpectInvalidArgument(launch(p, nullptr), "step");
  }
}

TEST(LaunchChecksTest, AttentionNamesTheFailedArgumentCheck) {
  SeqDesc seq{};
  QueryTile tile{};
  alignas(16) static uint16_t buffer[16];
  AttentionParams p{};
  p.elem_type = ElemType::kFp16;
  p.num_q_heads = 4;
  p.num_kv_heads = 4;
  p.head_dim = 64;
  p.softmax_scale = 0.125f;
  p.seqs = &seq;
  p.num_seqs = 1;
  p.tiles = &tile;
  p.num_tiles = 1;
  p.q = p.k = p.v = buffer;
  p.out = buffer;
  AttentionParams bad = p;
  bad.elem_type = static_cast<ElemType>(7);
  ExpectInvalidArgument(LaunchAttention(bad, nullptr), "elem_type");
  bad = p;
  bad.num_kv_heads = 0;
  ExpectInvalidArgument(LaunchAttention(bad, nullptr), "num_kv_heads");
  bad = p;
  bad.num_q_heads = 70000;
  bad.num_kv_heads = 1;
  ExpectInvalidArgument(LaunchAttention(bad, nullptr), "65535");
  bad = p;
  bad.softmax_scale = -1.0f;
  ExpectInvalidArgument(LaunchAttention(bad, nullptr), "softmax_scale");
  bad = p;
  bad.num_tiles = -1;
  ExpectInvalidArgument(LaunchAttention(bad, nullptr), "num_tiles");
  bad = p;
  bad.tiles = nullptr;
  ExpectInvalidArgument(LaunchAttention(bad, nullptr), "tiles");
  bad = p;
  bad.num_seqs = 0;
  ExpectInvalidArgument(LaunchAttention(bad, nullptr), "num_seqs");
  bad = p;
  bad.v = nullptr;
  ExpectInvalidArgument(LaunchAttention(bad, nullptr), "must not be null");
  bad = p;
  bad.out = reinterpret_cast<uint8_t*>(buffer) + 2;
  ExpectInvalidArgument(LaunchAttention(bad, nullptr), "16-byte aligned");
  bad = p;
  bad.sparse = true;
  bad.geometry = AnchorGeometry{0, 0, 0, 0, 0};
  ExpectInvalidArgument(LaunchAttention(bad, nullptr), "group_size");
  bad.geometry = AnchorGeometry{256, 64, 4, 1, 1};
  ExpectInvalidArgument(LaunchAttention(bad, nullptr), "stripe lists");
  bad = p;
  bad.num_tiles = 0;
  EXPECT_TRUE(LaunchAttention(bad, nullptr).ok());  // nothing to launch
}

}  // namespace
}  // namespace anchorserve::cuda
