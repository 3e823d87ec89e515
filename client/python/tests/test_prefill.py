"""Tests of anchorserve_client against an in-process fake PrefillService (numpy + grpcio only).

Run from the repository root (CTest does this with the stubs of the build tree):
  ANCHORSERVE_CLIENT_GEN_DIR=build/client/python/gen \
      /usr/bin/python3 -m unittest discover -s client/python/tests
"""

import importlib.util
import os
import socket
import sys
import unittest

import grpc
import numpy as np
from google.protobuf.message import DecodeError

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import anchorserve_client  # noqa: E402
from anchorserve_client import AnchorServeError, StreamProtocolError  # noqa: E402
from anchorserve_client._client import _split_response  # noqa: E402
from anchorserve_client._stubs import anchorserve_pb2, prefill_pb2  # noqa: E402

from fake_server import FakeModel, FakeServer, Script, make_output, stream_of  # noqa: E402

CHUNK = 20  # bytes per chunk: uneven against every tensor size below


class PrefillTestCase(unittest.TestCase):

    def setUp(self):
        self.model = FakeModel()
        self.server = FakeServer(self.model).__enter__()
        self.addCleanup(self.server.__exit__, None, None, None)
        self.use_good_stream()

    def use_good_stream(self, chunk=CHUNK, mutate=None, **script_args):
        """Answers every Prefill with a correct stream, optionally changed by mutate(messages)."""

        def script(request):
            messages = stream_of(make_output(request, self.model), chunk)
            if mutate is not None:
                mutate(messages)
            return Script(messages, **script_args)

        self.server.servicer.script = script


class AssemblyTest(PrefillTestCase):

    def test_every_dtype_and_layout(self):
        ids = [5, 9, 2, 7, 1]
        for dtype in ('bf16', 'fp16', 'fp32'):
            for layout in ('head', 'token'):
                with self.subTest(dtype=dtype, layout=layout):
                    seen = []
                    result = anchorserve_client.prefill(
                        self.server.target, ids, kv_dtype=dtype, kv_layout=layout,
                        on_layer=lambda kv: seen.append(kv.layer))
                    expected = make_output(self.server.servicer.requests[-1], self.model)
                    self.assertEqual(seen, [0, 1, 2])
                    self.assertEqual([kv.layer for kv in result.layers], [0, 1, 2])
                    shape = (2, 5, 4) if layout == 'head' else (5, 2, 4)
                    want_dtype = {'bf16': np.float32, 'fp16': np.float16, 'fp32': np.float32}
                    for i, kv in enumerate(result.layers):
                        self.assertEqual(kv.k.shape, shape)
                        self.assertEqual(kv.k.dtype, want_dtype[dtype])
                        np.testing.assert_array_equal(kv.k, expected.k_values[i])
                        np.testing.assert_array_equal(kv.v, expected.v_values[i])
                    self.assertEqual(result.kv_dtype, dtype)
                    self.assertEqual(result.kv_layout, layout)
                    self.assertFalse(result.bf16_raw)
                    self.assertEqual(result.num_tokens, 5)
                    self.assertEqual(result.kv_bytes, 3 * 2 * 40 * (4 if dtype == 'fp32' else 2))

    def test_raw_bf16(self):
        result = anchorserve_client.prefill(self.server.target, [1, 2, 3], raw_bf16=True)
        expected = make_output(self.server.servicer.requests[-1], self.model)
        self.assertTrue(result.bf16_raw)
        self.assertEqual(result.layers[1].v.dtype, np.dtype('<u2'))
        np.testing.assert_array_equal(result.layers[1].v, expected.v_raw[1])
        # The bits widen to exactly the float32 values the default returns.
        np.testing.assert_array_equal(
            (result.layers[1].v.astype(np.uint32) << 16).view(np.float32), expected.v_values[1])

    def test_layer_selection(self):
        result = anchorserve_client.prefill(self.server.target, [1, 2], kv_layers='1:3')
        self.assertEqual([kv.layer for kv in result.layers], [1, 2])
        self.assertEqual(result.layer(2).k.shape, (2, 2, 4))
        with self.assertRaises(KeyError):
            result.layer(0)
        request = self.server.servicer.requests[-1]
        self.assertEqual(request.kv_selection, prefill_pb2.KV_SELECTION_RANGE)
        self.assertEqual((request.kv_layer_begin, request.kv_layer_end), (1, 3))
        for spelled in ((1, 3), range(1, 3)):
            result = anchorserve_client.prefill(self.server.target, [1, 2], kv_layers=spelled)
            self.assertEqual([kv.layer for kv in result.layers], [1, 2])

        result = anchorserve_client.prefill(self.server.target, [1, 2], kv_layers='none')
        self.assertEqual(result.layers, [])
        self.assertEqual(result.kv_bytes, 0)

    def test_logits_modes(self):
        result = anchorserve_client.prefill(self.server.target, [3, 4])
        expected = make_output(self.server.servicer.requests[-1], self.model)
        self.assertEqual(result.logits.dtype, np.float32)
        self.assertEqual(result.logits.shape, (32,))
        np.testing.assert_array_equal(result.logits, np.asarray(expected.logits.values,
                                                                dtype=np.float32))
        self.assertEqual(result.argmax_token_id, int(np.argmax(result.logits)))
        self.assertEqual(result.top_logits, [])

        result = anchorserve_client.prefill(self.server.target, [3, 4], logits='topk:4')
        self.assertIsNone(result.logits)
        self.assertEqual(len(result.top_logits), 4)
        self.assertEqual(result.top_logits[0][0], result.argmax_token_id)
        logits_by_rank = [logit for _, logit, _ in result.top_logits]
        self.assertEqual(logits_by_rank, sorted(logits_by_rank, reverse=True))
        self.assertEqual(self.server.servicer.requests[-1].logits_top_k, 4)

        result = anchorserve_client.prefill(self.server.target, [3, 4], logits='none')
        self.assertIsNone(result.logits)
        self.assertEqual(result.top_logits, [])
        self.assertGreaterEqual(result.argmax_token_id, 0)

    def test_request_fields_metadata_and_metrics(self):
        result = anchorserve_client.prefill(
            self.server.target, np.array([11, 12, 13], dtype=np.int64), theta=7.5,
            kv_dtype='fp16', kv_layout='token', logits='topk:2', expected_fingerprint='cafe01',
            request_id='py-1', metadata=[('x-tenant', 'tests')], timeout=30)
        request = self.server.servicer.requests[-1]
        self.assertEqual(list(request.token_ids), [11, 12, 13])
        self.assertEqual(request.request_id, 'py-1')
        self.assertEqual(request.config.theta, 7.5)
        self.assertEqual(request.config.mode, anchorserve_pb2.ATTENTION_MODE_UNSPECIFIED)
        self.assertEqual(request.kv_dtype, anchorserve_pb2.DATA_TYPE_FP16)
        self.assertEqual(request.kv_layout, anchorserve_pb2.TENSOR_LAYOUT_TOKEN_MAJOR)
        self.assertEqual(request.expected_fingerprint, 'cafe01')
        self.assertEqual(self.server.servicer.metadata[-1].get('x-tenant'), 'tests')
        self.assertEqual(result.request_id, 'py-1')
        self.assertEqual(result.header.model_fingerprint, 'cafe01')
        self.assertEqual(result.metrics['backend'], 'fake-py')
        self.assertEqual(len(result.metrics['layers']), 3)
        self.assertEqual(result.metrics_proto.layers[2].density, 0.75)

        anchorserve_client.prefill(self.server.target, [1], dense=True)
        self.assertEqual(self.server.servicer.requests[-1].config.mode,
                         anchorserve_pb2.ATTENTION_MODE_DENSE)

    def test_existing_channel(self):
        with grpc.insecure_channel(self.server.target) as channel:
            result = anchorserve_client.prefill(channel, [1, 2, 3, 4])
            self.assertEqual(len(result.layers), 3)
            self.assertEqual(anchorserve_client.model_info(channel).num_layers, 3)

    def test_model_info(self):
        info = anchorserve_client.model_info(self.server.target, timeout=10)
        self.assertEqual(info.architecture, 'Qwen2ForCausalLM')
        self.assertEqual(info.vocab_size, 32)
        self.assertEqual(info.fingerprint, 'cafe01')


class ErrorTest(PrefillTestCase):

    def assertCode(self, context, code):
        self.assertEqual(context.exception.code, code, str(context.exception))

    def test_server_statuses_become_exceptions_with_the_code(self):
        for code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                     grpc.StatusCode.RESOURCE_EXHAUSTED):
            with self.subTest(code=code):
                self.server.servicer.script = lambda request, code=code: Script(
                    [], code=code, details='model fingerprint differs')
                with self.assertRaises(AnchorServeError) as context:
                    anchorserve_client.prefill(self.server.target, [1, 2])
                self.assertCode(context, code)
                self.assertEqual(context.exception.details, 'model fingerprint differs')
                self.assertNotIsInstance(context.exception, StreamProtocolError)

    def test_error_after_part_of_the_stream(self):
        self.use_good_stream(mutate=lambda messages: messages.__delitem__(slice(4, None)),
                             code=grpc.StatusCode.UNAVAILABLE, details='draining')
        with self.assertRaises(AnchorServeError) as context:
            anchorserve_client.prefill(self.server.target, [1, 2, 3])
        self.assertCode(context, grpc.StatusCode.UNAVAILABLE)

    def test_deadline(self):
        self.use_good_stream(delay=0.2)
        with self.assertRaises(AnchorServeError) as context:
            anchorserve_client.prefill(self.server.target, [1, 2, 3], timeout=0.3)
        self.assertCode(context, grpc.StatusCode.DEADLINE_EXCEEDED)

    def test_unreachable_server_and_model_info_errors(self):
        with socket.socket() as probe:
            probe.bind(('127.0.0.1', 0))
            port = probe.getsockname()[1]
        with self.assertRaises(AnchorServeError) as context:
            anchorserve_client.prefill(f'127.0.0.1:{port}', [1], timeout=10)
        self.assertCode(context, grpc.StatusCode.UNAVAILABLE)

        self.server.servicer.info_error = grpc.StatusCode.FAILED_PRECONDITION
        with self.assertRaises(AnchorServeError) as context:
            anchorserve_client.model_info(self.server.target)
        self.assertCode(context, grpc.StatusCode.FAILED_PRECONDITION)
        self.assertEqual(context.exception.rpc, 'GetModelInfo')

    def test_mass_target_fields(self):
        anchorserve_client.prefill(self.server.target, [1, 2, 3], mass_target=0.95,
                                   mass_density_cap=0.5, mass_min_theta=-1)
        config = self.server.servicer.requests[-1].config
        self.assertAlmostEqual(config.mass_target, 0.95)
        self.assertEqual(config.mass_density_cap, 0.5)
        self.assertEqual(config.mass_min_theta, -1.0)
        self.assertFalse(config.HasField('theta'))
        self.assertEqual(config.mode, anchorserve_pb2.ATTENTION_MODE_UNSPECIFIED)

        # Unset arguments leave the fields to the server's defaults; 0 (off) is sent as set.
        request = anchorserve_client.build_request([1], mass_target=0)
        self.assertTrue(request.config.HasField('mass_target'))
        self.assertEqual(request.config.mass_target, 0.0)
        self.assertFalse(request.config.HasField('mass_density_cap'))
        self.assertFalse(request.config.HasField('mass_min_theta'))
        plain = anchorserve_client.build_request([1])
        for field in ('mass_target', 'mass_density_cap', 'mass_min_theta'):
            self.assertFalse(plain.config.HasField(field), field)

    def test_mode(self):
        for mode, value in (('auto', anchorserve_pb2.ATTENTION_MODE_AUTO),
                            ('anchor', anchorserve_pb2.ATTENTION_MODE_ANCHOR),
                            ('dense', anchorserve_pb2.ATTENTION_MODE_DENSE)):
            with self.subTest(mode=mode):
                anchorserve_client.prefill(self.server.target, [1, 2, 3], mode=mode)
                self.assertEqual(self.server.servicer.requests[-1].config.mode, value)
        request = anchorserve_client.build_request([1], dense=True, mode='dense')
        self.assertEqual(request.config.mode, anchorserve_pb2.ATTENTION_MODE_DENSE)
        request = anchorserve_client.build_request([1], mode='anchor', theta=8)
        self.assertEqual(request.config.theta, 8.0)
        plain = anchorserve_client.build_request([1])
        self.assertEqual(plain.config.mode, anchorserve_pb2.ATTENTION_MODE_UNSPECIFIED)

    def test_on_layer_exceptions_propagate(self):
        def fail(kv):
            raise RuntimeError(f'no room for layer {kv.layer}')

        with self.assertRaisesRegex(RuntimeError, 'no room for layer 0'):
            anchorserve_client.prefill(self.server.target, [1, 2], on_layer=fail)

    def test_bad_arguments_send_nothing(self):
        target = self.server.target
        cases = [
            dict(ids=[]),
            dict(ids=[1, -1]),
            dict(ids=[2**31]),
            dict(ids=[1], theta=3.0, dense=True),
            dict(ids=[1], mass_target=0.9, dense=True),
            dict(ids=[1], mode='sparse'),
            dict(ids=[1], mode='anchor', dense=True),
            dict(ids=[1], mode='dense', theta=3.0),
            dict(ids=[1], mass_target=float('nan')),
            dict(ids=[1], mass_target='0.9'),
            dict(ids=[1], mass_target=True),
            dict(ids=[1], mass_density_cap=float('nan')),
            dict(ids=[1], mass_min_theta=float('nan')),
            dict(ids=[1], mass_min_theta='low'),
            dict(ids=[1], kv_dtype='int8'),
            dict(ids=[1], kv_layout='rows'),
            dict(ids=[1], kv_layers='3:1'),
            dict(ids=[1], kv_layers='x'),
            dict(ids=[1], logits='topk:0'),
            dict(ids=[1], logits='best'),
        ]
        for case in cases:
            with self.subTest(**{k: str(v) for k, v in case.items()}):
                ids = case.pop('ids')
                with self.assertRaises(ValueError):
                    anchorserve_client.prefill(target, ids, **case)
        with self.assertRaises(TypeError):
            anchorserve_client.prefill(target, [1.5])
        self.assertEqual(self.server.servicer.requests, [])


def _chunk_index(messages, layer, tensor, offset):
    for i, message in enumerate(messages):
        chunk = message.kv_chunk
        if (message.WhichOneof('kind') == 'kv_chunk' and chunk.layer == layer
                and chunk.tensor == tensor and chunk.offset == offset):
            return i
    raise AssertionError(f'no chunk of layer {layer} at {offset}')


K = anchorserve_pb2.TENSOR_NAME_K
V = anchorserve_pb2.TENSOR_NAME_V


class ProtocolTest(PrefillTestCase):
    """Streams that break the order are rejected with StreamProtocolError (INTERNAL)."""

    # 5 tokens x 2 heads x 4 dims x bf16 = 80 bytes per tensor: chunks at 0, 20, 40, 60.
    IDS = [1, 2, 3, 4, 5]

    def expect_violation(self, mutate, text):
        self.use_good_stream(mutate=mutate)
        with self.assertRaises(StreamProtocolError) as context:
            anchorserve_client.prefill(self.server.target, self.IDS)
        self.assertEqual(context.exception.code, grpc.StatusCode.INTERNAL)
        self.assertIn(text, str(context.exception))

    def test_out_of_order_chunk(self):
        def swap(messages):
            a, b = _chunk_index(messages, 1, K, 20), _chunk_index(messages, 1, K, 40)
            messages[a], messages[b] = messages[b], messages[a]

        self.expect_violation(swap, 'kv_chunk.offset is 40 for layer 1 K, expected 20 '
                                    '(chunks are contiguous)')

    def test_gap(self):
        self.expect_violation(lambda m: m.pop(_chunk_index(m, 0, V, 0)),
                              'kv_chunk.offset is 20 for layer 0 V, expected 0')

    def test_v_before_k(self):
        def v_first(messages):
            v = messages.pop(_chunk_index(messages, 0, V, 0))
            messages.insert(_chunk_index(messages, 0, K, 0), v)

        self.expect_violation(v_first, 'kv_chunk.tensor is TENSOR_NAME_V for layer 0, expected '
                                       "TENSOR_NAME_K (K's chunks come first)")

    def test_wrong_sizes(self):
        self.expect_violation(lambda m: m.pop(_chunk_index(m, 2, K, 60)),
                              'layer 2 K ended after 60 of its 80 bytes: the next kv_chunk is '
                              'for layer 2 V')

        def longer(messages):
            messages[_chunk_index(messages, 0, K, 60)].kv_chunk.data += b'xy'

        self.expect_violation(longer, 'kv_chunk.data of layer 0 K runs to byte 82, past the 80 '
                                      'bytes of header.kv_spec')

        def wrong_spec(messages):
            messages[0].header.kv_spec.shape[1] = 6

        self.expect_violation(wrong_spec, 'header.kv_spec.shape is [2, 6, 4], expected [2, 5, 4]')

    def test_layers_out_of_order(self):
        def swap_layers(messages):
            for message in messages:
                if message.WhichOneof('kind') == 'kv_chunk' and message.kv_chunk.layer < 2:
                    message.kv_chunk.layer = 1 - message.kv_chunk.layer

        self.expect_violation(swap_layers, 'kv_chunk.layer is 1, expected 0')

    def test_missing_or_misplaced_messages(self):
        self.expect_violation(lambda m: m.pop(0), 'kv_chunk before the header')
        self.expect_violation(lambda m: m.pop(), 'the stream ended without the final metrics')
        self.expect_violation(lambda m: m.pop(-2), 'metrics arrived before the logits')
        self.expect_violation(lambda m: m.append(m[1]), 'kv_chunk after the final metrics')
        self.expect_violation(lambda m: m.insert(1, m[0]), 'a second header')
        self.expect_violation(lambda m: m.__delitem__(slice(5, None)),
                              'the stream ended with 0 of 3 layers complete; next: layer 0 V at '
                              'byte 0 of 80')
        self.expect_violation(lambda m: m.insert(2, m[-2]), 'logits arrived with 0 of 3 layers '
                                                            'complete')

    def test_header_disagrees_with_the_request(self):
        def fingerprint(messages):
            messages[0].header.model_fingerprint = 'other'

        self.use_good_stream(mutate=fingerprint)
        with self.assertRaises(StreamProtocolError) as context:
            anchorserve_client.prefill(self.server.target, [1], expected_fingerprint='cafe01')
        self.assertIn("header.model_fingerprint is 'other'", str(context.exception))

        def tokens(messages):
            messages[0].header.num_tokens = 9

        self.expect_violation(tokens, 'header.num_tokens is 9, the request has 5 token ids')


def _length_delimited(field, payload):
    """One length-delimited protobuf field (tag, varint length, payload)."""
    out = bytearray()
    for value in ((field << 3) | 2, len(payload)):
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out) + payload


class SplitResponseTest(unittest.TestCase):
    """_split_response leaves kv_chunk.data in the received bytes and parses the rest."""

    def setUp(self):
        self.data = np.random.default_rng().integers(0, 256, 300, dtype=np.uint8).tobytes()
        self.head = prefill_pb2.PrefillResponse(request_id='r-1')
        self.head.kv_chunk.layer = 2
        self.head.kv_chunk.tensor = anchorserve_pb2.TENSOR_NAME_V
        self.head.kv_chunk.offset = 1 << 40

    def check(self, raw):
        message, data = _split_response(raw)
        self.assertIsInstance(data, memoryview)
        self.assertEqual(bytes(data), self.data)
        self.assertEqual(message.request_id, 'r-1')
        self.assertEqual(message.WhichOneof('kind'), 'kv_chunk')
        self.assertEqual((message.kv_chunk.layer, message.kv_chunk.tensor, message.kv_chunk.offset),
                         (2, anchorserve_pb2.TENSOR_NAME_V, 1 << 40))
        self.assertEqual(message.kv_chunk.data, b'')
        # Protobuf reads the same bytes as the same message with the data inside.
        whole = prefill_pb2.PrefillResponse.FromString(raw)
        message.kv_chunk.data = bytes(data)
        self.assertEqual(message, whole)

    def test_data_in_a_second_occurrence_as_anchorserve_sends_it(self):
        data_field = prefill_pb2.KvChunk.DATA_FIELD_NUMBER
        chunk_field = prefill_pb2.PrefillResponse.KV_CHUNK_FIELD_NUMBER
        self.check(self.head.SerializeToString() +
                   _length_delimited(chunk_field, _length_delimited(data_field, self.data)))

    def test_data_inside_the_one_occurrence(self):
        message = prefill_pb2.PrefillResponse()
        message.CopyFrom(self.head)
        message.kv_chunk.data = self.data
        self.check(message.SerializeToString())

    def test_other_messages_and_empty_chunks_parse_as_protobuf_does(self):
        header = prefill_pb2.PrefillResponse(request_id='r-1')
        header.header.num_tokens = 7
        empty = prefill_pb2.PrefillResponse()
        empty.kv_chunk.layer = 1
        for message in (header, empty, prefill_pb2.PrefillResponse()):
            parsed, data = _split_response(message.SerializeToString())
            self.assertIsNone(data)
            self.assertEqual(parsed, message)
            self.assertEqual(parsed.WhichOneof('kind'), message.WhichOneof('kind'))

    def test_malformed_bytes_fail_as_protobuf_fails(self):
        raw = self.head.SerializeToString()
        for bad in (raw[:-1], b'\x1a\xff', b'\xff' * 11):
            with self.assertRaises(DecodeError):
                _split_response(bad)


class DynamicCacheTest(unittest.TestCase):

    def test_needs_torch_and_transformers(self):
        if all(importlib.util.find_spec(name) for name in ('torch', 'transformers')):
            self.skipTest('torch and transformers are installed; example_generate.py uses them')
        with self.assertRaisesRegex(ImportError, 'to_dynamic_cache needs torch and transformers'):
            anchorserve_client.to_dynamic_cache(None)


if __name__ == '__main__':
    unittest.main()
