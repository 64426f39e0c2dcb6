"""Which HunyuanVideo Linears are quantized, and how, by ComfyUI key name.

The attention and MLP Linears of the 20 double and 40 single blocks carry the token-wise
work and get the configured scheme (W4A8 by default). The modulation Linears (one vector
per sample) and the text refiner (a few hundred text tokens) are weight-only INT4: they
cost no time, and quantizing them is what brings the 13B model under 6.6 GB (the paper's
6.49 GB is reached only with them quantized). Embedders and the final layer stay BF16.
"""

from __future__ import annotations

import re

ARCHITECTURE = "hunyuan_video"

SCHEME_LAYERS = re.compile(
    r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.(0|2))"
    r"|single_blocks\.\d+\.linear[12])$"
)
WEIGHT_ONLY_LAYERS = re.compile(
    r"^(double_blocks\.\d+\.(img|txt)_mod\.lin"
    r"|single_blocks\.\d+\.modulation\.lin"
    r"|txt_in\.individual_token_refiner\.blocks\.\d+\.(self_attn\.(qkv|proj)|mlp\.(0|2)|adaLN_modulation\.1))$"
)

