// Status helpers that Debian 12's Abseil (20220623) does not ship yet.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define ANCHOR_STATUS_CONCAT_INNER_(a, b) a##b
#define ANCHOR_STATUS_CONCAT_(a, b) ANCHOR_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function when `expr` yields a non-OK absl::Status.
#define ANCHOR_RETURN_IF_ERROR(expr)                 \
  do {                                               \
    ::absl::Status anchor_status_ = (expr);          \
    if (!anchor_status_.ok()) return anchor_status_; \
  } while (false)

// `lhs` = value of the absl::StatusOr `rexpr`, or return its error.
#define ANCHOR_ASSIGN_OR_RETURN(lhs, rexpr) \
  ANCHOR_ASSIGN_OR_RETURN_IMPL_(ANCHOR_STATUS_CONCAT_(anchor_statusor_, __LINE__), lhs, rexpr)

#define ANCHOR_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                  \
  if (!statusor.ok()) return statusor.status();             \
  lhs = *std::move(statusor)
