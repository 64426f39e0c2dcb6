"""Real-ComfyUI fixtures: tiny converted HunyuanVideo and Wan models, a temporary ComfyUI base directory, a server.

ComfyUI is not on PyPI; these tests run against a checkout named by COMFYUI_DIR (started with
the interpreter in COMFYUI_PYTHON, default: this one) and skip without it. The checkout itself
is never written to: models, custom nodes, user data and outputs live in a temporary
``--base-directory`` where the pack and the test-only nodes are symlinked into custom_nodes/.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TEST_NODES = Path(__file__).resolve().parent / "custom_nodes" / "qs_test_nodes"
PACK_DIR_NAME = "comfyui_quantsparse"
LORA_RANK = 4

CKPT = "tiny_w4a8.safetensors"
BAD_PLAIN = "bad_plain_bf16.safetensors"
BAD_TRUNCATED = "bad_truncated.safetensors"
QKV_LORA = "qs_test_qkv_lora.safetensors"
FINAL_LORA = "qs_test_final_layer_lora.safetensors"
BF16_UNET = "tiny_bf16.safetensors"
# Wan (tests/comfyui/test_comfyui_wan.py): each W4A8 file is the `quantsparse convert` of the BF16 one.
WAN_SEEDS = {"wan_t2v": 10, "wan22_t2v_high_noise": 11, "wan22_t2v_low_noise": 12, "wan22_i2v_high_noise": 13,
             "wan22_i2v_low_noise": 14, "wan22_ti2v_5b": 15}
WAN_VAE = "tiny_wan_vae.safetensors"
WAN_LORA = "qs_test_wan_lora.safetensors"
HV15_LIKE = "tiny_hunyuan_video_1.5_like_bf16.safetensors"
START_IMAGE = "example.png"  # LoadImage's file in the image-to-video workflow


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    value = os.environ.get("COMFYUI_DIR")
    if not value:
        pytest.skip("COMFYUI_DIR is not set: point it at a ComfyUI checkout (and COMFYUI_PYTHON at its "
                    "interpreter) to run the real-ComfyUI tests")
    path = Path(value).resolve()
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        pytest.fail(f"COMFYUI_DIR={value} is not a ComfyUI checkout (no main.py / comfy/)")
    return path


@pytest.fixture(scope="session")
def comfyui_python() -> str:
    return os.environ.get("COMFYUI_PYTHON") or sys.executable


@dataclass(frozen=True)
class TinyFiles:
    bf16: Path  # plain ComfyUI-named BF16 HunyuanVideo (tiny dims)
    w4a8: Path  # the same model converted by `quantsparse convert --bits w4a8`
    bad_plain: Path  # a valid safetensors HunyuanVideo without our metadata
    bad_truncated: Path  # the w4a8 file with its tail cut off
    qkv_lora: Path  # LoRA on a quantized Linear (double_blocks.0.img_attn.qkv)
    final_lora: Path  # LoRA on a BF16 Linear (final_layer.linear)


def _lora(prefix: str, out_features: int, in_features: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"diffusion_model.{prefix}.lora_up.weight": torch.randn(out_features, LORA_RANK, generator=g) * 0.5,
        f"diffusion_model.{prefix}.lora_down.weight": torch.randn(LORA_RANK, in_features, generator=g) * 0.5,
        f"diffusion_model.{prefix}.alpha": torch.tensor(float(LORA_RANK)),
    }


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> TinyFiles:
    from safetensors.torch import save_file

    from comfyui_quantsparse.quantsparse.core.config import QuantSparseConfig
    from comfyui_quantsparse.quantsparse.checkpoint.convert import convert_file
    from comfyui_quantsparse.quantsparse.models.hunyuan_video.dims import HunyuanVideoDims
    from comfyui_quantsparse.quantsparse.models.hunyuan_video.random_weights import make_random_state_dict

    d = tmp_path_factory.mktemp("qs_files")
    dims = HunyuanVideoDims.tiny()
    sd = make_random_state_dict(dims, seed=0, dtype=torch.bfloat16)
    files = TinyFiles(bf16=d / BF16_UNET, w4a8=d / CKPT, bad_plain=d / BAD_PLAIN, bad_truncated=d / BAD_TRUNCATED,
                      qkv_lora=d / QKV_LORA, final_lora=d / FINAL_LORA)
    save_file(sd, str(files.bf16))
    convert_file(files.bf16, files.w4a8, QuantSparseConfig(bits="w4a8"))
    shutil.copyfile(files.bf16, files.bad_plain)
    data = files.w4a8.read_bytes()
    files.bad_truncated.write_bytes(data[: len(data) - 4096])
    h = dims.hidden_size
    out_final = dims.out_channels * dims.patch_size[0] * dims.patch_size[1] * dims.patch_size[2]
    save_file(_lora("double_blocks.0.img_attn.qkv", 3 * h, h, seed=1), str(files.qkv_lora))
    save_file(_lora("final_layer.linear", out_final, h, seed=2), str(files.final_lora))
    return files


@dataclass(frozen=True)
class TinyWanFiles:
    """Tiny Wan models (``WanDims.tiny``: dim 256, 2 heads of 128, 2 blocks, text width 4096) with random weights
    (``registry.by_name("wan").random_state_dict``), each as a plain BF16 file for diffusion_models/ and its
    W4A8 conversion for quantsparse/; a tiny Wan 2.1 VAE, a LoRA, a start image and a model of no supported family.
    """

    bf16: dict[str, Path]  # WAN_SEEDS key -> BF16 file
    w4a8: dict[str, Path]  # WAN_SEEDS key -> its QuantSparse W4A8 conversion
    dims: dict[str, object]  # WAN_SEEDS key -> WanDims
    vae: Path  # ComfyUI's own Wan 2.1 VAE class at dim 8 (detected from the file's shapes), random weights
    lora: Path  # LoRA on block 0's self-attention q (W4A8) and cross-attention k (weight-only 4-bit)
    start_image: Path  # a PNG for LoadImage
    unsupported: Path  # a tiny HunyuanVideo 1.5-like model (HunyuanVideo v1 + cond_type_embedding): ComfyUI
    #                    builds it, QuantSparse supports no such family


def wan_dims(key: str):
    from comfyui_quantsparse.quantsparse.models.wan.dims import WanDims

    if "ti2v" in key:
        return WanDims.tiny(in_dim=48, out_dim=48)  # Wan 2.2 TI2V-5B: the 48-channel latent
    if "i2v" in key:
        return WanDims.tiny(in_dim=36)  # Wan 2.2 I2V A14B expert: 16 noise + 4 mask + 16 image channels
    return WanDims.tiny()


# ComfyUI's Wan 2.1 VAE class at a tiny width: sd.py reads ``dim`` from decoder.head.0.gamma, so VAELoader builds
# it as it builds wan_2.1_vae.safetensors. Made by ComfyUI's own module (its interpreter, a subprocess).
_TINY_VAE = r"""
import math, sys
sys.path.insert(0, sys.argv[1])
sys.dont_write_bytecode = True
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.ldm.wan.vae as wan_vae
from safetensors.torch import save_file
m = wan_vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                   temperal_downsample=[False, True, True], image_channels=3, conv_out_channels=3)
g = torch.Generator().manual_seed(0)
sd = {}
for k, v in m.state_dict().items():
    if k.endswith("gamma"):
        t = torch.ones(v.shape)
    elif k.endswith("bias"):
        t = torch.zeros(v.shape)
    else:
        t = torch.randn(v.shape, generator=g) / math.sqrt(max(1, v[0].numel()))
    sd[k] = t.to(torch.bfloat16).contiguous()
save_file(sd, sys.argv[2])
"""


@pytest.fixture(scope="session")
def tiny_wan_files(tmp_path_factory, comfyui_dir, comfyui_python) -> TinyWanFiles:
    from safetensors.torch import save_file

    from comfyui_quantsparse.quantsparse.checkpoint.convert import convert_file
    from comfyui_quantsparse.quantsparse.core.config import QuantSparseConfig
    from comfyui_quantsparse.quantsparse.models import registry
    from comfyui_quantsparse.quantsparse.models.hunyuan_video.dims import HunyuanVideoDims
    from comfyui_quantsparse.quantsparse.models.hunyuan_video.random_weights import make_random_state_dict

    d = tmp_path_factory.mktemp("qs_wan_files")
    wan = registry.by_name("wan")
    bf16, w4a8, dims = {}, {}, {}
    for key, seed in WAN_SEEDS.items():
        dims[key] = wan_dims(key)
        bf16[key], w4a8[key] = d / f"tiny_{key}_bf16.safetensors", d / f"tiny_{key}_w4a8.safetensors"
        save_file(wan.random_state_dict(dims[key], seed), str(bf16[key]))
        convert_file(bf16[key], w4a8[key], QuantSparseConfig(bits="w4a8"))
    vae = d / WAN_VAE
    proc = subprocess.run([comfyui_python, "-c", _TINY_VAE, str(comfyui_dir), str(vae)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"could not make the tiny Wan VAE:\n{proc.stderr[-3000:]}"
    lora = d / WAN_LORA
    dim = dims["wan_t2v"].dim
    save_file({**_lora("blocks.0.self_attn.q", dim, dim, seed=3), **_lora("blocks.0.cross_attn.k", dim, dim, seed=4)},
              str(lora))
    image = d / START_IMAGE
    _write_png(image, 128, 128)
    hv = make_random_state_dict(HunyuanVideoDims.tiny(), seed=5, dtype=torch.bfloat16)
    hv["cond_type_embedding.weight"] = torch.randn(3, HunyuanVideoDims.tiny().hidden_size).to(torch.bfloat16)
    unsupported = d / HV15_LIKE
    save_file(hv, str(unsupported))
    return TinyWanFiles(bf16=bf16, w4a8=w4a8, dims=dims, vae=vae, lora=lora, start_image=image,
                        unsupported=unsupported)


def _write_png(path: Path, width: int, height: int) -> None:
    """A smooth colour gradient as an 8-bit RGB PNG (zlib only: the test process may have no Pillow)."""
    import struct
    import zlib

    rows = b"".join(b"\x00" + bytes(v for x in range(width)
                                    for v in (x * 255 // width, y * 255 // height, 128)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------- a real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ComfyServer:
    url: str
    base: Path
    log: Path
    proc: subprocess.Popen

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as r:
            return json.loads(r.read())

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        body = json.dumps({"prompt": prompt, "client_id": "qs-tests"}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue a prompt and return its /history entry (status and outputs) when it finishes."""
        code, answer = self.post_prompt(prompt)
        assert code == 200, f"/prompt refused the graph: {answer}"
        pid = answer["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                entry = hist[pid]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                pytest.fail(f"ComfyUI exited while running a prompt; log tail:\n{self.log_tail()}")
            time.sleep(0.2)
        pytest.fail(f"prompt {pid} did not finish in {timeout}s; log tail:\n{self.log_tail()}")

    def log_offset(self) -> int:
        """Where the server's log ends now (``log_since`` reads what a later run adds)."""
        return self.log.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _make_base(base: Path, files: TinyFiles, wan: TinyWanFiles) -> None:
    for sub in ("models/quantsparse", "models/loras", "models/diffusion_models", "models/vae", "custom_nodes",
                "output", "input", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    placed = ((files.w4a8, "quantsparse"), (files.bad_plain, "quantsparse"), (files.bad_truncated, "quantsparse"),
              (files.qkv_lora, "loras"), (files.final_lora, "loras"), (files.bf16, "diffusion_models"),
              *((p, "quantsparse") for p in wan.w4a8.values()), *((p, "diffusion_models") for p in wan.bf16.values()),
              (wan.vae, "vae"), (wan.lora, "loras"), (wan.unsupported, "diffusion_models"))
    for src, sub in placed:
        shutil.copyfile(src, base / "models" / sub / src.name)
    shutil.copyfile(wan.start_image, base / "input" / wan.start_image.name)
    (base / "models" / "quantsparse" / "README.txt").write_text("not a checkpoint: must not be listed\n")
    (base / "custom_nodes" / PACK_DIR_NAME).symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / TEST_NODES.name).symlink_to(TEST_NODES, target_is_directory=True)


@pytest.fixture(scope="session")
def comfy_server(comfyui_dir, comfyui_python, tiny_files, tiny_wan_files, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    _make_base(base, tiny_files, tiny_wan_files)
    port = _free_port()
    log = base / "comfyui.log"
    # cwd is the temporary base: ComfyUI writes comfyui_detail.log to its working directory, and the
    # database would otherwise go to <checkout>/user/.
    cmd = [comfyui_python, str(comfyui_dir / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", "--base-directory", str(base),
           "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}", "--disable-all-custom-nodes",
           "--whitelist-custom-nodes", PACK_DIR_NAME, TEST_NODES.name]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=base, stdout=fh, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, log, proc)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited at start (code {proc.returncode}); log tail:\n{server.log_tail()}")
            try:
                server.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer /system_stats in 180 s; log tail:\n{server.log_tail()}")
                time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


# ---------------------------------------------------------------------------- ComfyUI in this process


@pytest.fixture(scope="session")
def comfy_inprocess(comfyui_dir):
    """Import ComfyUI's modules here (CPU), for tests that drive ModelPatcher directly."""
    sys.dont_write_bytecode = True  # leave the checkout as it was
    if str(comfyui_dir) not in sys.path:
        sys.path.insert(0, str(comfyui_dir))
    try:
        import comfy.cli_args
    except ImportError as e:
        pytest.skip(f"ComfyUI's modules do not import in this interpreter ({e}); run pytest with ComfyUI's venv")
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # must precede comfy.model_management's import on a CPU-only torch
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401

    return comfyui_dir
