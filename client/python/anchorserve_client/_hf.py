"""Hand-off of a remote prefill to a local Hugging Face transformers decoder.

The exact hand-off: prefill all but the last prompt token remotely, then give the *whole* prompt
to ``generate()`` together with the cache. ``generate()`` sees that the cache already covers
``len(ids) - 1`` positions, computes only the last prompt token locally (producing the logits of
the first new token) and decodes from there::

    result = prefill(target, ids[:-1])
    cache = to_dynamic_cache(result, dtype=model.dtype)
    input_ids = torch.tensor([ids])
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                         past_key_values=cache, max_new_tokens=32)

Passing a cache that covers the whole prompt leaves ``generate()`` no token to compute, so do not
prefill ``ids`` in full for this purpose (the full prefill's ``argmax_token_id`` is the greedy
first token, which is useful on its own).
"""

from typing import Any, Optional

import numpy as np


def to_dynamic_cache(result, *, dtype: Optional[Any] = None, device: Optional[Any] = None):
    """A ``transformers.DynamicCache`` holding every layer of a :class:`PrefillResult`.

    Each layer goes in with ``cache.update(k, v, layer)`` as ``[1, num_kv_heads, num_tokens,
    head_dim]`` tensors (either wire layout is transposed as needed). ``dtype`` defaults to the
    wire dtype (bf16 K/V become ``torch.bfloat16`` exactly); pass ``model.dtype`` to match the
    model. Needs torch and transformers (5.x: ``DynamicCache()`` grows its layers on update), and a
    result with every layer (``kv_layers='all'``).
    """
    try:
        import torch
        from transformers import DynamicCache
    except ImportError as error:
        raise ImportError('to_dynamic_cache needs torch and transformers '
                          f'(pip install torch transformers): {error}') from error
    header = result.header
    if header.kv_layer_begin != 0 or header.kv_layer_end != header.num_layers:
        raise ValueError(
            f'to_dynamic_cache needs every layer; the result holds layers '
            f'[{header.kv_layer_begin}, {header.kv_layer_end}) of {header.num_layers} '
            "(prefill with kv_layers='all')")
    wire_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}
    target_dtype = dtype if dtype is not None else wire_dtype[result.kv_dtype]

    def tensor(array: np.ndarray):
        if result.bf16_raw:
            t = torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.ascontiguousarray(array))
        if result.kv_layout == 'token':  # [N, Hkv, d] -> [Hkv, N, d]
            t = t.transpose(0, 1)
        return t.unsqueeze(0).to(device=device, dtype=target_dtype).contiguous()

    cache = DynamicCache()
    for kv in result.layers:
        cache.update(tensor(kv.k), tensor(kv.v), kv.layer)
    return cache
