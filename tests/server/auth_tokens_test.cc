#include "server/auth_tokens.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace anchorserve {
namespace {

using ::testing::HasSubstr;

TEST(TokensEqualTest, OnlyTheSameBytesMatch) {
  EXPECT_TRUE(TokensEqual("secret-1", "secret-1"));
  EXPECT_FALSE(TokensEqual("secret-2", "secret-1"));
  EXPECT_FALSE(TokensEqual("secret-1x", "secret-1"));
  EXPECT_FALSE(TokensEqual("secret-", "secret-1"));
  // A repetition of the stored token is not the token.
  EXPECT_FALSE(TokensEqual("abab", "ab"));
  EXPECT_FALSE(TokensEqual("", "secret-1"));
  EXPECT_FALSE(TokensEqual("", ""));
}

TEST(TokenTableTest, ParsesNamesTokensCommentsAndBlankLines) {
  absl::StatusOr<TokenTable> table =
      TokenTable::Parse("f", "# comment\n\n alice : tok-a \nbob.svc-1:tok:with:colons\n");
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(table->size(), 2u);
  ASSERT_NE(table->FindCaller("tok-a"), nullptr);
  EXPECT_EQ(*table->FindCaller("tok-a"), "alice");
  ASSERT_NE(table->FindCaller("tok:with:colons"), nullptr);
  EXPECT_EQ(*table->FindCaller("tok:with:colons"), "bob.svc-1");
  EXPECT_EQ(table->FindCaller("tok-b"), nullptr);
  EXPECT_EQ(table->FindCaller(""), nullptr);
}

TEST(TokenTableTest, ErrorsNameTheFileAndLine) {
  const struct {
    const char* contents;
    const char* error;
  } cases[] = {
      {"a:1\nb:\n", "F:2: empty token for 'b'"},
      {"a:1\n\nno-colon\n", "F:3: expected name:token"},
      {":tok\n", "F:1: empty name"},
      {"a b:tok\n", "F:1: a name may only hold"},
      {"a:1\na:2\n", "F:2: duplicate name 'a'"},
      {"a:1\nb:1\n", "F:2: the token of 'b' is also an earlier name's token"},
      {"a:to ken\n", "F:1: the token of 'a' holds a space"},
      {"# only comments\n\n", "F holds no name:token line"},
  };
  for (const auto& c : cases) {
    absl::StatusOr<TokenTable> table = TokenTable::Parse("F", c.contents);
    EXPECT_EQ(table.status().code(), absl::StatusCode::kInvalidArgument) << c.contents;
    EXPECT_THAT(std::string(table.status().message()), HasSubstr(c.error)) << c.contents;
    EXPECT_THAT(std::string(table.status().message()), HasSubstr("--auth_token_file"));
  }
}

TEST(CallerLimiterTest, LimitsEachCallerOnItsOwn) {
  CallerLimiter limiter(2);
  EXPECT_TRUE(limiter.TryAcquire("a"));
  EXPECT_TRUE(limiter.TryAcquire("a"));
  EXPECT_FALSE(limiter.TryAcquire("a"));
  EXPECT_TRUE(limiter.TryAcquire("b"));
  EXPECT_EQ(limiter.InFlight("a"), 2);
  limiter.Release("a");
  EXPECT_TRUE(limiter.TryAcquire("a"));
  CallerLimiter unlimited(0);
  for (int i = 0; i < 100; ++i) EXPECT_TRUE(unlimited.TryAcquire("a"));
}

}  // namespace
}  // namespace anchorserve
