// Prometheus text exposition on http://HOST:PORT/metrics (prometheus-cpp's Exposer, on civetweb),
// with a prompt stop.
#pragma once

#include <sys/socket.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "prometheus/collectable.h"

namespace prometheus {
class Exposer;
}  // namespace prometheus

namespace anchorserve {

class MetricsEndpoint {
 public:
  // Serves `collectable` on host:port (0 picks a free port). UNAVAILABLE naming --host and
  // --metrics_port when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(
      absl::string_view host, int port, const std::weak_ptr<prometheus::Collectable>& collectable);
  ~MetricsEndpoint();  // Stop()
  MetricsEndpoint(const MetricsEndpoint&) = delete;
  MetricsEndpoint& operator=(const MetricsEndpoint&) = delete;

  int port() const { return port_; }

  // Stops serving and joins civetweb's threads, within milliseconds. Idempotent.
  void Stop();

 private:
  MetricsEndpoint() = default;

  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
  // Where a local connection reaches the listening socket (loopback for a wildcard host).
  sockaddr_storage knock_address_{};
  socklen_t knock_address_length_ = 0;
};

}  // namespace anchorserve
