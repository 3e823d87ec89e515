// PrefillStreamAssembler against hand-made message sequences: a good stream in several chunkings
// and selections, and each way a stream can be wrong.
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "client/prefill_client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/client/prefill_test_util.h"

namespace anchorserve {
namespace {

using ::anchorserve::testing::FakeModel;
using ::anchorserve::testing::FakeOutput;
using ::anchorserve::testing::MakeFakeOutput;
using ::anchorserve::testing::StreamOf;
using ::testing::HasSubstr;

v1::PrefillRequest RequestOf(int num_tokens) {
  v1::PrefillRequest request;
  request.set_request_id("req-1");
  for (int i = 0; i < num_tokens; ++i) request.add_token_ids(100 + i);
  return request;
}

// Feeds `messages`; returns the first error, or Finish()'s.
absl::StatusOr<PrefillSummary> Feed(const v1::PrefillRequest& request,
                                    const std::vector<v1::PrefillResponse>& messages,
                                    PrefillCallbacks callbacks = {}) {
  PrefillStreamAssembler assembler(request, std::move(callbacks), absl::Now(), "test-server");
  for (const v1::PrefillResponse& message : messages) {
    absl::Status status = assembler.Consume(message);
    if (!status.ok()) return status;
  }
  return assembler.Finish();
}

void ExpectViolation(const absl::StatusOr<PrefillSummary>& result, absl::string_view what) {
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInternal) << result.status();
  EXPECT_THAT(result.status().message(),
              HasSubstr("Prefill to test-server broke the stream protocol: "));
  EXPECT_THAT(result.status().message(), HasSubstr(what));
}

// Index of the first message of `kind` (and of layer/tensor for chunks).
size_t IndexOf(const std::vector<v1::PrefillResponse>& messages, int layer, v1::TensorName tensor,
               int64_t offset) {
  for (size_t i = 0; i < messages.size(); ++i) {
    const v1::PrefillResponse& m = messages[i];
    if (m.has_kv_chunk() && m.kv_chunk().layer() == layer && m.kv_chunk().tensor() == tensor &&
        m.kv_chunk().offset() == offset) {
      return i;
    }
  }
  ADD_FAILURE() << "no chunk of layer " << layer << " at " << offset;
  return 0;
}

class GoodStreamTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(GoodStreamTest, ReassemblesEveryLayer) {
  const int64_t chunk_bytes = GetParam();
  const v1::PrefillRequest request = RequestOf(5);
  const FakeOutput output = MakeFakeOutput(request, FakeModel{});
  // 5 tokens x 2 heads x 4 dims x bf16 = 80 bytes per tensor.
  ASSERT_EQ(output.k[0].size(), 80u);
  std::vector<std::string> k(3), v(3);
  std::vector<PrefillLayerProgress> done;
  std::string header_id;
  PrefillCallbacks callbacks;
  callbacks.on_header = [&](const v1::PrefillHeader& header, absl::string_view request_id) {
    header_id = std::string(request_id);
    EXPECT_EQ(header.num_tokens(), 5);
    return absl::OkStatus();
  };
  callbacks.on_kv_data = [&](int32_t layer, v1::TensorName tensor, int64_t offset,
                             absl::string_view data) {
    std::string& target = (tensor == v1::TENSOR_NAME_K ? k : v)[static_cast<size_t>(layer)];
    EXPECT_EQ(offset, static_cast<int64_t>(target.size()));
    target.append(data.data(), data.size());
    return absl::OkStatus();
  };
  callbacks.on_layer_done = [&](const PrefillLayerProgress& progress) {
    done.push_back(progress);
    return absl::OkStatus();
  };
  absl::StatusOr<PrefillSummary> summary =
      Feed(request, StreamOf(output, chunk_bytes), std::move(callbacks));
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(header_id, "req-1");
  EXPECT_EQ(summary->request_id, "req-1");
  EXPECT_EQ(k, output.k);
  EXPECT_EQ(v, output.v);
  ASSERT_EQ(done.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(done[i].layer, i);
    EXPECT_EQ(done[i].layers_done, i + 1);
    EXPECT_EQ(done[i].layers_total, 3);
    EXPECT_EQ(done[i].kv_bytes_received, 160 * (i + 1));
  }
  EXPECT_EQ(summary->kv_bytes, 480);
  ASSERT_TRUE(summary->logits.has_value());
  EXPECT_EQ(summary->logits->values_size(), 40);
  EXPECT_EQ(summary->metrics.layers_size(), 3);
  EXPECT_LE(summary->time_to_header, summary->time_to_first_kv_byte);
  EXPECT_LE(summary->time_to_first_kv_byte, summary->total);
}

// One byte, uneven, exactly one tensor, more than a tensor.
INSTANTIATE_TEST_SUITE_P(Chunkings, GoodStreamTest, ::testing::Values(1, 7, 80, 4096));

// A chunk whose data was split off as received comes to on_kv_data piece by piece, each at its
// own offset; no pieces at all is an empty chunk.
TEST(PrefillAssemblerTest, SplitChunkDataArrivesPieceByPiece) {
  const v1::PrefillRequest request = RequestOf(5);
  const FakeOutput output = MakeFakeOutput(request, FakeModel{});
  std::vector<std::string> k(3), v(3);
  std::vector<int64_t> offsets;
  PrefillCallbacks callbacks;
  callbacks.on_kv_data = [&](int32_t layer, v1::TensorName tensor, int64_t offset,
                             absl::string_view data) {
    if (layer == 0 && tensor == v1::TENSOR_NAME_K) offsets.push_back(offset);
    std::string& target = (tensor == v1::TENSOR_NAME_K ? k : v)[static_cast<size_t>(layer)];
    EXPECT_EQ(offset, static_cast<int64_t>(target.size()));
    target.append(data.data(), data.size());
    return absl::OkStatus();
  };
  PrefillStreamAssembler assembler(request, std::move(callbacks), absl::Now(), "test-server");
  for (v1::PrefillResponse message : StreamOf(output, 80)) {
    if (!message.has_kv_chunk()) {
      ASSERT_TRUE(assembler.Consume(message).ok());
      continue;
    }
    // 80 bytes as pieces of 3, 0, 50 and 27 bytes.
    const std::string data = message.kv_chunk().data();
    message.mutable_kv_chunk()->clear_data();
    SegmentedBytes pieces;
    pieces.pieces = {absl::string_view(data).substr(0, 3), absl::string_view(data).substr(3, 0),
                     absl::string_view(data).substr(3, 50), absl::string_view(data).substr(53)};
    pieces.size = data.size();
    ASSERT_TRUE(assembler.Consume(message, pieces).ok());
  }
  absl::StatusOr<PrefillSummary> summary = assembler.Finish();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(k, output.k);
  EXPECT_EQ(v, output.v);
  EXPECT_EQ(offsets, (std::vector<int64_t>{0, 3, 53}));  // empty pieces are skipped
  EXPECT_EQ(summary->kv_bytes, 480);

  PrefillStreamAssembler empty(request, {}, absl::Now(), "test-server");
  const std::vector<v1::PrefillResponse> messages = StreamOf(output, 80);
  ASSERT_TRUE(empty.Consume(messages[0]).ok());
  v1::PrefillResponse chunk = messages[1];
  chunk.mutable_kv_chunk()->clear_data();
  ExpectViolation(empty.Consume(chunk, SegmentedBytes{}), "kv_chunk.data is empty");
}

TEST(PrefillAssemblerTest, RangeNoneAndTopK) {
  v1::PrefillRequest request = RequestOf(3);
  ASSERT_TRUE(SetKvLayers("1:3", &request).ok());
  ASSERT_TRUE(SetLogitsMode("topk:4", &request).ok());
  request.set_kv_dtype(v1::DATA_TYPE_FP32);
  request.set_kv_layout(v1::TENSOR_LAYOUT_TOKEN_MAJOR);
  const FakeOutput ranged = MakeFakeOutput(request, FakeModel{});
  std::vector<int32_t> layers;
  PrefillCallbacks callbacks;
  callbacks.on_layer_done = [&](const PrefillLayerProgress& progress) {
    layers.push_back(progress.layer);
    return absl::OkStatus();
  };
  absl::StatusOr<PrefillSummary> summary = Feed(request, StreamOf(ranged, 16), callbacks);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_THAT(layers, ::testing::ElementsAre(1, 2));
  EXPECT_EQ(summary->logits->top_size(), 4);
  EXPECT_EQ(summary->kv_bytes, 2 * 2 * 3 * 2 * 4 * 4);

  ASSERT_TRUE(SetKvLayers("none", &request).ok());
  ASSERT_TRUE(SetLogitsMode("none", &request).ok());
  FakeOutput none = MakeFakeOutput(request, FakeModel{});
  summary = Feed(request, StreamOf(none, 16));
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->kv_bytes, 0);
  EXPECT_EQ(summary->time_to_first_kv_byte, absl::InfiniteDuration());
  EXPECT_TRUE(summary->logits.has_value());
  none.send_logits = false;  // allowed with LOGITS_MODE_NONE
  summary = Feed(request, StreamOf(none, 16));
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_FALSE(summary->logits.has_value());
}

class BadStreamTest : public ::testing::Test {
 protected:
  BadStreamTest() : request_(RequestOf(5)), output_(MakeFakeOutput(request_, FakeModel{})) {}

  // The good stream in 32-byte chunks: each 80-byte tensor is 3 chunks (32, 32, 16).
  std::vector<v1::PrefillResponse> Good() const { return StreamOf(output_, 32); }

  v1::PrefillRequest request_;
  FakeOutput output_;
};

TEST_F(BadStreamTest, OutOfOrderChunk) {
  std::vector<v1::PrefillResponse> messages = Good();
  std::swap(messages[IndexOf(messages, 1, v1::TENSOR_NAME_K, 0)],
            messages[IndexOf(messages, 1, v1::TENSOR_NAME_K, 32)]);
  ExpectViolation(Feed(request_, messages),
                  "kv_chunk.offset is 32 for layer 1 K, expected 0 (chunks are contiguous)");
}

TEST_F(BadStreamTest, Gap) {
  std::vector<v1::PrefillResponse> messages = Good();
  messages.erase(messages.begin() +
                 static_cast<std::ptrdiff_t>(IndexOf(messages, 0, v1::TENSOR_NAME_V, 32)));
  ExpectViolation(Feed(request_, messages), "kv_chunk.offset is 64 for layer 0 V, expected 32");
}

TEST_F(BadStreamTest, TensorTooShort) {
  std::vector<v1::PrefillResponse> messages = Good();
  messages.erase(messages.begin() +
                 static_cast<std::ptrdiff_t>(IndexOf(messages, 2, v1::TENSOR_NAME_K, 64)));
  ExpectViolation(Feed(request_, messages),
                  "layer 2 K ended after 64 of its 80 bytes: the next kv_chunk is for layer 2 V");
}

TEST_F(BadStreamTest, TensorTooLong) {
  std::vector<v1::PrefillResponse> messages = Good();
  messages[IndexOf(messages, 0, v1::TENSOR_NAME_K, 64)].mutable_kv_chunk()->mutable_data()->append(
      "xx");
  ExpectViolation(Feed(request_, messages),
                  "kv_chunk.data of layer 0 K runs to byte 82, past the 80 bytes of "
                  "header.kv_spec");
}

TEST_F(BadStreamTest, HeaderSpecDisagreesWithTheRequest) {
  std::vector<v1::PrefillResponse> messages = Good();
  messages[0].mutable_header()->mutable_kv_spec()->set_shape(1, 6);
  ExpectViolation(Feed(request_, messages),
                  "header.kv_spec.shape is [2, 6, 4], expected [2, 5, 4] ([num_kv_heads, "
                  "num_tokens, head_dim])");

  messages = Good();
  messages[0].mutable_header()->set_num_tokens(4);
  ExpectViolation(Feed(request_, messages), "header.num_tokens is 4, the request has 5 token ids");

  messages = Good();
  messages[0].mutable_header()->set_kv_dtype(v1::DATA_TYPE_FP16);
  ExpectViolation(Feed(request_, messages),
                  "header.kv_dtype is DATA_TYPE_FP16, requested DATA_TYPE_BF16");

  messages = Good();
  messages[0].mutable_header()->set_bytes_per_layer(80);
  ExpectViolation(Feed(request_, messages), "header.bytes_per_layer is 80, expected 160");

  messages = Good();
  messages[0].mutable_header()->set_kv_layer_begin(1);
  ExpectViolation(Feed(request_, messages),
                  "header.kv_layer_begin/kv_layer_end is [1, 3), expected every layer [0, 3)");

  v1::PrefillRequest pinned = request_;
  pinned.set_expected_fingerprint("0123");
  ExpectViolation(Feed(pinned, Good()),
                  "header.model_fingerprint is 'f00dfeed', the request expected '0123'");
}

TEST_F(BadStreamTest, MissingHeader) {
  std::vector<v1::PrefillResponse> messages = Good();
  messages.erase(messages.begin());
  ExpectViolation(Feed(request_, messages), "kv_chunk before the header");
  ExpectViolation(Feed(request_, {}), "the stream ended before the header");
}

TEST_F(BadStreamTest, VBeforeK) {
  std::vector<v1::PrefillResponse> messages = Good();
  // Move layer 0's first V chunk in front of its first K chunk.
  const size_t v_at = IndexOf(messages, 0, v1::TENSOR_NAME_V, 0);
  const size_t k_at = IndexOf(messages, 0, v1::TENSOR_NAME_K, 0);
  v1::PrefillResponse v_chunk = messages[v_at];
  messages.erase(messages.begin() + static_cast<std::ptrdiff_t>(v_at));
  messages.insert(messages.begin() + static_cast<std::ptrdiff_t>(k_at), v_chunk);
  ExpectViolation(Feed(request_, messages),
                  "kv_chunk.tensor is TENSOR_NAME_V for layer 0, expected TENSOR_NAME_K (K's "
                  "chunks come first)");
}

TEST_F(BadStreamTest, LayersOutOfOrder) {
  std::vector<v1::PrefillResponse> messages = Good();
  for (v1::PrefillResponse& message : messages) {
    if (!message.has_kv_chunk()) continue;
    const int layer = message.kv_chunk().layer();
    if (layer < 2) message.mutable_kv_chunk()->set_layer(1 - layer);  // swap layers 0 and 1
  }
  ExpectViolation(Feed(request_, messages),
                  "kv_chunk.layer is 1, expected 0 (layers arrive in increasing order over [0, "
                  "3))");
}

TEST_F(BadStreamTest, WrongTensorName) {
  std::vector<v1::PrefillResponse> messages = Good();
  messages[1].mutable_kv_chunk()->set_tensor(v1::TENSOR_NAME_Q);
  ExpectViolation(Feed(request_, messages),
                  "kv_chunk.tensor is TENSOR_NAME_Q, expected TENSOR_NAME_K or TENSOR_NAME_V");
}

TEST_F(BadStreamTest, EndsEarlyOrOutOfPlace) {
  std::vector<v1::PrefillResponse> messages = Good();
  messages.resize(IndexOf(messages, 1, v1::TENSOR_NAME_V, 0));
  ExpectViolation(Feed(request_, messages),
                  "the stream ended with 1 of 3 layers complete; next: layer 1 V at byte 0 of 80");

  messages = Good();
  messages.pop_back();  // metrics
  ExpectViolation(Feed(request_, messages), "the stream ended without the final metrics");

  messages = Good();
  messages.erase(messages.end() - 2);  // logits
  ExpectViolation(Feed(request_, messages), "metrics arrived before the logits");

  messages = Good();
  messages.push_back(messages[1]);
  ExpectViolation(Feed(request_, messages), "kv_chunk after the final metrics");

  messages = Good();
  v1::PrefillResponse logits = messages[messages.size() - 2];
  messages.insert(messages.begin() + 3, logits);
  ExpectViolation(Feed(request_, messages),
                  "logits arrived with 0 of 3 layers complete; next: layer 0 K at byte 64 of 80");

  messages = Good();
  messages.insert(messages.begin() + 1, messages[0]);
  ExpectViolation(Feed(request_, messages), "a second header");

  messages = Good();
  messages.insert(messages.begin() + 1, v1::PrefillResponse());
  ExpectViolation(Feed(request_, messages),
                  "a PrefillResponse with none of header, kv_chunk, logits or metrics");
}

TEST_F(BadStreamTest, EmptyChunkAndRequestId) {
  std::vector<v1::PrefillResponse> messages = Good();
  v1::PrefillResponse empty = messages[1];
  empty.mutable_kv_chunk()->clear_data();
  messages.insert(messages.begin() + 1, empty);
  ExpectViolation(Feed(request_, messages), "kv_chunk.data is empty (layer 0 K at byte 0)");

  messages = Good();
  messages[2].set_request_id("other");
  ExpectViolation(Feed(request_, messages), "request_id is 'other', the request's is 'req-1'");
}

TEST_F(BadStreamTest, Logits) {
  std::vector<v1::PrefillResponse> messages = Good();
  messages[messages.size() - 2].mutable_logits()->set_argmax_token_id(40);
  ExpectViolation(Feed(request_, messages),
                  "logits.argmax_token_id is 40, outside the 40 entries of logits.values");

  v1::PrefillRequest top = request_;
  ASSERT_TRUE(SetLogitsMode("topk:3", &top).ok());
  const FakeOutput top_output = MakeFakeOutput(top, FakeModel{});
  messages = StreamOf(top_output, 32);
  v1::Logits* logits = messages[messages.size() - 2].mutable_logits();
  std::swap(*logits->mutable_top(0), *logits->mutable_top(1));
  ExpectViolation(Feed(top, messages), "must be decreasing");
  messages = StreamOf(top_output, 32);
  messages[messages.size() - 2].mutable_logits()->mutable_top()->RemoveLast();
  ExpectViolation(Feed(top, messages),
                  "logits.top has 2 entries, the request asked for logits_top_k = 3");
}

TEST_F(BadStreamTest, CallbackErrorsPassThroughAndStopTheStream) {
  PrefillCallbacks callbacks;
  int calls = 0;
  callbacks.on_kv_data = [&](int32_t, v1::TensorName, int64_t, absl::string_view) {
    ++calls;
    return absl::ResourceExhaustedError("disk full");
  };
  PrefillStreamAssembler assembler(request_, callbacks);
  const std::vector<v1::PrefillResponse> messages = Good();
  ASSERT_TRUE(assembler.Consume(messages[0]).ok());
  const absl::Status status = assembler.Consume(messages[1]);
  EXPECT_EQ(status, absl::ResourceExhaustedError("disk full"));
  EXPECT_EQ(assembler.Consume(messages[2]).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(calls, 1);
}

TEST(PrefillRequestHelpersTest, ParsesIdsLayersAndLogits) {
  absl::StatusOr<std::vector<int32_t>> ids = ParseTokenIds(" 1, 2,3\n4\t5 ,,", "--ids");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ::testing::ElementsAre(1, 2, 3, 4, 5));
  EXPECT_THAT(ParseTokenIds("1,x", "f.txt").status().message(),
              HasSubstr("f.txt: 'x' (item 2) is not a token id"));
  EXPECT_THAT(ParseTokenIds("-3", "--ids").status().message(),
              HasSubstr("token id -3 (item 1) is outside [0, 2^31)"));
  EXPECT_THAT(ParseTokenIds(" , ", "--ids").status().message(),
              HasSubstr("--ids holds no token ids"));

  v1::PrefillRequest request;
  ASSERT_TRUE(SetKvLayers("2:5", &request).ok());
  EXPECT_EQ(request.kv_selection(), v1::KV_SELECTION_RANGE);
  EXPECT_EQ(request.kv_layer_begin(), 2);
  EXPECT_EQ(request.kv_layer_end(), 5);
  ASSERT_TRUE(SetKvLayers("all", &request).ok());
  EXPECT_EQ(request.kv_selection(), v1::KV_SELECTION_ALL);
  EXPECT_EQ(request.kv_layer_end(), 0);
  for (const char* bad : {"3:3", "x", "1:", "-1:2", "1:2:3"}) {
    EXPECT_FALSE(SetKvLayers(bad, &request).ok()) << bad;
  }
  ASSERT_TRUE(SetLogitsMode("topk:7", &request).ok());
  EXPECT_EQ(request.logits_mode(), v1::LOGITS_MODE_TOP_K);
  EXPECT_EQ(request.logits_top_k(), 7);
  ASSERT_TRUE(SetLogitsMode("full", &request).ok());
  EXPECT_EQ(request.logits_top_k(), 0);
  for (const char* bad : {"topk:0", "topk", "top:3", "some"}) {
    EXPECT_FALSE(SetLogitsMode(bad, &request).ok()) << bad;
  }
}

}  // namespace
}  // namespace anchorserve
