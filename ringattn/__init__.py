"""ringattn: exact ring dilated attention.

    import ringattn
    o = ringattn.dilated_attention(q, k, v, [2048, 4096], [1, 2], causal=True)
    ring = ringattn.RingDilatedAttention([2048, 4096], [1, 2], causal=True, world_size=4)
    o = ring(q, k, v); ring.last_stats["peak_bytes"]

See docs/ for the semantics, the ring schedule and the measurements.
"""

import importlib.util as _util

if _util.find_spec(__name__ + "._ext") is None:  # a source checkout, see _checkout.py
    from ._checkout import load_installed as _load_installed

    _load_installed(__name__, __file__)
else:
    from ._ext import RingAttnError, cpu_isa, cuda_device_count
    from ._comm import Communicator, nccl_unique_id
    from ._api import (
        RingDilatedAttention,
        cuda_forward_ptr,
        dilated_attention,
        dilated_attention_backward,
        gather_sequence,
        get_num_threads,
        set_num_threads,
        split_sequence,
    )
    from ._device_array import DeviceArray

    __version__ = "0.1.0"

    __all__ = [
        "Communicator",
        "DeviceArray",
        "RingAttnError",
        "RingDilatedAttention",
        "cpu_isa",
        "cuda_device_count",
        "cuda_forward_ptr",
        "dilated_attention",
        "dilated_attention_backward",
        "gather_sequence",
        "nccl_unique_id",
        "get_num_threads",
        "set_num_threads",
        "split_sequence",
    ]
