// Protobuf logs an ERROR line for every string field with invalid UTF-8 it parses: millions of
// lines under a fuzzer, and the time to write them. The fuzz targets that parse messages turn
// its logging off once (the parse result is what they check).
#pragma once

#include "google/protobuf/stubs/logging.h"

namespace anchorserve::fuzz {

inline void QuietProtobuf() {
  [[maybe_unused]] static const bool quiet = [] {
    google::protobuf::SetLogHandler(nullptr);
    return true;
  }();
}

}  // namespace anchorserve::fuzz
