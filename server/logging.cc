#include "server/logging.h"

#include <unistd.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace anchorserve {

void Log(LogLevel level, std::string_view message) {
  std::string line = "anchorserve: ";
  switch (level) {
    case LogLevel::kInfo:
      break;
    case LogLevel::kWarning:
      line += "[W] ";
      break;
    case LogLevel::kError:
      line += "[E] ";
      break;
  }
  line.append(message);
  line.push_back('\n');
  // One write(2) per line: stdio buffering could split or reorder lines across threads.
  const char* data = line.data();
  size_t left = line.size();
  while (left > 0) {
    const ssize_t written = ::write(STDERR_FILENO, data, left);
    if (written <= 0) return;  // nowhere left to report it
    data += written;
    left -= static_cast<size_t>(written);
  }
}

void ThrottledLog::Write(LogLevel level, std::string_view message) {
  int64_t left_out = 0;
  {
    const absl::Time now = absl::Now();
    absl::MutexLock lock(&mu_);
    if (now < next_) {
      ++left_out_;
      return;
    }
    next_ = now + interval_;
    left_out = left_out_;
    left_out_ = 0;
  }
  if (left_out == 0) return Log(level, message);
  Log(level, absl::StrCat(absl::string_view(message.data(), message.size()), " (", left_out,
                          " similar lines left out)"));
}

}  // namespace anchorserve
