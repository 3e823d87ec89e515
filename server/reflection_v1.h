// grpc.reflection.v1.ServerReflection over protobuf's generated descriptor pool, next to the
// v1alpha service that Debian's gRPC 1.51 plugin provides (it has no v1): current grpcurl,
// Postman and grpcui ask for v1 first. Both answer from the same pool, so they agree.
#pragma once

#include <string>
#include <vector>

#include "grpc/reflection/v1/reflection.grpc.pb.h"

namespace anchorserve {

inline constexpr char kReflectionV1ServiceName[] = "grpc.reflection.v1.ServerReflection";
inline constexpr char kReflectionV1AlphaServiceName[] = "grpc.reflection.v1alpha.ServerReflection";
inline constexpr char kHealthServiceName[] = "grpc.health.v1.Health";

class ReflectionV1Service final : public grpc::reflection::v1::ServerReflection::CallbackService {
 public:
  // `service_names`: what list_services answers (fully qualified names).
  explicit ReflectionV1Service(std::vector<std::string> service_names);

  grpc::ServerBidiReactor<grpc::reflection::v1::ServerReflectionRequest,
                          grpc::reflection::v1::ServerReflectionResponse>*
  ServerReflectionInfo(grpc::CallbackServerContext* context) override;

  const std::vector<std::string>& service_names() const { return service_names_; }

 private:
  const std::vector<std::string> service_names_;
};

// The answer to one request; `sent_files` holds the names of the files this stream has already
// sent (a file response leaves those out, as the protocol allows) and is updated.
grpc::reflection::v1::ServerReflectionResponse AnswerReflectionRequest(
    const grpc::reflection::v1::ServerReflectionRequest& request,
    const std::vector<std::string>& service_names, std::vector<std::string>* sent_files);

}  // namespace anchorserve
