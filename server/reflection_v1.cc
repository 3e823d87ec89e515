#include "server/reflection_v1.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/descriptor.pb.h"
#include "grpc/health/v1/health.pb.h"

namespace anchorserve {
namespace {

namespace reflection = grpc::reflection::v1;
using google::protobuf::Descriptor;
using google::protobuf::DescriptorPool;
using google::protobuf::FieldDescriptor;
using google::protobuf::FileDescriptor;

void SetError(grpc::StatusCode code, std::string message,
              reflection::ServerReflectionResponse* response) {
  reflection::ErrorResponse* error = response->mutable_error_response();
  error->set_error_code(static_cast<int32_t>(code));
  error->set_error_message(std::move(message));
}

// `file` and, depth first, the files it imports that have not been sent on this stream.
void AddFileAndDependencies(const FileDescriptor* file, std::vector<std::string>* sent_files,
                            reflection::FileDescriptorResponse* out) {
  if (std::find(sent_files->begin(), sent_files->end(), file->name()) != sent_files->end()) return;
  sent_files->push_back(file->name());
  google::protobuf::FileDescriptorProto proto;
  file->CopyTo(&proto);
  out->add_file_descriptor_proto(proto.SerializeAsString());
  for (int i = 0; i < file->dependency_count(); ++i) {
    AddFileAndDependencies(file->dependency(i), sent_files, out);
  }
}

void AnswerWithFile(const FileDescriptor* file, absl::string_view not_found,
                    std::vector<std::string>* sent_files,
                    reflection::ServerReflectionResponse* response) {
  if (file == nullptr)
    return SetError(grpc::StatusCode::NOT_FOUND, std::string(not_found), response);
  reflection::FileDescriptorResponse* out = response->mutable_file_descriptor_response();
  // The file asked for always comes back, even when this stream sent it before.
  sent_files->erase(std::remove(sent_files->begin(), sent_files->end(), file->name()),
                    sent_files->end());
  AddFileAndDependencies(file, sent_files, out);
}

class ReflectionReactor final
    : public grpc::ServerBidiReactor<reflection::ServerReflectionRequest,
                                     reflection::ServerReflectionResponse> {
 public:
  explicit ReflectionReactor(const std::vector<std::string>* service_names)
      : service_names_(service_names) {
    StartRead(&request_);
  }

  // One request at a time: read, answer, write, read the next.
  void OnReadDone(bool ok) override {
    if (!ok) return Finish(grpc::Status::OK);  // the client half-closed
    response_ = AnswerReflectionRequest(request_, *service_names_, &sent_files_);
    StartWrite(&response_);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) return Finish(grpc::Status(grpc::StatusCode::CANCELLED, "client went away"));
    StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  const std::vector<std::string>* const service_names_;
  reflection::ServerReflectionRequest request_;
  reflection::ServerReflectionResponse response_;
  std::vector<std::string> sent_files_;
};

}  // namespace

ReflectionV1Service::ReflectionV1Service(std::vector<std::string> service_names)
    : service_names_(std::move(service_names)) {
  // gRPC's built-in health service does not use protobuf's generated code, so grpc.health.v1 is
  // in the generated pool (and describable by either reflection service) only once our
  // generated copy is linked in and registered: this reference does both.
  (void)grpc::health::v1::HealthCheckRequest::descriptor();
}

grpc::ServerBidiReactor<reflection::ServerReflectionRequest, reflection::ServerReflectionResponse>*
ReflectionV1Service::ServerReflectionInfo(grpc::CallbackServerContext* context) {
  return new ReflectionReactor(&service_names_);
}

reflection::ServerReflectionResponse AnswerReflectionRequest(
    const reflection::ServerReflectionRequest& request,
    const std::vector<std::string>& service_names, std::vector<std::string>* sent_files) {
  const DescriptorPool* pool = DescriptorPool::generated_pool();
  reflection::ServerReflectionResponse response;
  response.set_valid_host(request.host());
  *response.mutable_original_request() = request;
  switch (request.message_request_case()) {
    case reflection::ServerReflectionRequest::kListServices: {
      reflection::ListServiceResponse* list = response.mutable_list_services_response();
      for (const std::string& name : service_names) list->add_service()->set_name(name);
      break;
    }
    case reflection::ServerReflectionRequest::kFileByFilename:
      AnswerWithFile(pool->FindFileByName(request.file_by_filename()),
                     absl::StrCat("file not found: ", request.file_by_filename()), sent_files,
                     &response);
      break;
    case reflection::ServerReflectionRequest::kFileContainingSymbol:
      AnswerWithFile(pool->FindFileContainingSymbol(request.file_containing_symbol()),
                     absl::StrCat("symbol not found: ", request.file_containing_symbol()),
                     sent_files, &response);
      break;
    case reflection::ServerReflectionRequest::kFileContainingExtension: {
      const reflection::ExtensionRequest& wanted = request.file_containing_extension();
      const Descriptor* type = pool->FindMessageTypeByName(wanted.containing_type());
      const FieldDescriptor* extension =
          type == nullptr ? nullptr : pool->FindExtensionByNumber(type, wanted.extension_number());
      AnswerWithFile(extension == nullptr ? nullptr : extension->file(),
                     absl::StrCat("extension ", wanted.extension_number(), " of ",
                                  wanted.containing_type(), " not found"),
                     sent_files, &response);
      break;
    }
    case reflection::ServerReflectionRequest::kAllExtensionNumbersOfType: {
      const Descriptor* type = pool->FindMessageTypeByName(request.all_extension_numbers_of_type());
      if (type == nullptr) {
        SetError(grpc::StatusCode::NOT_FOUND,
                 absl::StrCat("type not found: ", request.all_extension_numbers_of_type()),
                 &response);
        break;
      }
      std::vector<const FieldDescriptor*> extensions;
      pool->FindAllExtensions(type, &extensions);
      reflection::ExtensionNumberResponse* out = response.mutable_all_extension_numbers_response();
      out->set_base_type_name(type->full_name());
      for (const FieldDescriptor* extension : extensions) {
        out->add_extension_number(extension->number());
      }
      break;
    }
    case reflection::ServerReflectionRequest::MESSAGE_REQUEST_NOT_SET:
      SetError(grpc::StatusCode::INVALID_ARGUMENT,
               "request sets none of file_by_filename, file_containing_symbol, "
               "file_containing_extension, all_extension_numbers_of_type and list_services",
               &response);
      break;
  }
  return response;
}

}  // namespace anchorserve
