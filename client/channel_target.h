// How the clients reach one server or several replicas: the target forms they accept and the
// service config that balances and retries across replicas.
//
// Targets:
//   host:port                    one name or address (gRPC's default dns resolver: every address
//                                the name resolves to, balanced per request)
//   dns:///name:port             the same, spelled out (a Kubernetes headless Service)
//   10.0.0.1:50051,10.0.0.2:50051   a fixed list of IP literals (IPv6 in brackets:
//                                [fd00::1]:50051,[fd00::2]:50051); becomes gRPC's
//                                ipv4:/ipv6: target, one address family per list
//   ipv4:..., ipv6:..., unix:...  gRPC target URIs, passed through
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "absl/random/random.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/support/channel_arguments.h"

namespace anchorserve {

// Requests whose buffered messages exceed this are not retried by gRPC (it keeps what was sent
// until the server answers, so that it can send it again). A unary Attend of up to 64 MiB of
// Q/K/V is retried; larger ones and streams past this point are not.
inline constexpr int64_t kRetryBufferBytes = int64_t{64} << 20;

// The gRPC target for `target` in one of the forms above: a comma-separated list becomes
// "ipv4:a:p,b:p" or "ipv6:[a]:p,[b]:p"; everything else is returned unchanged. INVALID_ARGUMENT
// naming the list element that is not an IP literal with a port, or for a list that mixes IPv4
// and IPv6 (gRPC 1.51's list targets take one family).
absl::StatusOr<std::string> NormalizeTarget(absl::string_view target);

// The channel's default service config (JSON): round_robin over every address the target
// resolves to, so that each request may go to another replica, and retries of the unary RPCs
// (Attend, GetServerInfo, GetModelInfo) and of Prefill (until its first response message) on
// UNAVAILABLE, which a draining or vanished replica answers, and on CANCELLED, which a replica
// that has begun to shut down answers to calls that crossed its GOAWAY. AttendStream is not retried
// by gRPC: its input may be far larger than kRetryBufferBytes (see anchorctl for a whole-request
// retry). Health/Check is not retried either: a probe reports what it sees.
const std::string& ReplicaServiceConfigJson();

// Channel arguments for a channel to several replicas: the service config above (the resolver's
// own, from DNS TXT records, is ignored), retries enabled, kRetryBufferBytes per call, and the
// message limits (`max_message_bytes`, both ways).
grpc::ChannelArguments ChannelArgumentsForReplicas(int64_t max_message_bytes);

// Whole-call retries of what gRPC does not retry: an AttendStream whose input did not fit the
// retry buffer, or whose replica began draining after accepting it. Such a call failed with
// UNAVAILABLE before the server computed anything the caller kept, so sending it again (to the
// next replica, round_robin) is safe.
struct WholeCallRetry {
  int max_attempts = 3;                                    // the first try included; 1 = no retries
  absl::Duration first_backoff = absl::Milliseconds(100);  // doubles, with jitter
  absl::Duration max_backoff = absl::Seconds(2);
};

// The status of a call's result.
inline absl::Status StatusOf(const absl::Status& status) { return status; }
template <typename T>
absl::Status StatusOf(const absl::StatusOr<T>& result) {
  return result.status();
}

// Runs `call` (returning absl::StatusOr<T> or absl::Status) until it succeeds, fails with a code
// other than UNAVAILABLE, `may_retry()` says no (e.g. a response message already reached the
// caller), or `policy.max_attempts` tries are used up. A final UNAVAILABLE says how many tries
// were made.
template <typename Call, typename MayRetry>
auto RetryWholeCall(const WholeCallRetry& policy, Call call, MayRetry may_retry)
    -> decltype(call()) {
  absl::BitGen jitter;
  absl::Duration backoff = policy.first_backoff;
  for (int attempt = 1;; ++attempt) {
    auto result = call();
    const absl::Status status = StatusOf(result);
    if (status.code() != absl::StatusCode::kUnavailable || !may_retry()) return result;
    if (attempt >= policy.max_attempts) {
      if (policy.max_attempts <= 1) return result;
      return absl::UnavailableError(
          absl::StrCat(status.message(), " (", attempt, " attempts, every one UNAVAILABLE)"));
    }
    absl::SleepFor(backoff * absl::Uniform(jitter, 0.5, 1.0));
    backoff = std::min(backoff * 2, policy.max_backoff);
  }
}

}  // namespace anchorserve
