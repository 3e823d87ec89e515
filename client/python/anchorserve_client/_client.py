"""Prompt prefill over anchorserve.v1.PrefillService.

The server streams a header, then for each returned layer K's chunks then V's chunks (each at
contiguous byte offsets from 0 to exactly the size of ``header.kv_spec``), then the last position's
logits, then its metrics. :func:`prefill` checks every message against that order and raises
:class:`StreamProtocolError` (code ``INTERNAL``) naming the field that was wrong; the call is
cancelled at the first violation.
"""

import collections
import dataclasses
import ipaddress
import json
import math
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import grpc
import numpy as np
from google.protobuf import json_format

from ._stubs import anchorserve_pb2, prefill_pb2, prefill_pb2_grpc

_DTYPES = {
    'bf16': anchorserve_pb2.DATA_TYPE_BF16,
    'fp16': anchorserve_pb2.DATA_TYPE_FP16,
    'fp32': anchorserve_pb2.DATA_TYPE_FP32,
}
_DTYPE_NAMES = {value: name for name, value in _DTYPES.items()}
# Little-endian element types of the bytes on the wire (bf16 as its raw bits).
_WIRE_NUMPY = {'bf16': np.dtype('<u2'), 'fp16': np.dtype('<f2'), 'fp32': np.dtype('<f4')}
_LAYOUTS = {
    'head': anchorserve_pb2.TENSOR_LAYOUT_HEAD_MAJOR,
    'token': anchorserve_pb2.TENSOR_LAYOUT_TOKEN_MAJOR,
}
_LAYOUT_NAMES = {value: name for name, value in _LAYOUTS.items()}
_K = anchorserve_pb2.TENSOR_NAME_K
_V = anchorserve_pb2.TENSOR_NAME_V
_MAX_TOKEN_ID = 2**31 - 1

Target = Union[str, grpc.Channel]


class AnchorServeError(Exception):
    """A failed call: ``code`` is the ``grpc.StatusCode``, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str, rpc: str = 'Prefill'):
        self.code = code
        self.details = details
        self.rpc = rpc
        super().__init__(f'{rpc} failed with {code.name}: {details}')


class StreamProtocolError(AnchorServeError):
    """The server's Prefill stream broke the protocol (code ``INTERNAL``)."""

    def __init__(self, details: str):
        super().__init__(grpc.StatusCode.INTERNAL,
                         f'the server broke the stream protocol: {details}')


@dataclasses.dataclass
class LayerKV:
    """K and V of one model layer, shaped as received.

    Head-major (the default): ``[num_kv_heads, num_tokens, head_dim]``; token-major:
    ``[num_tokens, num_kv_heads, head_dim]``. K is after RoPE, as decoders cache it.
    """

    layer: int
    k: np.ndarray
    v: np.ndarray


@dataclasses.dataclass
class PrefillResult:
    """What :func:`prefill` returns.

    ``layers`` holds the returned layers in order. Element types: fp32 -> ``float32``, fp16 ->
    ``float16``, bf16 -> ``float32`` holding the exact bf16 values (NumPy has no bfloat16), or with
    ``raw_bf16=True`` the raw bf16 bit patterns as ``uint16`` (``bf16_raw`` is then True; view them
    with ``ml_dtypes.bfloat16`` or ``torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)``).
    """

    request_id: str
    header: Any  # prefill_pb2.PrefillHeader
    layers: List[LayerKV]
    kv_dtype: str  # 'bf16' | 'fp16' | 'fp32'
    kv_layout: str  # 'head' | 'token'
    bf16_raw: bool
    argmax_token_id: int  # the greedy next token
    logits: Optional[np.ndarray]  # float32 [vocab_size] with logits='full', else None
    top_logits: List[Tuple[int, float, float]]  # (token_id, logit, logprob), logits='topk:K'
    metrics: Dict[str, Any]  # PrefillMetrics as a dict (proto field names)
    metrics_proto: Any  # prefill_pb2.PrefillMetrics
    kv_bytes: int

    @property
    def num_tokens(self) -> int:
        return self.header.num_tokens

    def layer(self, index: int) -> LayerKV:
        """The returned layer with model layer index ``index``."""
        for kv in self.layers:
            if kv.layer == index:
                return kv
        raise KeyError(f'layer {index} was not returned '
                       f'(layers [{self.header.kv_layer_begin}, {self.header.kv_layer_end}))')


# ---- request ------------------------------------------------------------------------------------


def _token_ids(ids: Iterable[int]) -> List[int]:
    out = []
    for position, value in enumerate(ids):
        if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f'ids[{position}] is {value!r}, not an integer token id')
        if not 0 <= int(value) <= _MAX_TOKEN_ID:
            raise ValueError(f'ids[{position}] = {value} is outside [0, 2^31)')
        out.append(int(value))
    if not out:
        raise ValueError('ids must hold at least one token id')
    return out


def _set_kv_layers(request, kv_layers) -> None:
    if kv_layers == 'all':
        request.kv_selection = prefill_pb2.KV_SELECTION_ALL
        return
    if kv_layers == 'none':
        request.kv_selection = prefill_pb2.KV_SELECTION_NONE
        return
    begin = end = None
    if isinstance(kv_layers, str) and kv_layers.count(':') == 1:
        first, last = kv_layers.split(':')
        if first.isdigit() and last.isdigit():
            begin, end = int(first), int(last)
    elif isinstance(kv_layers, range) and kv_layers.step == 1:
        begin, end = kv_layers.start, kv_layers.stop
    elif isinstance(kv_layers, (tuple, list)) and len(kv_layers) == 2:
        begin, end = kv_layers
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin < end):
        raise ValueError("kv_layers must be 'all', 'none', 'B:E', (B, E) or range(B, E) with "
                         f'0 <= B < E, got {kv_layers!r}')
    request.kv_selection = prefill_pb2.KV_SELECTION_RANGE
    request.kv_layer_begin = begin
    request.kv_layer_end = end


def _set_logits(request, logits: str) -> None:
    if logits == 'full':
        request.logits_mode = prefill_pb2.LOGITS_MODE_FULL
        return
    if logits == 'none':
        request.logits_mode = prefill_pb2.LOGITS_MODE_NONE
        return
    if isinstance(logits, str) and logits.startswith('topk:') and logits[5:].isdigit():
        k = int(logits[5:])
        if k >= 1:
            request.logits_mode = prefill_pb2.LOGITS_MODE_TOP_K
            request.logits_top_k = k
            return
    raise ValueError(f"logits must be 'full', 'none' or 'topk:K' with K >= 1, got {logits!r}")


def _number(name: str, value) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is a real number (not NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f'{name} must be a number, got {value!r}')
    return float(value)


_MODES = {
    'auto': anchorserve_pb2.ATTENTION_MODE_AUTO,
    'anchor': anchorserve_pb2.ATTENTION_MODE_ANCHOR,
    'dense': anchorserve_pb2.ATTENTION_MODE_DENSE,
}


def build_request(ids: Iterable[int], *, theta: Optional[float] = None, dense: bool = False,
                  mode: Optional[str] = None, mass_target: Optional[float] = None, mass_density_cap: Optional[float] = None,
                  mass_min_theta: Optional[float] = None, kv_dtype: str = 'bf16',
                  kv_layout: str = 'head', kv_layers='all', logits: str = 'full',
                  expected_fingerprint: Optional[str] = None, request_id: str = ''):
    """The ``PrefillRequest`` that :func:`prefill` sends (arguments as there)."""
    request = prefill_pb2.PrefillRequest(request_id=request_id, token_ids=_token_ids(ids))
    if mode is not None and mode not in _MODES:
        raise ValueError(f"mode must be 'auto', 'anchor' or 'dense', got {mode!r}")
    if dense and mode not in (None, 'dense'):
        raise ValueError(f'dense and mode={mode!r} exclude each other')
    dense = dense or mode == 'dense'
    if dense and theta is not None:
        raise ValueError('theta and dense exclude each other (dense is exact attention)')
    if dense and mass_target is not None:
        raise ValueError('mass_target and dense exclude each other (dense is exact attention)')
    if mode is not None:
        request.config.mode = _MODES[mode]
    elif dense:
        request.config.mode = anchorserve_pb2.ATTENTION_MODE_DENSE
    if theta is not None:
        request.config.theta = _number('theta', theta)
    # Ranges are the server's to check (INVALID_ARGUMENT naming config.<field>).
    if mass_target is not None:
        request.config.mass_target = _number('mass_target', mass_target)
    if mass_density_cap is not None:
        request.config.mass_density_cap = _number('mass_density_cap', mass_density_cap)
    if mass_min_theta is not None:
        request.config.mass_min_theta = _number('mass_min_theta', mass_min_theta)
    if kv_dtype not in _DTYPES:
        raise ValueError(f"kv_dtype must be 'bf16', 'fp16' or 'fp32', got {kv_dtype!r}")
    request.kv_dtype = _DTYPES[kv_dtype]
    if kv_layout not in _LAYOUTS:
        raise ValueError(f"kv_layout must be 'head' or 'token', got {kv_layout!r}")
    request.kv_layout = _LAYOUTS[kv_layout]
    _set_kv_layers(request, kv_layers)
    _set_logits(request, logits)
    if expected_fingerprint:
        request.expected_fingerprint = expected_fingerprint
    return request


# ---- reading responses ---------------------------------------------------------------------------

_PREFILL_METHOD = '/anchorserve.v1.PrefillService/Prefill'
_KV_CHUNK_FIELD = prefill_pb2.PrefillResponse.KV_CHUNK_FIELD_NUMBER
_KV_DATA_FIELD = prefill_pb2.KvChunk.DATA_FIELD_NUMBER


def _varint(buf: bytes, pos: int) -> Tuple[int, int]:
    """The varint at ``buf[pos]`` and the position after it."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError('varint too long')


def _fields(buf: bytes, start: int, end: int):
    """Yields (field number, wire type, field start, value start, value end) over buf[start:end]."""
    pos = start
    while pos < end:
        tag, value_start = _varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            _, value_end = _varint(buf, value_start)
        elif wire == 1:
            value_end = value_start + 8
        elif wire == 5:
            value_end = value_start + 4
        elif wire == 2:
            length, value_start = _varint(buf, value_start)
            value_end = value_start + length
        else:
            raise ValueError(f'wire type {wire}')  # groups: not in this protocol
        if value_end > end:
            raise ValueError('field runs past its message')
        yield tag >> 3, wire, pos, value_start, value_end
        pos = value_end


def _split_response(raw: bytes):
    """Parses a serialized PrefillResponse, leaving a kv_chunk's ``data`` where grpcio put it.

    Returns (message, data): data is a memoryview into ``raw`` (None when the message has no
    chunk data). Protobuf would copy the bytes into its own message and again into a ``bytes``
    object on access, which costs more than the transfer itself at several GB per prefill. The
    server may send kv_chunk in several occurrences (its data in one of its own); protobuf merges
    them, and so does this. Anything this does not recognise is parsed by protobuf whole.
    """
    try:
        rest, chunk_parts, data, has_chunk = [], [], None, False
        for number, wire, field_start, value_start, value_end in _fields(raw, 0, len(raw)):
            if number != _KV_CHUNK_FIELD or wire != 2:
                rest.append(raw[field_start:value_end])
                continue
            has_chunk = True
            for inner, inner_wire, inner_start, inner_value, inner_end in _fields(
                    raw, value_start, value_end):
                if inner == _KV_DATA_FIELD and inner_wire == 2:
                    data = memoryview(raw)[inner_value:inner_end]  # the last occurrence wins
                else:
                    chunk_parts.append(raw[inner_start:inner_end])
        message = prefill_pb2.PrefillResponse.FromString(b''.join(rest))
        if has_chunk:
            message.kv_chunk.SetInParent()
            message.kv_chunk.MergeFromString(b''.join(chunk_parts))
        return message, data
    except (ValueError, IndexError):
        return prefill_pb2.PrefillResponse.FromString(raw), None


# ---- stream assembly ----------------------------------------------------------------------------


class _Assembler:
    """Checks a Prefill stream against its request and assembles the K/V arrays."""

    def __init__(self, request, raw_bf16: bool,
                 on_layer: Optional[Callable[[LayerKV], None]]):
        self._request = request
        self._raw_bf16 = raw_bf16
        self._on_layer = on_layer
        self.request_id = ''
        self.header = None
        self.logits = None
        self.metrics = None
        self.layers: List[LayerKV] = []
        self.kv_bytes = 0
        self._begin = self._end = self._layer = 0
        self._tensor = _K
        self._offset = 0
        self._tensor_bytes = 0
        self._shape: Tuple[int, ...] = ()
        self._wire_dtype = None
        self._k = self._v = None

    # Requested values with UNSPECIFIED resolved to the defaults.
    def _kv_dtype(self):
        return self._request.kv_dtype or anchorserve_pb2.DATA_TYPE_BF16

    def _kv_layout(self):
        return self._request.kv_layout or anchorserve_pb2.TENSOR_LAYOUT_HEAD_MAJOR

    def _logits_mode(self):
        return self._request.logits_mode or prefill_pb2.LOGITS_MODE_FULL

    def _kv_complete(self) -> bool:
        return self._layer == self._end

    def _position(self) -> str:
        text = f'{self._layer - self._begin} of {self._end - self._begin} layers complete'
        if not self._kv_complete():
            text += (f'; next: layer {self._layer} {_kv_name(self._tensor)} at byte '
                     f'{self._offset} of {self._tensor_bytes}')
        return text

    def consume(self, response, data=None) -> None:
        """Takes the next message; ``data``: its kv_chunk's bytes when split off by
        :func:`_split_response` (else the message's own)."""
        if response.request_id:
            if self._request.request_id and response.request_id != self._request.request_id:
                raise StreamProtocolError(f"request_id is '{response.request_id}', the "
                                          f"request's is '{self._request.request_id}'")
            if self.request_id and response.request_id != self.request_id:
                raise StreamProtocolError(f"request_id changed from '{self.request_id}' to "
                                          f"'{response.request_id}'")
            self.request_id = response.request_id
        kind = response.WhichOneof('kind')
        if self.metrics is not None:
            raise StreamProtocolError(f'{kind or "an empty message"} after the final metrics')
        if kind == 'header':
            self._consume_header(response.header)
        elif kind == 'kv_chunk':
            chunk = response.kv_chunk
            self._consume_chunk(chunk, chunk.data if data is None else data)
        elif kind == 'logits':
            self._consume_logits(response.logits)
        elif kind == 'metrics':
            self._consume_metrics(response.metrics)
        else:
            raise StreamProtocolError(
                'a PrefillResponse with none of header, kv_chunk, logits or metrics')

    def _check_header(self, h) -> None:
        request = self._request
        num_tokens = len(request.token_ids)
        if h.num_tokens != num_tokens:
            raise StreamProtocolError(
                f'header.num_tokens is {h.num_tokens}, the request has {num_tokens} token ids')
        if h.num_layers <= 0:
            raise StreamProtocolError(f'header.num_layers must be positive, got {h.num_layers}')
        begin, end = h.kv_layer_begin, h.kv_layer_end
        if not 0 <= begin <= end <= h.num_layers:
            raise StreamProtocolError(
                f'header.kv_layer_begin/kv_layer_end [{begin}, {end}) is not a range within the '
                f"model's {h.num_layers} layers")
        selection = request.kv_selection
        if selection in (prefill_pb2.KV_SELECTION_UNSPECIFIED, prefill_pb2.KV_SELECTION_ALL):
            expected = (0, h.num_layers)
        elif selection == prefill_pb2.KV_SELECTION_RANGE:
            expected = (request.kv_layer_begin, request.kv_layer_end)
        else:
            expected = None
        if expected is not None and (begin, end) != expected:
            raise StreamProtocolError(
                f'header.kv_layer_begin/kv_layer_end is [{begin}, {end}), expected '
                f'[{expected[0]}, {expected[1]})')
        if selection == prefill_pb2.KV_SELECTION_NONE and begin != end:
            raise StreamProtocolError(
                f'header.kv_layer_begin/kv_layer_end is [{begin}, {end}), expected no layers')
        if request.expected_fingerprint and h.model_fingerprint != request.expected_fingerprint:
            raise StreamProtocolError(
                f"header.model_fingerprint is '{h.model_fingerprint}', the request expected "
                f"'{request.expected_fingerprint}'")
        if begin == end:
            return
        if h.num_kv_heads <= 0 or h.head_dim <= 0:
            raise StreamProtocolError(f'header.num_kv_heads ({h.num_kv_heads}) and '
                                      f'header.head_dim ({h.head_dim}) must be positive')
        if h.kv_dtype != self._kv_dtype():
            raise StreamProtocolError(
                f'header.kv_dtype is {_enum_name(anchorserve_pb2.DataType, h.kv_dtype)}, '
                f'requested {_enum_name(anchorserve_pb2.DataType, self._kv_dtype())}')
        if h.kv_layout != self._kv_layout():
            raise StreamProtocolError(
                f'header.kv_layout is {_enum_name(anchorserve_pb2.TensorLayout, h.kv_layout)}, '
                f'requested {_enum_name(anchorserve_pb2.TensorLayout, self._kv_layout())}')
        spec = h.kv_spec
        if not h.HasField('kv_spec'):
            raise StreamProtocolError('header.kv_spec is missing')
        if spec.dtype != h.kv_dtype or spec.layout != h.kv_layout:
            raise StreamProtocolError('header.kv_spec dtype/layout differ from header.kv_dtype/'
                                      'kv_layout')
        if h.kv_layout == anchorserve_pb2.TENSOR_LAYOUT_TOKEN_MAJOR:
            expected_shape = [num_tokens, h.num_kv_heads, h.head_dim]
        else:
            expected_shape = [h.num_kv_heads, num_tokens, h.head_dim]
        if list(spec.shape) != expected_shape:
            raise StreamProtocolError(
                f'header.kv_spec.shape is {list(spec.shape)}, expected {expected_shape}')
        tensor_bytes = math.prod(expected_shape) * _WIRE_NUMPY[_DTYPE_NAMES[h.kv_dtype]].itemsize
        if h.bytes_per_layer != 2 * tensor_bytes:
            raise StreamProtocolError(f'header.bytes_per_layer is {h.bytes_per_layer}, expected '
                                      f'{2 * tensor_bytes} (K and V of header.kv_spec)')

    def _consume_header(self, header) -> None:
        if self.header is not None:
            raise StreamProtocolError('a second header')
        self._check_header(header)
        self.header = header
        self._begin = self._layer = header.kv_layer_begin
        self._end = header.kv_layer_end
        if self._begin < self._end:
            self._shape = tuple(header.kv_spec.shape)
            self._wire_dtype = _WIRE_NUMPY[_DTYPE_NAMES[header.kv_dtype]]
            self._tensor_bytes = math.prod(self._shape) * self._wire_dtype.itemsize
            self._k = bytearray(self._tensor_bytes)

    def _consume_chunk(self, chunk, data) -> None:
        if self.header is None:
            raise StreamProtocolError('kv_chunk before the header')
        if self.logits is not None:
            raise StreamProtocolError('kv_chunk after the logits')
        if self._kv_complete():
            raise StreamProtocolError(
                f'kv_chunk for layer {chunk.layer} after all {self._end - self._begin} layers '
                f'[{self._begin}, {self._end}) arrived')
        if chunk.tensor not in (_K, _V):
            raise StreamProtocolError(
                f'kv_chunk.tensor is {_enum_name(anchorserve_pb2.TensorName, chunk.tensor)}, '
                'expected TENSOR_NAME_K or TENSOR_NAME_V')
        if chunk.layer != self._layer or chunk.tensor != self._tensor:
            got = f'layer {chunk.layer} {_kv_name(chunk.tensor)}'
            if self._offset > 0:
                raise StreamProtocolError(
                    f'layer {self._layer} {_kv_name(self._tensor)} ended after {self._offset} of '
                    f'its {self._tensor_bytes} bytes: the next kv_chunk is for {got}')
            if chunk.layer != self._layer:
                raise StreamProtocolError(
                    f'kv_chunk.layer is {chunk.layer}, expected {self._layer} (layers arrive in '
                    f'increasing order over [{self._begin}, {self._end}))')
            raise StreamProtocolError(
                f'kv_chunk.tensor is {_enum_name(anchorserve_pb2.TensorName, chunk.tensor)} for '
                f'layer {self._layer}, expected '
                f'{_enum_name(anchorserve_pb2.TensorName, self._tensor)}'
                + (" (K's chunks come first)" if self._tensor == _K else ' (V follows K)'))
        if chunk.offset != self._offset:
            raise StreamProtocolError(
                f'kv_chunk.offset is {chunk.offset} for layer {self._layer} '
                f'{_kv_name(self._tensor)}, expected {self._offset} (chunks are contiguous)')
        size = len(data)
        if size == 0:
            raise StreamProtocolError(f'kv_chunk.data is empty (layer {self._layer} '
                                      f'{_kv_name(self._tensor)} at byte {self._offset})')
        if size > self._tensor_bytes - self._offset:
            raise StreamProtocolError(
                f'kv_chunk.data of layer {self._layer} {_kv_name(self._tensor)} runs to byte '
                f'{self._offset + size}, past the {self._tensor_bytes} bytes of header.kv_spec')
        target = self._k if self._tensor == _K else self._v
        target[self._offset:self._offset + size] = data
        self._offset += size
        self.kv_bytes += size
        if self._offset < self._tensor_bytes:
            return
        self._offset = 0
        if self._tensor == _K:
            self._tensor = _V
            self._v = bytearray(self._tensor_bytes)
            return
        kv = LayerKV(self._layer, self._to_array(self._k), self._to_array(self._v))
        self.layers.append(kv)
        self._layer += 1
        self._tensor = _K
        self._k = bytearray(self._tensor_bytes) if not self._kv_complete() else None
        self._v = None
        if self._on_layer is not None:
            self._on_layer(kv)

    def _to_array(self, data: bytearray) -> np.ndarray:
        array = np.frombuffer(data, dtype=self._wire_dtype).reshape(self._shape)
        if self._wire_dtype == np.dtype('<u2') and not self._raw_bf16:
            # bf16 is the upper half of a float32: widening is exact (shifted in place: one
            # new array, not two).
            wide = array.astype(np.uint32)
            wide <<= 16
            return wide.view(np.float32)
        return array

    def _consume_logits(self, logits) -> None:
        if self.header is None:
            raise StreamProtocolError('logits before the header')
        if self.logits is not None:
            raise StreamProtocolError('a second logits message')
        if not self._kv_complete():
            raise StreamProtocolError(f'logits arrived with {self._position()}')
        if logits.argmax_token_id < 0:
            raise StreamProtocolError(f'logits.argmax_token_id is negative '
                                      f'({logits.argmax_token_id})')
        mode = self._logits_mode()
        if mode == prefill_pb2.LOGITS_MODE_FULL:
            if not logits.values:
                raise StreamProtocolError('logits.values is empty (LOGITS_MODE_FULL)')
            if logits.argmax_token_id >= len(logits.values):
                raise StreamProtocolError(
                    f'logits.argmax_token_id is {logits.argmax_token_id}, outside the '
                    f'{len(logits.values)} entries of logits.values')
        elif mode == prefill_pb2.LOGITS_MODE_TOP_K:
            if len(logits.top) != self._request.logits_top_k:
                raise StreamProtocolError(
                    f'logits.top has {len(logits.top)} entries, the request asked for '
                    f'logits_top_k = {self._request.logits_top_k}')
            for i in range(1, len(logits.top)):
                if logits.top[i].logit > logits.top[i - 1].logit:
                    raise StreamProtocolError(
                        f'logits.top[{i}].logit ({logits.top[i].logit}) is above '
                        f'logits.top[{i - 1}].logit ({logits.top[i - 1].logit}); must be '
                        'decreasing')
            if logits.top and logits.argmax_token_id != logits.top[0].token_id:
                raise StreamProtocolError(
                    f'logits.argmax_token_id is {logits.argmax_token_id}, logits.top[0].token_id '
                    f'is {logits.top[0].token_id}')
        elif logits.values or logits.top:
            raise StreamProtocolError(
                f'logits carry {len(logits.values)} values and {len(logits.top)} top entries '
                'with LOGITS_MODE_NONE')
        self.logits = logits

    def _consume_metrics(self, metrics) -> None:
        if self.header is None:
            raise StreamProtocolError('metrics before the header')
        if not self._kv_complete():
            raise StreamProtocolError(f'metrics arrived with {self._position()}')
        if self._logits_mode() != prefill_pb2.LOGITS_MODE_NONE and self.logits is None:
            raise StreamProtocolError('metrics arrived before the logits')
        self.metrics = metrics

    def finish(self) -> PrefillResult:
        if self.header is None:
            raise StreamProtocolError('the stream ended before the header')
        if not self._kv_complete():
            raise StreamProtocolError(f'the stream ended with {self._position()}')
        if self._logits_mode() != prefill_pb2.LOGITS_MODE_NONE and self.logits is None:
            raise StreamProtocolError('the stream ended without the logits')
        if self.metrics is None:
            raise StreamProtocolError('the stream ended without the final metrics')
        logits = self.logits
        full = None
        if logits is not None and logits.values:
            full = np.asarray(logits.values, dtype=np.float32)
        top = [(t.token_id, t.logit, t.logprob) for t in logits.top] if logits else []
        return PrefillResult(
            request_id=self.request_id,
            header=self.header,
            layers=self.layers,
            kv_dtype=_DTYPE_NAMES.get(self._kv_dtype(), 'bf16'),
            kv_layout=_LAYOUT_NAMES.get(self._kv_layout(), 'head'),
            bf16_raw=self._raw_bf16 and self._kv_dtype() == anchorserve_pb2.DATA_TYPE_BF16,
            argmax_token_id=logits.argmax_token_id if logits is not None else -1,
            logits=full,
            top_logits=top,
            metrics=json_format.MessageToDict(self.metrics, preserving_proto_field_name=True),
            metrics_proto=self.metrics,
            kv_bytes=self.kv_bytes)


def _kv_name(tensor) -> str:
    return 'K' if tensor == _K else 'V'


def _enum_name(enum, value) -> str:
    try:
        return enum.Name(value)
    except ValueError:
        return f'unknown value {value}'


# ---- channels -----------------------------------------------------------------------------------

# Schemes of gRPC's resolvers: a target that starts with one is a URI, commas and all.
_RESOLVER_SCHEMES = ('dns:', 'ipv4:', 'ipv6:', 'unix:', 'unix-abstract:', 'vsock:')

# Requests whose buffered messages exceed this are not retried by gRPC (it keeps what was sent
# until the server answers).
RETRY_BUFFER_BYTES = 64 << 20

# The same service config as the C++ client (client/channel_target.cc): round_robin over every
# address the target resolves to, so that each request may go to another replica, and retries on
# UNAVAILABLE (a replica draining or gone) and CANCELLED (calls that crossed the GOAWAY of a
# replica that began to shut down; the server never answers CANCELLED otherwise). Prefill is
# retried only until its first response message arrives (gRPC commits the call then).
SERVICE_CONFIG = {
    'loadBalancingConfig': [{'round_robin': {}}],
    'methodConfig': [{
        'name': [
            {'service': 'anchorserve.v1.AttentionService', 'method': 'Attend'},
            {'service': 'anchorserve.v1.AttentionService', 'method': 'GetServerInfo'},
            {'service': 'anchorserve.v1.PrefillService', 'method': 'Prefill'},
            {'service': 'anchorserve.v1.PrefillService', 'method': 'GetModelInfo'},
        ],
        'retryPolicy': {
            'maxAttempts': 5,
            'initialBackoff': '0.05s',
            'maxBackoff': '1s',
            'backoffMultiplier': 2,
            'retryableStatusCodes': ['UNAVAILABLE', 'CANCELLED'],
        },
    }],
}


def _list_address(target: str, element: str) -> Tuple[int, str]:
    """(IP version, element) of one 'ip:port' or '[ipv6]:port' list element."""

    def bad(why: str) -> ValueError:
        return ValueError(f"target {target!r}: list element {element!r} {why}; a list holds IP "
                          'addresses with ports (IPv6 in brackets: [fd00::1]:50051), a name goes '
                          'alone, e.g. dns:///anchorserve:50051')

    if not element:
        raise bad('is empty')
    if element.startswith('['):
        host, bracket, port = element[1:].partition(']:')
        if not bracket:
            raise bad("has no ']:port' after its IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad('is not an IPv6 address in brackets') from None
        version = 6
    else:
        host, colon, port = element.rpartition(':')
        if not colon:
            raise bad('has no port')
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise bad('is an IPv6 address without brackets' if ':' in host
                      else 'is not an IP address') from None
        version = 4
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise bad('has no port in [1, 65535]')
    return version, element


def grpc_target(target: str) -> str:
    """The gRPC target for ``target``.

    ``'host:port'`` and ``'dns:///name:port'`` (every address the name resolves to, e.g. a
    Kubernetes headless Service) and other gRPC URIs are returned unchanged; a comma-separated list
    of IP literals with ports (``'10.0.0.1:50051,10.0.0.2:50051'``, IPv6 in brackets) becomes
    gRPC's ``ipv4:``/``ipv6:`` target (one address family per list). ValueError names the element
    that is not an address with a port.
    """
    if not isinstance(target, str) or not target:
        raise ValueError(f"target must be 'host:port', 'dns:///name:port', a list "
                         f"'ip:port,ip:port' or a grpc.Channel, got {target!r}")
    if ',' not in target or target.lower().startswith(_RESOLVER_SCHEMES):
        return target
    addresses = [_list_address(target, element.strip()) for element in target.split(',')]
    versions = {version for version, _ in addresses}
    if len(versions) > 1:
        raise ValueError(f'target {target!r} mixes IPv4 and IPv6 addresses; gRPC takes one '
                         'address family per list (use a dns:/// name that resolves to both)')
    return f'ipv{versions.pop()}:' + ','.join(text for _, text in addresses)


def channel_options() -> List[Tuple[str, Any]]:
    """gRPC channel options of the client: the service config above, retries, no receive limit."""
    return [
        # No client-side limit on received messages (the server chooses its chunk size).
        ('grpc.max_receive_message_length', -1),
        ('grpc.service_config', json.dumps(SERVICE_CONFIG)),
        # Ours, not one from DNS TXT records.
        ('grpc.service_config_disable_resolution', 1),
        ('grpc.enable_retries', 1),
        ('grpc.per_rpc_retry_buffer_size', RETRY_BUFFER_BYTES),
    ]


def create_channel(target: str) -> grpc.Channel:
    """A plaintext channel to ``target`` (any form of :func:`grpc_target`).

    Requests on it are balanced round-robin over the replicas. Reuse it for many calls (pass it as
    ``target``): a channel per call would connect anew each time and balance nothing.
    """
    return grpc.insecure_channel(grpc_target(target), options=channel_options())


class _CallDetails(
        collections.namedtuple('_CallDetails', ('method', 'timeout', 'metadata', 'credentials',
                                                'wait_for_ready', 'compression')),
        grpc.ClientCallDetails):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call (plaintext channels too, where
    gRPC's call credentials are never sent)."""

    def __init__(self, token: str):
        self._header = ('authorization', f'Bearer {token}')

    def _details(self, details):
        metadata = list(details.metadata or []) + [self._header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, getattr(details, 'compression', None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as error:
        raise ValueError(f'{what} {path}: {error.strerror}') from None


def _check_token(token: str, source: str) -> str:
    token = token.strip()
    if not token or any(c <= ' ' or c >= '\x7f' for c in token):
        raise ValueError(f'{source}: the token must be non-empty printable ASCII without spaces')
    return token


def _resolve_token(token: Optional[str], token_file: Optional[str]) -> Optional[str]:
    if token is not None and token_file is not None:
        raise ValueError('pass token or token_file, not both')
    if token is not None:
        return _check_token(token, 'token')
    if token_file is not None:
        lines = [line for line in _read(token_file, 'token_file').decode().splitlines()
                 if line.strip()]
        if not lines:
            raise ValueError(f'token_file {token_file} is empty')
        return _check_token(lines[0], f'token_file {token_file}')
    env = os.environ.get('ANCHOR_TOKEN')
    return _check_token(env, 'ANCHOR_TOKEN') if env else None


def connect(target: str, *, tls_ca_file: Optional[str] = None,
            tls_cert_file: Optional[str] = None, tls_key_file: Optional[str] = None,
            tls_server_name: Optional[str] = None, token: Optional[str] = None,
            token_file: Optional[str] = None) -> grpc.Channel:
    """A channel to ``target`` for servers started with TLS and/or ``--auth_token_file``.

    Pass it to :func:`prefill` and :func:`model_info` in place of the address; close it when
    done (``channel.close()`` or ``with connect(...) as channel``).

    Args:
      target: any form of :func:`grpc_target` (one server, ``dns:///name:port``, a list).
      tls_ca_file: PEM CA certificates that signed the server's certificate. Setting it (or a
        client certificate) makes the channel TLS; otherwise it is plaintext.
      tls_cert_file, tls_key_file: the client certificate chain and key, for servers started
        with ``--tls_client_ca_file`` (mTLS); both or neither.
      tls_server_name: the name the server's certificate must carry when the target's host is
        not it.
      token: bearer token sent as ``authorization: Bearer <token>`` with every call.
      token_file: file whose first non-empty line is the token (instead of ``token``). With
        neither, the ``ANCHOR_TOKEN`` environment variable is used when set.

    Raises:
      ValueError: a file cannot be read, a bad token, or inconsistent options.
    """
    address = grpc_target(target)
    if (tls_cert_file is None) != (tls_key_file is None):
        raise ValueError('tls_cert_file and tls_key_file go together')
    use_tls = tls_ca_file is not None or tls_cert_file is not None
    if tls_server_name is not None and not use_tls:
        raise ValueError('tls_server_name needs tls_ca_file (TLS)')
    bearer = _resolve_token(token, token_file)
    options = channel_options()
    if use_tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(tls_ca_file, 'tls_ca_file') if tls_ca_file else None,
            private_key=_read(tls_key_file, 'tls_key_file') if tls_key_file else None,
            certificate_chain=_read(tls_cert_file, 'tls_cert_file') if tls_cert_file else None)
        if tls_server_name is not None:
            options.append(('grpc.ssl_target_name_override', tls_server_name))
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    if bearer is not None:
        channel = grpc.intercept_channel(channel, _BearerToken(bearer))
    return channel


# ---- calls --------------------------------------------------------------------------------------


class _Channel:
    """A channel for one call: the caller's, or a new one closed afterwards."""

    def __init__(self, target: Target):
        if isinstance(target, grpc.Channel):
            self._channel, self._owned = target, False
        else:
            self._channel = create_channel(target)
            self._owned = True

    def __enter__(self):
        return self._channel

    def __exit__(self, *exc_info):
        if self._owned:
            self._channel.close()


def prefill(target: Target, ids: Sequence[int], *, theta: Optional[float] = None,
            dense: bool = False, mode: Optional[str] = None, mass_target: Optional[float] = None,
            mass_density_cap: Optional[float] = None, mass_min_theta: Optional[float] = None,
            kv_dtype: str = 'bf16', kv_layout: str = 'head',
            kv_layers='all', logits: str = 'full', expected_fingerprint: Optional[str] = None,
            timeout: Optional[float] = None,
            metadata: Optional[Sequence[Tuple[str, str]]] = None,
            on_layer: Optional[Callable[[LayerKV], None]] = None, request_id: str = '',
            raw_bf16: bool = False) -> PrefillResult:
    """Runs the model's prefill over ``ids`` on the server; returns every returned layer's K/V.

    Args:
      target: ``'host:port'``, ``'dns:///name:port'``, ``'ip:port,ip:port,...'`` (plaintext; see
        :func:`grpc_target`) or a channel from :func:`create_channel` or :func:`connect` (TLS and
        tokens), or any ``grpc.Channel``.
      ids: the prompt's token ids.
      theta: AnchorAttention's difference threshold (server default when None). In the server's
        default mode, auto, a prompt short enough that AnchorAttention cannot be cheaper (up to
        10,592 tokens with the default block, step and regions) runs dense whatever ``theta`` or
        ``mass_target`` say; ``metrics.mode_choice`` of the result says which mode ran and why.
      dense: exact dense attention instead (not with ``theta`` or ``mass_target``).
      mode: ``'auto'``, ``'anchor'`` or ``'dense'`` (server default, auto unless set, when
        None); ``'anchor'`` runs AnchorAttention at any length, ``'dense'`` is ``dense=True``.
      mass_target: p in [0, 1]: each (head, group) uses the smallest threshold whose estimated
        kept attention mass reaches p instead of ``theta``; 0 = off (server default when None;
        a cuda server needs step <= 16, else FAILED_PRECONDITION).
      mass_density_cap: in (0, 1]: a group that would keep more than this fraction of its
        candidate keys keeps all of them (server default when None).
      mass_min_theta: the smallest threshold, in nats, a mass target may choose (server default
        when None).
      kv_dtype: ``'bf16'``, ``'fp16'`` or ``'fp32'`` K/V on the wire.
      kv_layout: ``'head'`` ([Hkv, N, d]) or ``'token'`` ([N, Hkv, d]).
      kv_layers: ``'all'``, ``'none'``, ``'B:E'``, ``(B, E)`` or ``range(B, E)``: layers [B, E).
      logits: ``'full'`` (float32 [vocab]), ``'topk:K'`` or ``'none'``.
      expected_fingerprint: fail with FAILED_PRECONDITION unless the server's model matches.
      timeout: seconds for the whole call (None: no deadline).
      metadata: gRPC metadata pairs sent with the call.
      on_layer: called with each :class:`LayerKV` as soon as it is complete; an exception it
        raises cancels the call and propagates.
      request_id: echoed back; the server makes one up when empty.
      raw_bf16: return bf16 K/V as raw ``uint16`` bits instead of exact ``float32``.

    Raises:
      AnchorServeError: the call failed; ``code`` is the gRPC status code.
      StreamProtocolError: the server's stream broke the protocol (``code`` INTERNAL).
      ValueError, TypeError: bad arguments (nothing was sent).
    """
    request = build_request(ids, theta=theta, dense=dense, mode=mode, mass_target=mass_target,
                            mass_density_cap=mass_density_cap, mass_min_theta=mass_min_theta,
                            kv_dtype=kv_dtype, kv_layout=kv_layout, kv_layers=kv_layers,
                            logits=logits, expected_fingerprint=expected_fingerprint,
                            request_id=request_id)
    assembler = _Assembler(request, raw_bf16, on_layer)
    with _Channel(target) as channel:
        method = channel.unary_stream(
            _PREFILL_METHOD, request_serializer=prefill_pb2.PrefillRequest.SerializeToString,
            response_deserializer=_split_response)
        call = method(request, timeout=timeout, metadata=metadata)
        try:
            for response, data in call:
                assembler.consume(response, data)
        except grpc.RpcError as error:
            raise AnchorServeError(error.code(), error.details(), 'Prefill') from None
        except BaseException:
            call.cancel()  # a protocol violation or the caller's on_layer failed
            raise
    return assembler.finish()


def model_info(target: Target, *, timeout: Optional[float] = None,
               metadata: Optional[Sequence[Tuple[str, str]]] = None):
    """The server's loaded model (``prefill_pb2.ModelInfo``); FAILED_PRECONDITION without one."""
    with _Channel(target) as channel:
        stub = prefill_pb2_grpc.PrefillServiceStub(channel)
        try:
            return stub.GetModelInfo(prefill_pb2.GetModelInfoRequest(), timeout=timeout,
                                     metadata=metadata)
        except grpc.RpcError as error:
            raise AnchorServeError(error.code(), error.details(), 'GetModelInfo') from None
