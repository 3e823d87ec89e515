// AttendRequest and StreamHeader validation (server/proto_convert.cc) against the CPU backend's
// CanRun, from arbitrary message bytes: never a crash, every accepted spec self-consistent.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "anchorserve/v1/anchorserve.pb.h"
#include "fuzz/quiet_protobuf.h"
#include "kernels/backend.h"
#include "server/proto_convert.h"

namespace {

const anchorserve::ConvertOptions& Options() {
  static const anchorserve::ConvertOptions* options = [] {
    anchorserve::BackendOptions backend_options;
    backend_options.kind = anchorserve::BackendKind::kCpu;
    backend_options.cpu_threads = 1;
    auto* backend = anchorserve::CreateBackend(backend_options)->release();
    auto* made = new anchorserve::ConvertOptions(
        anchorserve::MakeConvertOptions(anchorserve::ServerConfig{}, backend));
    made->max_request_bytes = int64_t{1} << 24;  // small enough that limits are reachable
    made->max_message_bytes = int64_t{1} << 22;
    return made;
  }();
  return *options;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  anchorserve::fuzz::QuietProtobuf();
  anchorserve::v1::AttendRequest request;
  if (request.ParseFromArray(data, static_cast<int>(size))) {
    absl::StatusOr<anchorserve::RequestSpec> spec =
        anchorserve::SpecFromAttendRequest(request, Options());
    if (spec.ok()) {
      // Accepted: the byte counts are the tensors' and the data is all there.
      if (spec->q_bytes != static_cast<int64_t>(request.q().data().size()) ||
          spec->InputBytes() > Options().max_request_bytes) {
        std::abort();
      }
      (void)anchorserve::CheckFiniteInputs(*spec, request.q().data().data(),
                                           request.k().data().data(), request.v().data().data());
    }
  }
  anchorserve::v1::StreamHeader header;
  if (header.ParseFromArray(data, static_cast<int>(size))) {
    absl::StatusOr<anchorserve::RequestSpec> spec =
        anchorserve::SpecFromStreamHeader(header, Options());
    if (spec.ok() && spec->InputBytes() > Options().max_request_bytes) std::abort();
  }
  return 0;
}
