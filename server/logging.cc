#include "server/logging.h"

#include <unistd.h>

#include <string>

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

}  // namespace anchorserve
