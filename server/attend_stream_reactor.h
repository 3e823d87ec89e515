// The AttendStream RPC (bidi), for requests of any size up to --max_request_bytes: the protocol
// is described in attention_service.h. Input: one header, then in-order chunks of Q, K and V;
// output through a ChunkedTensorWriter: output_spec, output chunks, metrics, status.
#pragma once

#include "anchorserve/v1/anchorserve.pb.h"
#include "grpcpp/support/server_callback.h"
#include "server/attention_service.h"

namespace anchorserve {

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* StartAttendStreamReactor(
    AttentionServiceImpl* service, grpc::CallbackServerContext* context);

}  // namespace anchorserve
