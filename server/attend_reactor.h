// The unary Attend RPC: the tensor bytes are split out of the received message where gRPC put
// them (tensor_wire.h), validated, computed in place by the batcher, and the output goes into
// the response as its own slice. No protobuf copies of tensor bytes either way.
#pragma once

#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/server_callback.h"
#include "server/attention_service.h"

namespace anchorserve {

grpc::ServerUnaryReactor* StartAttendReactor(AttentionServiceImpl* service,
                                             grpc::CallbackServerContext* context,
                                             const grpc::ByteBuffer* request,
                                             grpc::ByteBuffer* response);

}  // namespace anchorserve
