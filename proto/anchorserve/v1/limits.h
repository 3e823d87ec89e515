// Limits of the wire format that the server and the clients share.
#pragma once

#include <cstdint>

namespace anchorserve {

// gRPC and protobuf count message sizes in int32.
inline constexpr int64_t kMaxGrpcMessageBytes = 2147483647;

// request_id is echoed into every response message and the logs: a name, not a payload.
inline constexpr int kMaxRequestIdBytes = 256;

}  // namespace anchorserve
