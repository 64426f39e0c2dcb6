"""Which Wan Linears are quantized, and how, by ComfyUI key name.

The Linears that run on the video tokens (self-attention q, k, v, o; cross-attention q and o; the FFN)
carry the token-wise work and get the configured scheme (W4A8 by default); self-attention's q, k and v
read the same normalised, modulated input, so the loader quantizes that input once for the three. The
cross-attention k and v see only the 512 text tokens (and the 257 CLIP tokens for I2V) once per model
call, and the time projection one vector per sample: there activation quantization buys nothing and the
GEMMs are memory-bound, so their weights are 4-bit and their inputs stay BF16 (W4A16): a quarter of the
bytes, which is also what brings a 14B expert under 8.2 GB. Embedders, the head and the CLIP projection
stay BF16.
"""

from __future__ import annotations

import re

ARCHITECTURE = "wan"

SCHEME_LAYERS = re.compile(r"^blocks\.\d+\.(self_attn\.(q|k|v|o)|cross_attn\.(q|o)|ffn\.(0|2))$")
WEIGHT_ONLY_LAYERS = re.compile(r"^(blocks\.\d+\.cross_attn\.(k|v|k_img|v_img)|time_projection\.1)$")

