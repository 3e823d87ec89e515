#include "server/auth_tokens.h"

#include <fstream>
#include <sstream>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "grpcpp/server_context.h"
#include "server/logging.h"

namespace anchorserve {
namespace {

bool IsNameChar(char c) { return absl::ascii_isalnum(c) || c == '_' || c == '.' || c == '-'; }

bool IsTokenChar(char c) { return c > ' ' && c < 0x7f; }  // printable ASCII, no space

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("cannot open ", path));
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) return absl::InvalidArgumentError(absl::StrCat("cannot read ", path));
  return std::move(contents).str();
}

ThrottledLog& RejectionLog() {
  static auto* log = new ThrottledLog(absl::Seconds(1));
  return *log;
}

}  // namespace

bool TokensEqual(absl::string_view presented, absl::string_view stored) {
  if (stored.empty()) return false;
  // Walks `presented` whole, comparing with `stored` repeated: the loop's length and its memory
  // accesses depend on neither the stored token nor the position of a difference.
  unsigned char difference = presented.size() == stored.size() ? 0 : 1;
  for (size_t i = 0; i < presented.size(); ++i) {
    difference |= static_cast<unsigned char>(presented[i] ^ stored[i % stored.size()]);
  }
  return difference == 0;
}

absl::StatusOr<TokenTable> TokenTable::Parse(absl::string_view path, absl::string_view contents) {
  TokenTable table;
  absl::flat_hash_set<std::string> names;
  absl::flat_hash_set<std::string> tokens;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(contents, '\n')) {
    ++line_number;
    auto error = [&](absl::string_view what) {
      return absl::InvalidArgumentError(
          absl::StrCat("--auth_token_file ", path, ":", line_number, ": ", what));
    };
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || absl::StartsWith(line, "#")) continue;
    const size_t colon = line.find(':');
    if (colon == absl::string_view::npos) return error("expected name:token");
    const absl::string_view name = absl::StripAsciiWhitespace(line.substr(0, colon));
    const absl::string_view token = absl::StripAsciiWhitespace(line.substr(colon + 1));
    if (name.empty()) return error("empty name");
    for (char c : name) {
      if (!IsNameChar(c)) return error("a name may only hold letters, digits, '_', '.', '-'");
    }
    if (token.empty()) return error(absl::StrCat("empty token for '", name, "'"));
    for (char c : token) {
      if (!IsTokenChar(c)) {
        return error(
            absl::StrCat("the token of '", name, "' holds a space or a non-printable character"));
      }
    }
    if (!names.insert(std::string(name)).second) {
      return error(absl::StrCat("duplicate name '", name, "'"));
    }
    // The token itself never goes into a message.
    if (!tokens.insert(std::string(token)).second) {
      return error(absl::StrCat("the token of '", name, "' is also an earlier name's token"));
    }
    table.entries_.push_back({std::string(name), std::string(token)});
  }
  if (table.entries_.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--auth_token_file ", path, " holds no name:token line"));
  }
  return table;
}

const std::string* TokenTable::FindCaller(absl::string_view token) const {
  const std::string* found = nullptr;
  for (const Entry& entry : entries_) {
    const bool equal = TokensEqual(token, entry.token);
    if (equal) found = &entry.name;  // tokens are unique: at most one entry matches
  }
  return found;
}

std::vector<std::string> TokenTable::Names() const {
  std::vector<std::string> names;
  names.reserve(entries_.size());
  for (const Entry& entry : entries_) names.push_back(entry.name);
  return names;
}

absl::StatusOr<std::unique_ptr<TokenStore>> TokenStore::Open(std::string path,
                                                             absl::Duration reload_interval) {
  absl::StatusOr<std::string> contents = ReadWholeFile(path);
  if (!contents.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--auth_token_file: ", contents.status().message()));
  }
  absl::StatusOr<TokenTable> table = TokenTable::Parse(path, *contents);
  if (!table.ok()) return table.status();
  LogInfo(absl::StrCat("--auth_token_file ", path, ": ", table->size(), " callers (",
                       absl::StrJoin(table->Names(), ", "), ")"));
  std::unique_ptr<TokenStore> store(
      new TokenStore(std::move(path), *std::move(contents), *std::move(table)));
  store->reloader_ = std::thread([store = store.get(), reload_interval] {
    while (!store->stop_.WaitForNotificationWithTimeout(reload_interval)) {
      store->ReloadIfChanged();
    }
  });
  return store;
}

TokenStore::TokenStore(std::string path, std::string contents, TokenTable table)
    : path_(std::move(path)),
      table_(std::make_shared<const TokenTable>(std::move(table))),
      contents_(std::move(contents)) {}

TokenStore::~TokenStore() {
  stop_.Notify();
  if (reloader_.joinable()) reloader_.join();
}

void TokenStore::ReloadIfChanged() {
  absl::StatusOr<std::string> contents = ReadWholeFile(path_);
  if (!contents.ok()) {
    // A secret volume being swapped may be missing for a moment: keep the table, say so once.
    absl::MutexLock lock(&mu_);
    if (!contents_.empty()) {
      LogError(absl::StrCat("--auth_token_file: ", contents.status().message(),
                            "; keeping the previous tokens"));
      contents_.clear();
    }
    return;
  }
  {
    absl::MutexLock lock(&mu_);
    if (*contents == contents_) return;
    contents_ = *contents;
  }
  absl::StatusOr<TokenTable> table = TokenTable::Parse(path_, *contents);
  if (!table.ok()) {
    LogError(absl::StrCat(table.status().message(), "; keeping the previous tokens"));
    return;
  }
  LogInfo(absl::StrCat("--auth_token_file ", path_, " reloaded: ", table->size(), " callers (",
                       absl::StrJoin(table->Names(), ", "), ")"));
  auto fresh = std::make_shared<const TokenTable>(*std::move(table));
  absl::MutexLock lock(&mu_);
  table_ = std::move(fresh);
}

absl::StatusOr<std::string> TokenStore::Authenticate(bool present,
                                                     absl::string_view authorization) const {
  if (!present) {
    return absl::UnauthenticatedError(
        "missing 'authorization: Bearer <token>' metadata: this server requires a token");
  }
  absl::string_view token = absl::StripAsciiWhitespace(authorization);
  constexpr absl::string_view kScheme = "bearer ";
  if (token.size() < kScheme.size() ||
      !absl::EqualsIgnoreCase(token.substr(0, kScheme.size()), kScheme)) {
    return absl::UnauthenticatedError("the authorization metadata must read 'Bearer <token>'");
  }
  token = absl::StripLeadingAsciiWhitespace(token.substr(kScheme.size()));
  std::shared_ptr<const TokenTable> table;
  {
    absl::MutexLock lock(&mu_);
    table = table_;
  }
  const std::string* caller = table->FindCaller(token);
  if (caller == nullptr) return absl::UnauthenticatedError("unknown bearer token");
  return *caller;
}

bool CallerLimiter::TryAcquire(const std::string& caller) {
  absl::MutexLock lock(&mu_);
  int& inflight = inflight_[caller];
  if (max_per_caller_ > 0 && inflight >= max_per_caller_) return false;
  ++inflight;
  return true;
}

void CallerLimiter::Release(const std::string& caller) {
  absl::MutexLock lock(&mu_);
  auto it = inflight_.find(caller);
  if (it == inflight_.end()) return;
  if (--it->second <= 0) inflight_.erase(it);
}

int CallerLimiter::InFlight(const std::string& caller) const {
  absl::MutexLock lock(&mu_);
  auto it = inflight_.find(caller);
  return it == inflight_.end() ? 0 : it->second;
}

CallerSlot::~CallerSlot() {
  if (limiter_ != nullptr) limiter_->Release(caller_);
}

grpc::Status CallerGate::Admit(const grpc::CallbackServerContext& context, CallerSlot* slot) {
  if (tokens_ == nullptr) return grpc::Status::OK;
  const auto& metadata = context.client_metadata();
  const auto found = metadata.find(kAuthorizationKey);
  const bool present = found != metadata.end();
  absl::StatusOr<std::string> caller = tokens_->Authenticate(
      present, present ? absl::string_view(found->second.data(), found->second.size())
                       : absl::string_view());
  if (!caller.ok()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, std::string(caller.status().message()));
  }
  slot->caller_ = *std::move(caller);
  if (!limited_) return grpc::Status::OK;
  if (!limiter_.TryAcquire(slot->caller_)) {
    RejectionLog().Write(
        LogLevel::kWarning,
        absl::StrCat("caller ", slot->caller_, " refused: over --max_inflight_per_caller"));
    return grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("caller '", slot->caller_, "' already has ", limiter_.InFlight(slot->caller_),
                     " RPCs in flight (--max_inflight_per_caller)"));
  }
  slot->limiter_ = &limiter_;
  return grpc::Status::OK;
}

}  // namespace anchorserve
