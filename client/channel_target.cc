#include "client/channel_target.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <optional>
#include <utility>
#include <vector>

#include "absl/algorithm/container.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "grpc/grpc.h"  // GRPC_ARG_*

namespace anchorserve {
namespace {

// Schemes of gRPC 1.51's resolvers: a target that starts with one is a URI, commas and all.
constexpr absl::string_view kResolverSchemes[] = {
    "dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:"};

bool HasResolverScheme(absl::string_view target) {
  for (absl::string_view scheme : kResolverSchemes) {
    if (absl::StartsWithIgnoreCase(target, scheme)) return true;
  }
  return false;
}

enum class Family { kIpv4, kIpv6 };

struct ListAddress {
  Family family;
  std::string text;  // "a.b.c.d:port" or "[v6]:port"
};

absl::Status BadElement(absl::string_view target, absl::string_view element,
                        absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("target '", target, "': list element '", element, "' ", why,
                   "; a list holds IP addresses with ports (IPv6 in brackets: [fd00::1]:50051), "
                   "a name goes alone, e.g. dns:///anchorserve:50051"));
}

absl::StatusOr<ListAddress> ParseListAddress(absl::string_view target, absl::string_view element) {
  if (element.empty()) return BadElement(target, element, "is empty");
  absl::string_view host;
  absl::string_view port;
  Family family;
  if (absl::StartsWith(element, "[")) {
    const size_t close = element.find(']');
    if (close == absl::string_view::npos || close + 1 >= element.size() ||
        element[close + 1] != ':') {
      return BadElement(target, element, "has no ']:port' after its IPv6 address");
    }
    host = element.substr(1, close - 1);
    port = element.substr(close + 2);
    family = Family::kIpv6;
    in6_addr parsed;
    if (inet_pton(AF_INET6, std::string(host).c_str(), &parsed) != 1) {
      return BadElement(target, element, "is not an IPv6 address in brackets");
    }
  } else {
    const size_t colon = element.rfind(':');
    if (colon == absl::string_view::npos) return BadElement(target, element, "has no port");
    host = element.substr(0, colon);
    port = element.substr(colon + 1);
    family = Family::kIpv4;
    in_addr parsed;
    if (inet_pton(AF_INET, std::string(host).c_str(), &parsed) != 1) {
      return BadElement(target, element,
                        absl::StrContains(host, ':') ? "is an IPv6 address without brackets"
                                                     : "is not an IP address");
    }
  }
  int port_number = 0;
  if (port.empty() || !absl::c_all_of(port, absl::ascii_isdigit) ||
      !absl::SimpleAtoi(port, &port_number) || port_number < 1 || port_number > 65535) {
    return BadElement(target, element, "has no port in [1, 65535]");
  }
  return ListAddress{family, std::string(element)};
}

}  // namespace

absl::StatusOr<std::string> NormalizeTarget(absl::string_view target) {
  if (target.empty()) return absl::InvalidArgumentError("target must not be empty");
  if (!absl::StrContains(target, ',') || HasResolverScheme(target)) return std::string(target);
  std::vector<std::string> addresses;
  std::optional<Family> family;
  for (absl::string_view element : absl::StrSplit(target, ',')) {
    absl::StatusOr<ListAddress> address =
        ParseListAddress(target, absl::StripAsciiWhitespace(element));
    if (!address.ok()) return address.status();
    if (family.has_value() && *family != address->family) {
      return absl::InvalidArgumentError(absl::StrCat(
          "target '", target,
          "' mixes IPv4 and IPv6 addresses; gRPC 1.51 takes one address family per list (use a "
          "dns:/// name that resolves to both)"));
    }
    family = address->family;
    addresses.push_back(std::move(address->text));
  }
  return absl::StrCat(*family == Family::kIpv4 ? "ipv4:" : "ipv6:", absl::StrJoin(addresses, ","));
}

const std::string& ReplicaServiceConfigJson() {
  // maxAttempts counts the first try (gRPC allows at most 5). The backoff before retry n is
  // random in [0, min(initialBackoff * 2^(n-1), maxBackoff)]: a replica that went away costs a
  // request tens of milliseconds, a cluster that is down answers UNAVAILABLE within about 1 s.
  // CANCELLED too: a server that has begun its shutdown (GOAWAY sent) answers the calls that
  // crossed the GOAWAY on the wire with CANCELLED before running them. anchorserve itself never
  // answers CANCELLED to a caller that is still waiting, and calls the caller cancels are never
  // retried.
  static const auto* const json = new std::string(R"json({
  "loadBalancingConfig": [{"round_robin": {}}],
  "methodConfig": [{
    "name": [
      {"service": "anchorserve.v1.AttentionService", "method": "Attend"},
      {"service": "anchorserve.v1.AttentionService", "method": "GetServerInfo"},
      {"service": "anchorserve.v1.PrefillService", "method": "Prefill"},
      {"service": "anchorserve.v1.PrefillService", "method": "GetModelInfo"}
    ],
    "retryPolicy": {
      "maxAttempts": 5,
      "initialBackoff": "0.05s",
      "maxBackoff": "1s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]
    }
  }]
})json");
  return *json;
}

grpc::ChannelArguments ChannelArgumentsForReplicas(int64_t max_message_bytes) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(max_message_bytes));
  args.SetMaxSendMessageSize(static_cast<int>(max_message_bytes));
  args.SetServiceConfigJSON(ReplicaServiceConfigJson());
  args.SetInt(GRPC_ARG_SERVICE_CONFIG_DISABLE_RESOLUTION, 1);
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, 1);
  args.SetInt(GRPC_ARG_PER_RPC_RETRY_BUFFER_SIZE, static_cast<int>(kRetryBufferBytes));
  return args;
}

}  // namespace anchorserve
