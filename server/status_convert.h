// The one place where absl::Status codes become gRPC status codes.
#pragma once

#include <string_view>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace anchorserve {

// Maps the canonical code one to one (both follow google.rpc.Code) and keeps the message.
// Codes the service produces: INVALID_ARGUMENT (bad input, message names the field),
// RESOURCE_EXHAUSTED (queue full, size over a limit flag), UNAVAILABLE (draining),
// DEADLINE_EXCEEDED, CANCELLED, INTERNAL (backend failure), FAILED_PRECONDITION (a valid request
// this server cannot serve: a dtype, head_dim or length the backend lacks, no --model, another
// model's fingerprint), OUT_OF_RANGE (a prompt longer than the model or --max_seq_len allows). A
// code outside the canonical set becomes UNKNOWN.
grpc::Status ToGrpcStatus(const absl::Status& status);

// "INVALID_ARGUMENT", "OK", ...: the label value of anchorserve_requests_total{code}.
std::string_view GrpcCodeName(grpc::StatusCode code);

}  // namespace anchorserve
