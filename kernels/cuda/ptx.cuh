// Inline-PTX wrappers for the sm_80/sm_90a instructions the attention and identification
// kernels use: cp.async row pieces, ldmatrix, proxy fences, named barriers, mbarriers, register
// reallocation, and the warpgroup MMAs (wgmma) with their shared-memory descriptors. The one home
// of these wrappers: attention_common.cuh and identification_common.cuh include it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace anchorserve::cuda::ptx {

__device__ __forceinline__ uint32_t SmemAddress(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// 16 bytes global -> shared, bypassing L1; zero-fills the destination when `valid` is false
// (the source is then not read, but must still be a mapped address).
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most kPending of this thread's newest cp.async groups are still in flight.
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}
// Four 8x8 b16 matrices; lane l gives the row address of matrix l / 8, row l % 8.
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
// Shared memory written through the generic proxy (cp.async, st.shared) becomes visible to the
// tensor cores' async proxy only after this fence (then a barrier).
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Barrier over the 128 threads of one warpgroup (ids 1 and 2; 0 is __syncthreads).
__device__ __forceinline__ void WarpgroupBarrier(int warpgroup) {
  if (warpgroup == 0) {
    asm volatile("bar.sync 1, 128;\n" ::: "memory");
  } else {
    asm volatile("bar.sync 2, 128;\n" ::: "memory");
  }
}

// Barrier over `count` threads that only signals (never waits): the other side of a bar.sync
// with the same id and count.
__device__ __forceinline__ void NamedBarrierArrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void NamedBarrierSync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// mbarrier (shared-memory transaction barrier) primitives. A barrier completes a phase when
// `count` arrivals have been made; waiters name the phase by its parity.
__device__ __forceinline__ void MbarrierInit(uint32_t barrier, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(barrier), "r"(count) : "memory");
}
// Makes initialised barriers visible to the other threads (and the async proxy) of the CTA.
__device__ __forceinline__ void FenceMbarrierInit() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void MbarrierArrive(uint32_t barrier) {
  asm volatile(
      "{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(barrier)
      : "memory");
}
// True once the phase with parity `parity` has completed. A freshly initialised barrier counts
// its (never run) phase before phase 0 as completed: waiting for parity 1 passes at once.
__device__ __forceinline__ bool MbarrierTryWait(uint32_t barrier, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(barrier), "r"(parity)
      : "memory");
  return done != 0;
}
__device__ __forceinline__ void MbarrierWait(uint32_t barrier, uint32_t parity) {
  while (!MbarrierTryWait(barrier, parity)) {
  }
}
// One arrival on `barrier` when every cp.async this thread issued so far has landed (the
// barrier's expected count includes this arrival: .noinc).
__device__ __forceinline__ void CpAsyncMbarrierArrive(uint32_t barrier) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(barrier) : "memory");
}
__device__ __forceinline__ void CpAsyncWaitAllUngrouped() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// One arrival on `barrier` that also expects `bytes` more bytes of bulk (TMA) copies to land
// before the phase can complete.
__device__ __forceinline__ void MbarrierArriveExpectTx(uint32_t barrier, uint32_t bytes) {
  asm volatile(
      "{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(
          barrier),
      "r"(bytes)
      : "memory");
}
// Tensor-map (TMA) copy of one 3-D box global -> shared; its bytes complete on `barrier`.
// `tensor_map` is the generic address of a CUtensorMap in parameter, constant or global memory.
__device__ __forceinline__ void TmaLoad3d(uint32_t dst, const void* tensor_map, uint32_t barrier,
                                          int32_t c0, int32_t c1, int32_t c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(barrier), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// Register reallocation between warpgroups (sm_90a). Every warp of a warpgroup executes it.
template <int kRegisters>
__device__ __forceinline__ void SetMaxRegistersIncrease() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void SetMaxRegistersDecrease() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Pins registers at this point of the program so the compiler neither reads accumulators before
// the wgmma that writes them has been waited for, nor moves writes across the issue, nor reuses
// the registers of an A operand that an in-flight wgmma still reads.
template <int kCount>
__device__ __forceinline__ void PinRegisters(float (&regs)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(regs[i])::"memory");
}
template <int kCount>
__device__ __forceinline__ void PinRegisters(uint32_t (&regs)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+r"(regs[i])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle. Byte offsets are encoded >> 4.
// K-major operands: `stride_bytes` = distance between 8-row core groups (1024 for packed
// 128-byte rows); the leading offset is unused. MN-major operands: `leading_bytes` = distance
// between 64-element panels along MN, `stride_bytes` = distance between groups of 8 K rows.
__device__ __forceinline__ uint64_t MakeSmemDescriptor(uint32_t address, uint32_t leading_bytes,
                                                       uint32_t stride_bytes) {
  return static_cast<uint64_t>((address & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFF) << 32) | (uint64_t{1} << 62);
}

// ---------------------------------------------------------------------------------------------
// wgmma.mma_async m64nNk16 with fp32 accumulators `d` (N / 2 registers per thread). The element
// type picks the instruction's .bf16 / .f16 input kind; everything else of the asm is shared.

// clang-format off
// Accumulator operands %0..%63 (N = 128) and %0..%31 (N = 64), in register order.
#define ANCHOR_WGMMA_ACC64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define ANCHOR_WGMMA_ACC32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define ANCHOR_WGMMA_ACC64_OPERANDS(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define ANCHOR_WGMMA_ACC32_OPERANDS(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
// clang-format on

template <typename Elem>
inline constexpr bool kIsBf16 = std::is_same_v<Elem, __nv_bfloat16>;

// D[64x128] (+)= A[64x16] (smem, K-major) * B[16x128] (smem, K-major); accumulate = 0
// overwrites D.
template <typename Elem>
__device__ __forceinline__ void WgmmaSsN128(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                            int accumulate) {
  if constexpr (kIsBf16<Elem>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " ANCHOR_WGMMA_ACC64
        ", "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : ANCHOR_WGMMA_ACC64_OPERANDS(d)
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " ANCHOR_WGMMA_ACC64
        ", "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : ANCHOR_WGMMA_ACC64_OPERANDS(d)
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
  }
}

// D[64x128] (+)= A[64x16] (registers, mma.m16n8k16 A layout per warp) * B[16x128] (smem,
// K-major); accumulate = 0 overwrites D.
template <typename Elem>
__device__ __forceinline__ void WgmmaRsN128(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                            int accumulate) {
  if constexpr (kIsBf16<Elem>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " ANCHOR_WGMMA_ACC64
        ", "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
        : ANCHOR_WGMMA_ACC64_OPERANDS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " ANCHOR_WGMMA_ACC64
        ", "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
        : ANCHOR_WGMMA_ACC64_OPERANDS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
  }
}

// D[64x128] += A[64x16] (registers) * B[16x128] (smem, MN-major: transposed).
template <typename Elem>
__device__ __forceinline__ void WgmmaRsN128TransposedB(float (&d)[64], const uint32_t* a,
                                                       uint64_t desc_b) {
  if constexpr (kIsBf16<Elem>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " ANCHOR_WGMMA_ACC64
        ", "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : ANCHOR_WGMMA_ACC64_OPERANDS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " ANCHOR_WGMMA_ACC64
        ", "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : ANCHOR_WGMMA_ACC64_OPERANDS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  }
}

// D[64x64] += A[64x16] (registers) * B[16x64] (smem, MN-major: transposed).
template <typename Elem>
__device__ __forceinline__ void WgmmaRsN64TransposedB(float (&d)[32], const uint32_t* a,
                                                      uint64_t desc_b) {
  if constexpr (kIsBf16<Elem>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " ANCHOR_WGMMA_ACC32
        ", "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : ANCHOR_WGMMA_ACC32_OPERANDS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " ANCHOR_WGMMA_ACC32
        ", "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : ANCHOR_WGMMA_ACC32_OPERANDS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  }
}

#undef ANCHOR_WGMMA_ACC64
#undef ANCHOR_WGMMA_ACC32
#undef ANCHOR_WGMMA_ACC64_OPERANDS
#undef ANCHOR_WGMMA_ACC32_OPERANDS

}  // namespace anchorserve::cuda::ptx
