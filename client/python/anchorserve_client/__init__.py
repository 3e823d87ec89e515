"""Python client of anchorserve.v1.PrefillService (token IDs in, KV cache and logits out).

    from anchorserve_client import create_channel, prefill, model_info, to_dynamic_cache

    info = model_info('127.0.0.1:50051')
    result = prefill('127.0.0.1:50051', [1, 2, 3], kv_dtype='bf16', logits='topk:5')
    result.layers[0].k      # numpy [num_kv_heads, num_tokens, head_dim]
    result.argmax_token_id  # greedy next token

    # Several replicas: one channel for many calls, balanced round-robin.
    channel = create_channel('dns:///anchorserve-headless:50051')  # or 'ip:port,ip:port,...'
    result = prefill(channel, [1, 2, 3])

For a server with TLS and tokens, make the channel with ``connect('host:port' (or any target
above), tls_ca_file=..., token=...)``. See client/python/README.md.
"""

from ._client import (AnchorServeError, LayerKV, PrefillResult, StreamProtocolError,
                      build_request, channel_options, connect, create_channel, grpc_target,
                      model_info, prefill)
from ._hf import to_dynamic_cache

__all__ = [
    'AnchorServeError',
    'LayerKV',
    'PrefillResult',
    'StreamProtocolError',
    'build_request',
    'channel_options',
    'connect',
    'create_channel',
    'grpc_target',
    'model_info',
    'prefill',
    'to_dynamic_cache',
]
