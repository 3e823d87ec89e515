// The AttendStream input side (server/attend_stream_assembler.cc) fed a sequence of messages:
// the input is split at 4-byte length prefixes into AttendStreamRequest messages. Never a crash;
// a stream it calls complete holds exactly the bytes its header declared.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "anchorserve/v1/anchorserve.pb.h"
#include "fuzz/quiet_protobuf.h"
#include "server/attend_stream_assembler.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  anchorserve::fuzz::QuietProtobuf();
  static const anchorserve::ConvertOptions* options = [] {
    auto* made = new anchorserve::ConvertOptions();  // no backend: the limits and geometry only
    made->max_request_bytes = int64_t{1} << 20;      // keeps allocations small
    return made;
  }();
  anchorserve::AttendStreamAssembler assembler(options);
  anchorserve::v1::AttendStreamRequest message;
  size_t at = 0;
  while (at + 4 <= size) {
    uint32_t length = 0;
    std::memcpy(&length, data + at, 4);
    at += 4;
    length = static_cast<uint32_t>(length % (size - at + 1));
    if (!message.ParseFromArray(data + at, static_cast<int>(length))) return 0;
    at += length;
    if (!assembler.Add(message).ok()) return 0;
    if (assembler.complete()) {
      const anchorserve::RequestSpec& spec = assembler.spec();
      if (spec.InputBytes() > options->max_request_bytes || assembler.data(0) == nullptr) {
        std::abort();
      }
    }
  }
  (void)assembler.EndedEarlyMessage();
  return 0;
}
