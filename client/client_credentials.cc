#include "client/client_credentials.h"

#include <fstream>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "grpcpp/support/interceptor.h"

namespace anchorserve {
namespace {

absl::StatusOr<std::string> ReadFile(absl::string_view field, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(field, " ", path, ": cannot open"));
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) return absl::InvalidArgumentError(absl::StrCat(field, " ", path, ": cannot read"));
  return std::move(contents).str();
}

class BearerTokenInterceptorImpl final : public grpc::experimental::Interceptor {
 public:
  explicit BearerTokenInterceptorImpl(const std::string* header) : header_(header) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->emplace("authorization", *header_);
    }
    methods->Proceed();
  }

 private:
  const std::string* header_;  // owned by the factory, which the channel keeps
};

class BearerTokenInterceptorFactory final
    : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit BearerTokenInterceptorFactory(std::string token)
      : header_(absl::StrCat("Bearer ", token)) {}

  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* /*info*/) override {
    return new BearerTokenInterceptorImpl(&header_);
  }

 private:
  const std::string header_;
};

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> TlsChannelCredentials(
    const TlsFiles& files) {
  if (files.cert_file.empty() != files.key_file.empty()) {
    return absl::InvalidArgumentError(
        "cert_file and key_file go together (a client certificate needs its key)");
  }
  grpc::SslCredentialsOptions options;
  if (!files.ca_file.empty()) {
    absl::StatusOr<std::string> roots = ReadFile("ca_file", files.ca_file);
    if (!roots.ok()) return roots.status();
    options.pem_root_certs = *std::move(roots);
  }
  if (!files.cert_file.empty()) {
    absl::StatusOr<std::string> cert = ReadFile("cert_file", files.cert_file);
    if (!cert.ok()) return cert.status();
    absl::StatusOr<std::string> key = ReadFile("key_file", files.key_file);
    if (!key.ok()) return key.status();
    options.pem_cert_chain = *std::move(cert);
    options.pem_private_key = *std::move(key);
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::SslCredentials(options);
  if (credentials == nullptr) return absl::InvalidArgumentError("cannot create TLS credentials");
  return credentials;
}

absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  absl::StatusOr<std::string> contents = ReadFile("token file", path);
  if (!contents.ok()) return contents.status();
  for (absl::string_view line : absl::StrSplit(*contents, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    if (absl::Status status = CheckBearerToken(line); !status.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("token file ", path, ": ", status.message()));
    }
    return std::string(line);
  }
  return absl::InvalidArgumentError(absl::StrCat("token file ", path, " is empty"));
}

absl::Status CheckBearerToken(absl::string_view token) {
  if (token.empty()) return absl::InvalidArgumentError("the token is empty");
  for (char c : token) {
    if (c <= ' ' || c >= 0x7f) {
      return absl::InvalidArgumentError("the token holds a space or a non-printable character");
    }
  }
  return absl::OkStatus();
}

std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface> BearerTokenInterceptor(
    std::string token) {
  return std::make_unique<BearerTokenInterceptorFactory>(std::move(token));
}

}  // namespace anchorserve
