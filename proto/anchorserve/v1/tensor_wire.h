// Tensor bytes in and out of serialized v1 messages without protobuf's copies.
//
// Protobuf copies a `bytes` field into a std::string when a message is built, again when it is
// serialized, and once more (growing the string past 50 MB) when it is parsed. For the hundreds of
// MiB of Q/K/V and output that one Attend call carries, these copies (and the page faults of the
// fresh memory they land in) cost more than the transfer itself. The helpers below work on the
// wire format directly (unary Attend's tensors, and the streams' chunks: AttendStream's
// TensorChunk and Prefill's KvChunk, whose bytes field has another number):
//   - writing: the small part of a message (specs, config, metrics) is serialized by protobuf, and
//     each tensor's bytes follow as one more occurrence of its Tensor field holding only `data`.
//     Protobuf merges repeated occurrences of an embedded message field, so any protobuf parser
//     reads the result as the one message with `data` set. The data itself is a gRPC slice over
//     the caller's buffer: gRPC writes it to the socket from there.
//   - reading: SplitTensorData walks a received message, leaves each tensor's `data` where gRPC
//     received it (a list of pieces of its slices) and re-encodes everything else into a small
//     string for ParseFromString.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "anchorserve/v1/anchorserve.pb.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"

namespace anchorserve {

// Field number of `data` in v1.Tensor.
inline constexpr int kTensorDataField = v1::Tensor::kDataFieldNumber;

// Pieces of one bytes field as received, in order; they point into SplitMessage::slices.
struct SegmentedBytes {
  std::vector<absl::string_view> pieces;
  size_t size = 0;

  // Copies the pieces, in order, to `dest` (which holds at least `size` bytes).
  void CopyTo(char* dest) const;
};

// A received message split into its tensors' data and everything else.
struct SplitMessage {
  std::vector<grpc::Slice> slices;  // keep the pieces alive
  std::string rest;  // the message without the extracted data fields; parse with protobuf
  // Outer field number of each tensor whose data field was present -> its data (the last
  // occurrence, as protobuf would keep it).
  std::map<int, SegmentedBytes> data;
};

// Splits `buffer`, a serialized message whose fields `tensor_fields` are embedded messages with a
// bytes field `data_field` (v1.Tensor's data by default; v1.TensorChunk.data and v1.KvChunk.data
// for the streams' chunks), into those bytes and the rest. INVALID_ARGUMENT for a malformed
// message.
absl::StatusOr<SplitMessage> SplitTensorData(const grpc::ByteBuffer& buffer,
                                             absl::Span<const int> tensor_fields,
                                             int data_field = kTensorDataField);

// Appends to `slices` one occurrence of embedded message field `tensor_field` that holds only
// bytes field `data_field` = `data` (a slice that is not copied). Nothing is appended for empty
// data.
void AppendTensorData(int tensor_field, grpc::Slice data, std::vector<grpc::Slice>* slices,
                      int data_field = kTensorDataField);

// For processes that receive large streams (anchorserve, anchorctl; call once at start): keeps up
// to kReceiveHeapTrimBytes of freed memory at the top of each malloc arena instead of glibc's
// default of 128 KiB. gRPC reads into 64 KiB slices and frees them once a message is consumed;
// with the default, that memory goes back to the kernel after every few messages and the next
// reads fault it in and zero it again, which costs more than the copy of the bytes. Does nothing
// when the user set the threshold (MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES).
inline constexpr int kReceiveHeapTrimBytes = 64 << 20;
void KeepReceiveBuffersResident();

}  // namespace anchorserve
