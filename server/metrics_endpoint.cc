#include "server/metrics_endpoint.h"

#include <netdb.h>
#include <unistd.h>

#include <cstring>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "prometheus/exposer.h"
#include "server/server_config.h"

namespace anchorserve {
namespace {

// The address a connection from this host should use to reach a socket bound to `host`.
std::string LocalPeerOf(absl::string_view host) {
  absl::ConsumePrefix(&host, "[");
  absl::ConsumeSuffix(&host, "]");
  if (host.empty() || host == "0.0.0.0") return "127.0.0.1";
  if (host == "::") return "::1";
  return std::string(host);
}

// Opens a TCP connection to `address` and closes it; never blocks. Errors do not matter: the
// point is only to make the listening socket readable.
void Knock(const sockaddr_storage& address, socklen_t length) {
  const int fd = ::socket(address.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  (void)::connect(fd, reinterpret_cast<const sockaddr*>(&address), length);
  ::close(fd);
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::Start(
    absl::string_view host, int port, const std::weak_ptr<prometheus::Collectable>& collectable) {
  const std::string address = JoinHostPort(host, port);
  std::unique_ptr<MetricsEndpoint> endpoint(new MetricsEndpoint());
  try {
    // civetweb reports bind failures as exceptions; this is the one place they are caught.
    endpoint->exposer_ = std::make_unique<prometheus::Exposer>(address);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", address, " (--host/--metrics_port): ", e.what()));
  }
  endpoint->exposer_->RegisterCollectable(collectable);
  const std::vector<int> ports = endpoint->exposer_->GetListeningPorts();
  endpoint->port_ = ports.empty() ? port : ports.front();

  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string peer = LocalPeerOf(host);
  if (::getaddrinfo(peer.c_str(), std::to_string(endpoint->port_).c_str(), &hints, &found) == 0 &&
      found != nullptr) {
    std::memcpy(&endpoint->knock_address_, found->ai_addr, found->ai_addrlen);
    endpoint->knock_address_length_ = found->ai_addrlen;
  }
  if (found != nullptr) ::freeaddrinfo(found);
  return endpoint;
}

MetricsEndpoint::~MetricsEndpoint() { Stop(); }

void MetricsEndpoint::Stop() {
  if (exposer_ == nullptr) return;
  // civetweb 1.15 looks at its stop flag only between 2-second polls of the listening socket, so
  // a plain stop takes up to 2 s. While it stops, knock on the port: the poll wakes, sees the
  // flag, and the threads exit at once. (Knocks that come before the flag is set are served as
  // empty connections and closed.)
  absl::Notification stopped;
  std::thread knocker;
  if (knock_address_length_ > 0) {
    knocker = std::thread([this, &stopped] {
      do {
        Knock(knock_address_, knock_address_length_);
      } while (!stopped.WaitForNotificationWithTimeout(absl::Milliseconds(10)));
    });
  }
  exposer_.reset();
  stopped.Notify();
  if (knocker.joinable()) knocker.join();
}

}  // namespace anchorserve
