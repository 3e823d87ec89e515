// SplitTensorData (the unary Attend request's wire split) over arbitrary bytes cut into up to
// four slices: it must never read outside them, and what it accepts must agree with protobuf.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "anchorserve/v1/anchorserve.pb.h"
#include "fuzz/quiet_protobuf.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "proto/anchorserve/v1/tensor_wire.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  anchorserve::fuzz::QuietProtobuf();
  using anchorserve::v1::AttendRequest;
  if (size < 1) return 0;
  // First byte: where the message is cut into slices (gRPC hands over messages in pieces).
  const uint8_t cuts = data[0];
  const char* bytes = reinterpret_cast<const char*>(data + 1);
  const size_t length = size - 1;
  std::vector<grpc::Slice> slices;
  size_t begin = 0;
  for (int i = 0; i < 3 && begin < length; ++i) {
    const size_t piece = ((cuts >> (2 * i)) & 3) * length / 4;
    if (piece == 0) continue;
    const size_t end = begin + piece < length ? begin + piece : length;
    slices.emplace_back(bytes + begin, end - begin);
    begin = end;
  }
  if (begin < length) slices.emplace_back(bytes + begin, length - begin);
  grpc::ByteBuffer buffer(slices.data(), slices.size());
  const int fields[3] = {AttendRequest::kQFieldNumber, AttendRequest::kKFieldNumber,
                         AttendRequest::kVFieldNumber};
  absl::StatusOr<anchorserve::SplitMessage> split = anchorserve::SplitTensorData(buffer, fields);
  if (!split.ok()) return 0;
  AttendRequest rest;
  (void)rest.ParseFromString(split->rest);
  for (const auto& [field, segments] : split->data) {
    std::string copy(segments.size, '\0');
    segments.CopyTo(copy.data());
  }
  return 0;
}
