// A minimal stderr logger: Debian 12's Abseil (20220623) has no absl/log.
#pragma once

#include <cstdint>
#include <string_view>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace anchorserve {

enum class LogLevel { kInfo, kWarning, kError };

// Writes "anchorserve: [W] message\n" to stderr in one write so that lines from several threads
// never interleave. Info lines carry no level tag.
void Log(LogLevel level, std::string_view message);

inline void LogInfo(std::string_view message) { Log(LogLevel::kInfo, message); }
inline void LogWarning(std::string_view message) { Log(LogLevel::kWarning, message); }
inline void LogError(std::string_view message) { Log(LogLevel::kError, message); }

// At most one line per `interval`, for events a client can cause at any rate (rejected calls);
// the next line that gets through says how many were left out.
class ThrottledLog {
 public:
  explicit ThrottledLog(absl::Duration interval) : interval_(interval) {}
  void Write(LogLevel level, std::string_view message);

 private:
  const absl::Duration interval_;
  absl::Mutex mu_;
  absl::Time next_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  int64_t left_out_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace anchorserve
