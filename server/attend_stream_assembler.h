// The input side of AttendStream without gRPC: one header, then in-order chunks of q, k and v,
// checked and copied into one buffer per tensor. The reactor (attend_stream_reactor.cc) feeds it
// each received message; the fuzz target fuzz/attend_stream_assembler_fuzzer.cc feeds it
// arbitrary sequences.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "anchorserve/v1/anchorserve.pb.h"
#include "proto/anchorserve/v1/tensor_wire.h"
#include "server/host_buffer.h"
#include "server/memory_budget.h"
#include "server/proto_convert.h"

namespace anchorserve {

class AttendStreamAssembler {
 public:
  // `options` must outlive the assembler, `budget` and `cache` (both optional) too. With a
  // budget, a header whose q, k, v and output cannot fit in its free room is refused, and the
  // input bytes are charged to it as they arrive (so a stalled upload holds only what it sent).
  explicit AttendStreamAssembler(const ConvertOptions* options, MemoryBudget* budget = nullptr,
                                 HostBufferCache* cache = nullptr)
      : options_(options), budget_(budget), cache_(cache) {}

  // Takes the next message. Not OK (INVALID_ARGUMENT, or RESOURCE_EXHAUSTED for sizes over the
  // limits, over the memory budget, or an allocation that fails) ends the stream; the message
  // names the field or rule. A chunk's bytes are `chunk_data` when given (where gRPC received
  // them, split off the message: ParseRawMessageWithChunk), else the message's chunk.data.
  absl::Status Add(const v1::AttendStreamRequest& message,
                   const SegmentedBytes* chunk_data = nullptr);

  bool header_received() const { return header_received_; }
  // Every byte of q, k and v has arrived.
  bool complete() const;
  // Why a stream that ends now is incomplete (before the header, or which bytes are missing).
  std::string EndedEarlyMessage() const;

  // Valid once the header is in.
  const RequestSpec& spec() const { return spec_; }
  const std::string& requested_id() const { return requested_id_; }
  // q, k, v (index 0, 1, 2); null before the header and after ReleaseData.
  const char* data(int index) const { return inputs_[index].data.get(); }
  // Frees the buffers and gives their bytes back to the budget (the sizes and counts stay for
  // later messages' errors).
  void ReleaseData();

 private:
  struct Input {
    absl::string_view name;
    HostBuffer data;
    int64_t size = 0;
    int64_t received = 0;
  };

  absl::Status AddHeader(const v1::StreamHeader& header);
  absl::Status AddChunk(const v1::TensorChunk& chunk, const SegmentedBytes& data);

  const ConvertOptions* const options_;
  MemoryBudget* const budget_;
  HostBufferCache* const cache_;
  MemoryCharge charge_;  // the input bytes received so far
  bool header_received_ = false;
  RequestSpec spec_;
  std::string requested_id_;
  Input inputs_[3];
};

}  // namespace anchorserve
