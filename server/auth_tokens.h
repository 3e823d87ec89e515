// Bearer-token authentication (--auth_token_file) and the per-caller limit on RPCs in flight
// (--max_inflight_per_caller).
//
// The token file has one "name:token" per line; blank lines and lines starting with '#' are
// skipped. A name is what logs and the caller label of the metrics show, so it is limited to
// [A-Za-z0-9_.-]; a token is any run of printable, non-space characters. Names and tokens must be
// unique. TokenStore re-reads the file when its bytes change; a file that does not parse then
// keeps the previous table and logs an error.
//
// Where the check runs: an auth metadata processor installed on the gRPC port's credentials
// (server_credentials.h) rejects a call without a valid token before any handler runs, so it
// covers our services and reflection alike; the reactors then look the caller's name up again
// (CallerGate) for logs, metrics and the per-caller limit.
#pragma once

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "grpcpp/support/server_callback.h"
#include "grpcpp/support/status.h"

namespace anchorserve {

// The metadata key and scheme a client sends: "authorization: Bearer <token>".
inline constexpr char kAuthorizationKey[] = "authorization";

// Equality whose time depends only on the length of `presented`, not on where the bytes differ
// nor on the stored token.
bool TokensEqual(absl::string_view presented, absl::string_view stored);

class TokenTable {
 public:
  // `path` only names the file in errors ("F:LINE: ...").
  static absl::StatusOr<TokenTable> Parse(absl::string_view path, absl::string_view contents);

  // The name of the entry whose token equals `token`; null when none. Compares against every
  // entry (no early exit) so that the time does not tell which entry, or how much of one, matched.
  const std::string* FindCaller(absl::string_view token) const;

  size_t size() const { return entries_.size(); }
  std::vector<std::string> Names() const;

 private:
  struct Entry {
    std::string name;
    std::string token;
  };
  std::vector<Entry> entries_;
};

// The current TokenTable of a file, re-read on a background thread when the file's bytes change.
class TokenStore {
 public:
  // Reads and parses `path` (INVALID_ARGUMENT naming the file and line, or the flag when the
  // file cannot be read), then checks it every `reload_interval`.
  static absl::StatusOr<std::unique_ptr<TokenStore>> Open(std::string path,
                                                          absl::Duration reload_interval);
  ~TokenStore();  // stops the reload thread
  TokenStore(const TokenStore&) = delete;
  TokenStore& operator=(const TokenStore&) = delete;

  // The caller's name for the value of the "authorization" metadata ("Bearer <token>"; the
  // scheme is case-insensitive); UNAUTHENTICATED with a message that never repeats the token.
  // `present` is false when the call carried no authorization metadata at all.
  absl::StatusOr<std::string> Authenticate(bool present, absl::string_view authorization) const;

  // Re-reads the file when its bytes changed since the last read. The reload thread calls it.
  void ReloadIfChanged();

  const std::string& path() const { return path_; }

 private:
  TokenStore(std::string path, std::string contents, TokenTable table);

  const std::string path_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const TokenTable> table_ ABSL_GUARDED_BY(mu_);
  std::string contents_ ABSL_GUARDED_BY(mu_);  // of the last read, good or bad
  absl::Notification stop_;
  std::thread reloader_;
};

// RPCs in flight per caller name.
class CallerLimiter {
 public:
  explicit CallerLimiter(int max_per_caller) : max_per_caller_(max_per_caller) {}  // 0: no limit

  // False (and nothing taken) when `caller` already has max_per_caller RPCs in flight.
  bool TryAcquire(const std::string& caller);
  void Release(const std::string& caller);
  int InFlight(const std::string& caller) const;

 private:
  const int max_per_caller_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, int> inflight_ ABSL_GUARDED_BY(mu_);
};

// A reactor's admission: the caller's name (empty without --auth_token_file) and, under a limit,
// its slot, given back when the reactor is destroyed.
class CallerSlot {
 public:
  CallerSlot() = default;
  ~CallerSlot();
  CallerSlot(const CallerSlot&) = delete;
  CallerSlot& operator=(const CallerSlot&) = delete;

  const std::string& caller() const { return caller_; }

 private:
  friend class CallerGate;
  std::string caller_;
  CallerLimiter* limiter_ = nullptr;  // set while the slot is held
};

// What each RPC of our services passes at its start: the token (again: the metadata processor
// already let the call in, but a reload may have dropped the token since) and the caller's limit.
class CallerGate {
 public:
  // `tokens` null: no authentication (every caller is anonymous, no per-caller limit).
  CallerGate(const TokenStore* tokens, int max_inflight_per_caller)
      : tokens_(tokens), limiter_(max_inflight_per_caller), limited_(max_inflight_per_caller > 0) {}

  // OK with `slot` filled in; UNAUTHENTICATED, or RESOURCE_EXHAUSTED naming the caller and
  // --max_inflight_per_caller.
  grpc::Status Admit(const grpc::CallbackServerContext& context, CallerSlot* slot);

  bool enabled() const { return tokens_ != nullptr; }
  const CallerLimiter& limiter() const { return limiter_; }

 private:
  const TokenStore* const tokens_;
  CallerLimiter limiter_;
  const bool limited_;
};

}  // namespace anchorserve
