// A kernel fault leaves the CUDA context unusable: the error that reports it must come back marked
// DeviceUnusable, so that the server reports NOT_SERVING. Its own executable: after the fault
// nothing else can use the device in this process (label gpu; skips itself without a device).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_check.h"

namespace anchorserve {
namespace {

__global__ void WriteThroughNull(int* pointer) { *pointer = 1; }

absl::Status SynchronizeAsStatus() {
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return absl::OkStatus();
}

TEST(DeviceFaultTest, IllegalAddressIsReportedAsDeviceUnusable) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  ASSERT_TRUE(SynchronizeAsStatus().ok());
  EXPECT_FALSE(IsDeviceUnusable(SynchronizeAsStatus()));
  WriteThroughNull<<<1, 1>>>(nullptr);
  const absl::Status status = SynchronizeAsStatus();
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal) << status;
  EXPECT_TRUE(IsDeviceUnusable(status)) << status;
  // And it stays so: every later call fails the same way.
  EXPECT_TRUE(IsDeviceUnusable(SynchronizeAsStatus()));
}

}  // namespace
}  // namespace anchorserve
