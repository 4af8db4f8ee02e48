"""fluxswap: FLUX.1 text-to-image with LoRA hot-swapping, behind a diffusers-shaped API.

    import fluxswap
    pipe = fluxswap.FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev")   # HF cache entry or a folder
    pipe.load_lora_weights("style.safetensors", adapter_name="style")
    image = pipe("a cat holding a sign", num_inference_steps=28, generator=42).images[0]   # uint8 HxWx3

The engine is C++ (fluxswap._fluxswap); this module normalises arguments, shows the progress bar and builds the
output. See python/README.md for what each call does exactly and where it differs from diffusers.
"""
from __future__ import annotations

import errno
import numbers
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from . import _fluxswap
from ._fluxswap import Error, have_cuda

__version__ = _fluxswap.__version__
__all__ = ["FluxPipeline", "Pipeline", "FluxPipelineOutput", "Error", "have_cuda", "__version__"]

_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32", "float": "float32"}
# As `fluxswap generate --vram`: K/M/G/T and KB..TB are powers of 10 (a card sold as 24 GB holds at least 24e9
# bytes), KiB..TiB powers of 2.
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


class FluxPipelineOutput:
    """What a pipeline call returns, shaped like diffusers' FluxPipelineOutput.

    images:  list of numpy uint8 [H, W, 3] arrays (output_type="np"), PIL images ("pil"), or for "latent" the
             final packed latents, float32 [B, tokens, 4 * latent_channels].
    latents: the final packed latents (float32 numpy), whatever output_type was.
    info:    resolved settings and timings: width, height, steps, max_sequence_length, seed, encode_s, denoise_s,
             decode_s.
    """

    def __init__(self, images, latents=None, info=None):
        self.images = images
        self.latents = latents
        self.info = info or {}

    def __getitem__(self, index):  # out[0] is the images, as with diffusers' BaseOutput
        return (self.images,)[index]

    def __iter__(self):
        return iter((self.images,))

    def __len__(self):
        return 1

    def __repr__(self):
        return f"FluxPipelineOutput(images=<{len(self.images)} images>)"


def _dtype_name(dtype) -> str:
    name = str(dtype)
    name = name[len("torch."):] if name.startswith("torch.") else name  # torch.bfloat16 works without torch here
    if name.lower() not in _DTYPES:
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
    return _DTYPES[name.lower()]


def _device_name(device) -> str:
    name = str(device).lower()
    if name in ("auto", "cpu", "cuda", "cuda:0"):
        return "cuda" if name == "cuda:0" else name
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda' (GPU 0), got {device!r}")


def _vram_bytes(vram) -> Optional[int]:
    if vram is None:
        return None
    if isinstance(vram, bool):
        raise ValueError(f"vram must be a byte count or a size such as '24GB', got {vram!r}")
    if isinstance(vram, numbers.Real):
        value = float(vram)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(vram))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"vram must be a byte count or a size such as '24GB' or '16GiB', got {vram!r}")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not value > 0:
        raise ValueError(f"vram must be positive, got {vram!r}")
    return int(value)


def _hf_hub_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")


def _resolve_model_path(path) -> str:
    path = os.fspath(path)
    if os.path.exists(path):
        return path
    if re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", path):  # a Hub repo id: only the local cache is used
        entry = os.path.join(_hf_hub_dir(), "models--" + path.replace("/", "--"))
        if os.path.isdir(entry):
            return entry
        raise FileNotFoundError(errno.ENOENT, f"No such folder, and no Hugging Face cache entry {entry} "
                                "(fluxswap never downloads)", path)
    raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)


def _resolve_lora_path(path, weight_name) -> str:
    path = os.fspath(path)
    if weight_name:
        path = os.path.join(path, weight_name)
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if "pytorch_lora_weights.safetensors" in files:
            files = ["pytorch_lora_weights.safetensors"]
        if len(files) != 1:
            raise ValueError(f"{path}: a folder with {len(files)} .safetensors files; pass weight_name=")
        path = os.path.join(path, files[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
    return path


def _seed_from(generator, seed) -> int:
    if generator is not None and seed is not None:
        raise ValueError("pass either generator= or seed=, not both")
    g = generator if generator is not None else seed
    if g is None:
        return 0
    if isinstance(g, (list, tuple)):
        raise ValueError("one generator per image is not supported: the noise of a batch is drawn from one seed")
    if isinstance(g, numbers.Integral) and not isinstance(g, bool):
        value = int(g)
    elif hasattr(g, "initial_seed"):  # torch.Generator: only its seed is used, never its random stream
        value = int(g.initial_seed())
    else:
        raise TypeError(f"generator must be an int seed or have initial_seed() (torch.Generator), got {type(g).__name__}")
    if not 0 <= value < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {value}")
    return value


def _latents_array(latents) -> Optional[np.ndarray]:
    if latents is None:
        return None
    if hasattr(latents, "detach"):  # a torch tensor (any dtype, any device)
        latents = latents.detach().to("cpu").float().numpy()
    a = np.ascontiguousarray(np.asarray(latents, dtype=np.float32))
    if a.ndim != 3:
        raise ValueError(f"latents must be packed [batch, tokens, 4 * latent channels], got shape {a.shape}")
    return a


def _optional_int(name, value) -> int:
    if value is None:
        return 0  # the engine's default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


class FluxPipeline:
    """A FLUX.1 pipeline on the fluxswap engine. Make one with FluxPipeline.from_pretrained()."""

    def __init__(self, engine, requested_dtype: str, vram: Optional[int]):
        self._engine = engine
        self.requested_dtype = requested_dtype
        self.vram = vram
        self._progress_bar_config: Dict[str, Any] = {}

    # ---- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, dtype=None, device="auto", vram=None, *,
                        torch_dtype=None, lora_max_rank: int = 64) -> "FluxPipeline":
        """Loads a diffusers FLUX.1 pipeline folder, a Hugging Face cache entry (models--org--name), or a Hub id
        ("black-forest-labs/FLUX.1-dev") that is already in the local cache; nothing is downloaded.

        dtype ("bfloat16" default, or "float32"; torch dtypes and torch_dtype= work too): the CUDA backend computes
        in bfloat16, the CPU reference always in float32 (so "bfloat16" on the CPU runs float32; float32 on CUDA is
        a ValueError). device: "auto" (the GPU when this build has CUDA and a GPU is present, else the CPU), "cpu"
        or "cuda". vram: a device memory budget (bytes, or "24GB" = 24e9, "24GiB"): the engine plans which
        components stay on the device (text encoders move there only to encode), caps its allocator at the budget
        (going past it is an Error), and raises Error when the model cannot fit (fluxswap generate --vram, docs).
        lora_max_rank: the rank per projection runtime LoRA slots start with (they grow when an adapter needs more).
        """
        if dtype is not None and torch_dtype is not None:
            raise ValueError("pass either dtype= or torch_dtype=, not both")
        dtype_name = _dtype_name(dtype if dtype is not None else (torch_dtype if torch_dtype is not None else "bfloat16"))
        device_name = _device_name(device)
        vram_bytes = _vram_bytes(vram)
        if dtype_name == "float32" and device_name == "cuda":
            raise ValueError("the CUDA backend computes in bfloat16; float32 needs device='cpu'")
        path = _resolve_model_path(pretrained_model_name_or_path)
        engine = _fluxswap.Engine(path, device_name, int(lora_max_rank), int(vram_bytes or 0))
        if dtype_name == "float32" and engine.dtype != "float32":
            del engine
            raise ValueError("device='auto' chose the GPU, which computes in bfloat16; for float32 pass device='cpu'")
        return cls(engine, dtype_name, vram_bytes)

    @property
    def device(self) -> str:
        """'cpu' or 'cuda'."""
        return self._engine.device

    @property
    def dtype(self) -> str:
        """The dtype the engine computes in: 'float32' on the CPU, 'bfloat16' on CUDA."""
        return self._engine.dtype

    @property
    def backend_name(self) -> str:
        return self._engine.backend_name

    @property
    def path(self) -> str:
        return self._engine.path

    @property
    def is_guidance_distilled(self) -> bool:
        """True for FLUX.1-dev-style models (guidance_scale is used), False for schnell (it is ignored)."""
        return self._engine.guidance_distilled

    @property
    def vae_scale_factor(self) -> int:
        return self._engine.vae_scale_factor

    def __repr__(self):
        return f"FluxPipeline(path={self.path!r}, device={self.device!r}, dtype={self.dtype!r})"

    # ---- LoRA ----------------------------------------------------------------------------------------------------
    def load_lora_weights(self, pretrained_model_name_or_path, adapter_name: Optional[str] = None,
                          hotswap: bool = True, *, weight_name: Optional[str] = None) -> None:
        """Loads a LoRA file (PEFT/diffusers, kohya, ComfyUI, OneTrainer, XLabs) and activates it at weight 1.0
        beside the adapters already active. A folder works with weight_name= or when it holds one .safetensors
        file. adapter_name defaults to the file name without extension. If adapter_name is already loaded,
        hotswap=True replaces its weights in place (keeping its active weight); hotswap=False raises ValueError.
        """
        path = _resolve_lora_path(pretrained_model_name_or_path, weight_name)
        if adapter_name is None:
            adapter_name = os.path.splitext(os.path.basename(path))[0]
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
        self._engine.load_lora(path, adapter_name, bool(hotswap))

    def set_adapters(self, adapter_names: Union[str, Sequence[str]],
                     adapter_weights: Union[None, float, Sequence[float]] = None, *, weights=None) -> None:
        """Makes exactly these adapters active with these weights (1.0 each by default; one number for all). When
        fused, the weights are re-merged from the base weights (times the fuse scale). `weights=` is an alias."""
        if weights is not None:
            if adapter_weights is not None:
                raise ValueError("pass either adapter_weights= or weights=, not both")
            adapter_weights = weights
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if isinstance(adapter_weights, dict):
            raise ValueError("per-component adapter weights are not supported: fluxswap applies LoRA to the "
                             "transformer only")
        if adapter_weights is None:
            values = [1.0] * len(names)
        elif isinstance(adapter_weights, numbers.Real):
            values = [float(adapter_weights)] * len(names)
        else:
            values = [float(w) for w in adapter_weights]
        if len(values) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(values)} weights")
        self._engine.set_adapters(names, values)

    def get_active_adapters(self) -> List[str]:
        return [name for name, _ in self._engine.active_adapters()]

    def get_adapter_weights(self) -> Dict[str, float]:
        """The active adapters and their weights (before the fuse scale)."""
        return dict(self._engine.active_adapters())

    def get_list_adapters(self) -> Dict[str, List[str]]:
        """Loaded adapters per component they change, as diffusers returns them:
        {"transformer": [names in load order], "text_encoder": [those with CLIP LoRAs]}."""
        return dict(self._engine.list_adapters())

    def delete_adapters(self, adapter_names: Union[str, Sequence[str]]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._engine.delete_adapters(names)

    def fuse_lora(self, lora_scale: float = 1.0, *, components=None, safe_fusing: bool = False,
                  adapter_names: Optional[Sequence[str]] = None) -> None:
        """Merges the active adapters into the transformer weights (W = W_base + lora_scale * weight * up @ down):
        no per-step LoRA cost. The base weights are kept, so set_adapters re-merges exactly and unfuse_lora() /
        unload_lora_weights() restore them bit for bit. safe_fusing is accepted (adapters are checked for NaN/Inf
        when loaded). adapter_names, when given, must be the active adapters."""
        if adapter_names is not None and sorted(adapter_names) != sorted(self.get_active_adapters()):
            raise ValueError("fuse_lora fuses the active adapters; call set_adapters(adapter_names) first")
        self._engine.fuse(float(lora_scale))

    def unfuse_lora(self, *, components=None) -> None:
        """Back to unfused adapters (runtime slots: W x + up (down x) per layer; swaps rewrite slot contents only)."""
        self._engine.unfuse()

    def unload_lora_weights(self) -> None:
        """Removes every adapter; the transformer is the base model again, bit for bit (also after fuse_lora:
        unlike diffusers, fused weights do not outlive unloading)."""
        self._engine.unload()

    def enable_fp8(self, linears: bool = True, attention: bool = False) -> None:
        """FP8 (e4m3) inference: the transformer's block and modulation linears with per-row scales and activations
        quantised per token (Hopper/Ada), and with attention=True cuDNN's FP8 attention too (Hopper). Costs a little
        quality (docs/PERF.md: 28-step cosine vs bf16 >= 0.998 on random weights); enable_fp8(False, False) returns
        to bf16 exactly. A checkpoint stored in FP8 is FP8 already and cannot leave it."""
        self._engine.set_precision(bool(linears), bool(attention))

    @property
    def fp8(self) -> bool:
        """Whether the transformer's linears run in FP8."""
        return self._engine.fp8

    @property
    def fp8_attention(self) -> bool:
        return self._engine.fp8_attention

    def disable_lora(self) -> None:
        self._engine.set_enabled(False)

    def enable_lora(self) -> None:
        self._engine.set_enabled(True)

    @property
    def lora_mode(self) -> str:
        """How the active adapters are applied now: 'none', 'runtime' (unfused) or 'merged' (fused, or an unfused
        adapter with a lora_B bias, which runtime slots cannot hold)."""
        return self._engine.lora_mode()

    @property
    def lora_fused(self) -> bool:
        return self._engine.fused()

    # ---- generation ----------------------------------------------------------------------------------------------
    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for the tqdm bar (e.g. disable=True, leave=False, desc=...)."""
        self._progress_bar_config = dict(kwargs)

    def encode_prompt(self, prompt: Union[str, Sequence[str]], max_sequence_length: Optional[int] = None):
        """(prompt_embeds [B, S, text dim], pooled_prompt_embeds [B, pooled dim], text_ids [S, 3]) as float32
        numpy arrays, as diffusers' FluxPipeline.encode_prompt returns them."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds, pooled = self._engine.encode(prompts, _optional_int("max_sequence_length", max_sequence_length))
        return embeds, pooled, np.zeros((embeds.shape[1], 3), dtype=np.float32)

    def __call__(self, prompt: Union[str, Sequence[str]], height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: Optional[int] = None, guidance_scale: float = 3.5,
                 num_images_per_prompt: int = 1, generator=None, latents=None, output_type: str = "np",
                 return_dict: bool = True, max_sequence_length: Optional[int] = None, *, seed: Optional[int] = None,
                 on_step: Optional[Callable[[int, int, float], None]] = None):
        """Text to image(s). Defaults come from the model: 1024x1024 (128 for the tiny test pipeline), 28 steps
        for dev / 4 for schnell, max_sequence_length 512 / 256. guidance_scale is the distilled guidance of
        FLUX.1-dev (ignored by schnell). generator: an int seed, or an object with initial_seed() (a
        torch.Generator: only its seed is used; the noise is fluxswap's counter RNG, not torch's); seed= is the same
        as an int generator; neither: seed 0, so calls are reproducible. latents: exact packed initial noise
        [B, tokens, 4 * latent channels] (numpy or torch). on_step(step, steps, seconds) runs after every step.
        output_type "np" (uint8 HxWx3 arrays), "pil" (needs Pillow) or "latent" (packed final latents).
        Returns FluxPipelineOutput, or (images,) with return_dict=False."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if output_type not in ("np", "pil", "latent"):
            raise ValueError(f"output_type must be 'np', 'pil' or 'latent', got {output_type!r}")
        if output_type == "pil":
            try:
                from PIL import Image
            except ImportError as e:
                raise ImportError("output_type='pil' needs Pillow (pip install pillow); 'np' gives numpy arrays") from e
        copies = _optional_int("num_images_per_prompt", num_images_per_prompt)
        prompts = [p for p in prompts for _ in range(copies)]
        seed_value = _seed_from(generator, seed)
        latents_in = _latents_array(latents)

        bar = None
        config = dict(self._progress_bar_config)
        tqdm = None
        if not config.get("disable", False):
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None

        def step(i, n, seconds):
            nonlocal bar
            if tqdm is not None:
                if bar is None:
                    bar = tqdm(total=n, **config)
                bar.update(1)
            if on_step is not None:
                on_step(i, n, seconds)

        try:
            images, final_latents, info = self._engine.generate(
                prompts, _optional_int("width", width), _optional_int("height", height),
                _optional_int("num_inference_steps", num_inference_steps), float(guidance_scale), seed_value,
                latents_in, _optional_int("max_sequence_length", max_sequence_length), step)
        finally:
            if bar is not None:
                bar.close()
        info["seed"] = seed_value
        if output_type == "pil":
            images = [Image.fromarray(a) for a in images]
        elif output_type == "latent":
            images = final_latents
        if not return_dict:
            return (images,)
        return FluxPipelineOutput(images, final_latents, info)


Pipeline = FluxPipeline  # the short name
