// A minimal stderr logger: Debian 12's Abseil (20220623) has no absl/log.
#pragma once

#include <string_view>

namespace anchorserve {

enum class LogLevel { kInfo, kWarning, kError };

// Writes "anchorserve: [W] message\n" to stderr in one write so that lines from several threads
// never interleave. Info lines carry no level tag.
void Log(LogLevel level, std::string_view message);

inline void LogInfo(std::string_view message) { Log(LogLevel::kInfo, message); }
inline void LogWarning(std::string_view message) { Log(LogLevel::kWarning, message); }
inline void LogError(std::string_view message) { Log(LogLevel::kError, message); }

}  // namespace anchorserve
