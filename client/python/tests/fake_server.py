"""An in-process fake anchorserve.v1.PrefillService for the client tests.

``make_output`` builds what a correct server answers to a request (K/V from seeded random values in
the requested dtype and layout, logits of the requested mode, metrics); ``stream_of`` cuts it into
the protocol's messages; ``FakeServer`` serves scripted message lists on localhost.
"""

import dataclasses
import math
import threading
import time
from concurrent import futures
from typing import Callable, List, Optional

import grpc
import numpy as np

from anchorserve_client._stubs import anchorserve_pb2, prefill_pb2, prefill_pb2_grpc


@dataclasses.dataclass
class FakeModel:
    num_layers: int = 3
    num_kv_heads: int = 2
    head_dim: int = 4
    vocab_size: int = 32
    fingerprint: str = 'cafe01'


def model_info_of(model: FakeModel):
    info = prefill_pb2.ModelInfo(
        architecture='Qwen2ForCausalLM', num_layers=model.num_layers,
        hidden_size=model.num_kv_heads * model.head_dim * 2, num_q_heads=model.num_kv_heads * 2,
        num_kv_heads=model.num_kv_heads, head_dim=model.head_dim, intermediate_size=64,
        vocab_size=model.vocab_size, max_position_embeddings=4096,
        weight_dtype=anchorserve_pb2.DATA_TYPE_BF16, num_parameters=1000,
        fingerprint=model.fingerprint, kv_bytes_per_token=4 * model.num_layers * model.num_kv_heads
        * model.head_dim, load_seconds=0.5, tied_embeddings=True, rms_norm_eps=1e-6)
    info.rope.style = 'rotate_half'
    info.rope.theta = 1e6
    info.rope.scaling = 'none'
    return info


@dataclasses.dataclass
class FakeOutput:
    request_id: str
    header: object
    k_bytes: List[bytes]  # per returned layer, as sent
    v_bytes: List[bytes]
    k_values: List[np.ndarray]  # what the client should return (bf16 widened to float32)
    v_values: List[np.ndarray]
    k_raw: List[np.ndarray]  # bf16 only: the raw uint16 bits
    v_raw: List[np.ndarray]
    logits: object
    metrics: object
    send_logits: bool = True


def _encode(values: np.ndarray, dtype: str):
    """(wire bytes, decoded values, raw bf16 bits or None)."""
    if dtype == 'fp32':
        wire = values.astype('<f4')
        return wire.tobytes(), wire.astype(np.float32), None
    if dtype == 'fp16':
        wire = values.astype('<f2')
        return wire.tobytes(), wire.astype(np.float16), None
    bits = (values.astype(np.float32).view(np.uint32) >> 16).astype('<u2')  # truncation is fine
    return bits.tobytes(), (bits.astype(np.uint32) << 16).view(np.float32), bits


def make_output(request, model: FakeModel, seed: int = 0) -> FakeOutput:
    num_tokens = len(request.token_ids)
    begin, end = 0, model.num_layers
    if request.kv_selection == prefill_pb2.KV_SELECTION_RANGE:
        begin, end = request.kv_layer_begin, request.kv_layer_end
    elif request.kv_selection == prefill_pb2.KV_SELECTION_NONE:
        end = 0
    dtype_proto = request.kv_dtype or anchorserve_pb2.DATA_TYPE_BF16
    layout = request.kv_layout or anchorserve_pb2.TENSOR_LAYOUT_HEAD_MAJOR
    dtype = {anchorserve_pb2.DATA_TYPE_BF16: 'bf16', anchorserve_pb2.DATA_TYPE_FP16: 'fp16',
             anchorserve_pb2.DATA_TYPE_FP32: 'fp32'}[dtype_proto]
    if layout == anchorserve_pb2.TENSOR_LAYOUT_TOKEN_MAJOR:
        shape = [num_tokens, model.num_kv_heads, model.head_dim]
    else:
        shape = [model.num_kv_heads, num_tokens, model.head_dim]
    element = {'bf16': 2, 'fp16': 2, 'fp32': 4}[dtype]
    tensor_bytes = math.prod(shape) * element

    header = prefill_pb2.PrefillHeader(
        model_fingerprint=model.fingerprint, num_tokens=num_tokens, num_layers=model.num_layers,
        kv_layer_begin=begin, kv_layer_end=end, num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim, kv_dtype=dtype_proto, kv_layout=layout,
        bytes_per_layer=2 * tensor_bytes)
    header.rope.style = 'rotate_half'
    header.rope.theta = 1e6
    header.rope.scaling = 'none'
    header.kv_spec.dtype = dtype_proto
    header.kv_spec.layout = layout
    header.kv_spec.shape.extend(shape)

    rng = np.random.default_rng(seed)
    out = FakeOutput(request.request_id or 'fake-py', header, [], [], [], [], [], [], None, None)
    for _ in range(begin, end):
        for wire, values, raw in (out.k_bytes, out.k_values, out.k_raw), (out.v_bytes,
                                                                          out.v_values, out.v_raw):
            encoded, decoded, bits = _encode(rng.standard_normal(shape).astype(np.float32), dtype)
            wire.append(encoded)
            values.append(decoded)
            raw.append(bits)

    values = (4 * np.sin(0.7 * np.arange(model.vocab_size) + seed)).astype(np.float32)
    argmax = int(np.argmax(values))
    logits = prefill_pb2.Logits(argmax_token_id=argmax)
    mode = request.logits_mode or prefill_pb2.LOGITS_MODE_FULL
    if mode == prefill_pb2.LOGITS_MODE_FULL:
        logits.values.extend(values.tolist())
    elif mode == prefill_pb2.LOGITS_MODE_TOP_K:
        log_sum = float(np.log(np.sum(np.exp(values.astype(np.float64)))))
        for token in np.argsort(-values, kind='stable')[:request.logits_top_k]:
            logits.top.add(token_id=int(token), logit=float(values[token]),
                           logprob=float(values[token]) - log_sum)
    out.logits = logits

    metrics = prefill_pb2.PrefillMetrics(
        density=0.5, queue_seconds=0.001, compute_seconds=0.02, transfer_seconds=0.0,
        time_to_first_kv_byte_seconds=0.005, time_to_last_byte_seconds=0.03,
        tokens_per_second=num_tokens / 0.02, backend='fake-py',
        kv_bytes=2 * tensor_bytes * (end - begin))
    for layer in range(model.num_layers):
        metrics.layers.add(layer=layer, density=0.25 + 0.25 * layer,
                           identification_seconds=0.001, attention_seconds=0.002,
                           layer_seconds=0.004)
    metrics.effective_config.CopyFrom(request.config)
    out.metrics = metrics
    return out


def stream_of(output: FakeOutput, chunk_bytes: int):
    messages = [prefill_pb2.PrefillResponse(request_id=output.request_id, header=output.header)]
    for i, (k, v) in enumerate(zip(output.k_bytes, output.v_bytes)):
        layer = output.header.kv_layer_begin + i
        for name, data in (anchorserve_pb2.TENSOR_NAME_K, k), (anchorserve_pb2.TENSOR_NAME_V, v):
            for offset in range(0, len(data), chunk_bytes):
                chunk = prefill_pb2.KvChunk(layer=layer, tensor=name, offset=offset,
                                            data=data[offset:offset + chunk_bytes])
                messages.append(prefill_pb2.PrefillResponse(request_id=output.request_id,
                                                            kv_chunk=chunk))
    if output.send_logits:
        messages.append(prefill_pb2.PrefillResponse(request_id=output.request_id,
                                                    logits=output.logits))
    messages.append(prefill_pb2.PrefillResponse(request_id=output.request_id,
                                                metrics=output.metrics))
    return messages


@dataclasses.dataclass
class Script:
    messages: list
    code: Optional[grpc.StatusCode] = None  # abort with this after the messages
    details: str = ''
    delay: float = 0.0  # seconds before each message


class FakeServicer(prefill_pb2_grpc.PrefillServiceServicer):

    def __init__(self, model: FakeModel):
        self.model = model
        self.script: Optional[Callable[[object], Script]] = None
        self.info_error: Optional[grpc.StatusCode] = None
        self.info_failures: List[grpc.StatusCode] = []  # answered to the next GetModelInfo calls
        self.info_calls = 0
        self.requests = []
        self.metadata = []
        self._lock = threading.Lock()

    def Prefill(self, request, context):  # noqa: N802 (gRPC's method name)
        with self._lock:
            self.requests.append(request)
            self.metadata.append(dict(context.invocation_metadata()))
            script = self.script(request)
        for message in script.messages:
            if script.delay:
                time.sleep(script.delay)
            if not context.is_active():
                return
            yield message
        if script.code is not None:
            context.abort(script.code, script.details)

    def GetModelInfo(self, request, context):  # noqa: N802
        with self._lock:
            self.info_calls += 1
            failure = self.info_failures.pop(0) if self.info_failures else None
        if failure is not None:
            context.abort(failure, 'injected failure')
        if self.info_error is not None:
            context.abort(self.info_error, 'the server runs without --model')
        return model_info_of(self.model)


class FakeServer:
    """The fake service on ``host`` (a free port) while used as a context manager."""

    def __init__(self, model: Optional[FakeModel] = None, host: str = '127.0.0.1'):
        self.servicer = FakeServicer(model or FakeModel())
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        prefill_pb2_grpc.add_PrefillServiceServicer_to_server(self.servicer, self._server)
        port = self._server.add_insecure_port(f'{host}:0')
        self.target = f'{host}:{port}'

    def __enter__(self):
        self._server.start()
        return self

    def __exit__(self, *exc_info):
        self._server.stop(grace=None)
