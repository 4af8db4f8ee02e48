"""The fluxswap Python module against the diffusers goldens of the tiny fixture pipelines (shared/fixtures), with the
tolerances the C++ tests use: on the CPU reference, text embeddings and final latents within 1e-4 of max|ref|
(max|a-b| / max|b|) and the 8-bit image within 1 level of round(255 * reference); on CUDA (FLUXSWAP_DEVICE=cuda,
bf16) 2e-2 and 12 levels, as tests/cuda/test_cuda_pipeline.cpp. Skips when the fixtures are absent.

Run: PYTHONPATH=build/python FLUXSWAP_FIXTURES=../shared/fixtures python3 -m unittest discover -s python/tests
"""
import json
import os
import struct
import sys
import tempfile
import threading
import time
import types
import unittest

import numpy as np

import fluxswap

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.environ.get("FLUXSWAP_FIXTURES", os.path.join(HERE, "..", "..", "..", "shared", "fixtures"))
HAVE_FIXTURES = os.path.exists(os.path.join(FIXTURES, "tiny", "config.json"))
DEVICE = os.environ.get("FLUXSWAP_DEVICE", "cpu")
ON_GPU = DEVICE == "cuda"
REL_TOL = 2e-2 if ON_GPU else 1e-4   # max|a-b| / max|b|
LEVEL_TOL = 12 if ON_GPU else 1      # 8-bit levels


def read_safetensors(path):
    """(tensors as float32/int numpy arrays, metadata) from a .safetensors file, numpy only."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    dtypes = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "U8": "u1", "BOOL": "?"}
    out = {}
    for key, e in header.items():
        begin, end = e["data_offsets"]
        raw = data[begin:end]
        if e["dtype"] == "BF16":
            a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(raw, dtype=dtypes[e["dtype"]])
        out[key] = a.reshape(e["shape"]).astype(np.float32 if a.dtype.kind == "f" else a.dtype)
    return out, meta


def write_safetensors(path, tensors):
    """Writes float32 numpy arrays as a .safetensors file."""
    header, blobs, offset = {}, [], 0
    for key, a in tensors.items():
        raw = np.ascontiguousarray(a, dtype="<f4").tobytes()
        header[key] = {"dtype": "F32", "shape": list(np.shape(a)), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def rel_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all(), "NaN/Inf in the result"
    return float(np.abs(a - b).max() / np.abs(b).max())


def level_difference(image_u8, reference01):
    """Largest difference in 8-bit levels between a uint8 [H, W, 3] image and a float [1, H, W, 3] one in 0..1."""
    ref = np.floor(np.asarray(reference01, np.float64)[0] * 255.0 + 0.5).astype(np.int64)  # lround for >= 0
    assert image_u8.shape == ref.shape and image_u8.dtype == np.uint8, (image_u8.shape, image_u8.dtype)
    return int(np.abs(image_u8.astype(np.int64) - ref).max())


class Arguments(unittest.TestCase):
    """Validation that happens before the engine is reached: no fixtures needed."""

    def test_unknown_dtype_device_and_vram_are_value_errors(self):
        with self.assertRaisesRegex(ValueError, "dtype must be 'bfloat16' or 'float32', got 'float16'"):
            fluxswap.FluxPipeline.from_pretrained("/nonexistent", dtype="float16")
        with self.assertRaisesRegex(ValueError, "device must be"):
            fluxswap.FluxPipeline.from_pretrained("/nonexistent", device="tpu")
        with self.assertRaisesRegex(ValueError, "vram must be"):
            fluxswap.FluxPipeline.from_pretrained("/nonexistent", vram="lots")
        with self.assertRaisesRegex(ValueError, "float32 needs device='cpu'"):
            fluxswap.FluxPipeline.from_pretrained("/nonexistent", dtype="float32", device="cuda")

    def test_vram_sizes(self):
        self.assertEqual(fluxswap._vram_bytes("24GB"), 24 * 10**9)
        self.assertEqual(fluxswap._vram_bytes("1.5 GiB"), 3 * 2**29)
        self.assertEqual(fluxswap._vram_bytes(1000), 1000)
        self.assertIsNone(fluxswap._vram_bytes(None))
        with self.assertRaises(ValueError):
            fluxswap._vram_bytes(-1)

    def test_missing_model_names_the_path(self):
        with self.assertRaises(FileNotFoundError) as cm:
            fluxswap.FluxPipeline.from_pretrained("/nonexistent/flux-model")
        self.assertIn("/nonexistent/flux-model", str(cm.exception))

    def test_engine_errors_are_fluxswap_errors_with_the_engine_message(self):
        self.assertTrue(issubclass(fluxswap.Error, RuntimeError))
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaises(fluxswap.Error) as cm:
                fluxswap.FluxPipeline.from_pretrained(d, device="cpu")
            self.assertIn(d, str(cm.exception))
            self.assertIn("model_index.json", str(cm.exception))

    def test_seeds(self):
        class Gen:
            def initial_seed(self):
                return 1234

        self.assertEqual(fluxswap._seed_from(None, None), 0)
        self.assertEqual(fluxswap._seed_from(7, None), 7)
        self.assertEqual(fluxswap._seed_from(np.int64(7), None), 7)
        self.assertEqual(fluxswap._seed_from(None, 9), 9)
        self.assertEqual(fluxswap._seed_from(Gen(), None), 1234)
        with self.assertRaises(ValueError):
            fluxswap._seed_from(1, 2)
        with self.assertRaises(ValueError):
            fluxswap._seed_from(-1, None)
        with self.assertRaises(TypeError):
            fluxswap._seed_from("seed", None)


class _GoldenBase:
    """Shared by the tiny (dev-style) and tiny_schnell fixture pipelines."""

    fixture = None

    @classmethod
    def setUpClass(cls):
        if not HAVE_FIXTURES:
            raise unittest.SkipTest(f"no fixtures at {FIXTURES}")
        cls.dir = os.path.join(FIXTURES, cls.fixture)
        cls.g, cls.meta = read_safetensors(os.path.join(cls.dir, "pipeline_goldens.safetensors"))
        cls.pipe = fluxswap.FluxPipeline.from_pretrained(os.path.join(cls.dir, "pipeline"), device=DEVICE)
        cls.pipe.set_progress_bar_config(disable=True)
        cls.lora_a = os.path.join(cls.dir, "lora_a_peft.safetensors")
        cls.lora_b = os.path.join(cls.dir, "lora_b_peft.safetensors")

    def setUp(self):
        self.pipe.unload_lora_weights()
        self.pipe.set_progress_bar_config(disable=True)

    def call(self, prompt_key="prompt0", **kw):
        m = self.meta
        args = dict(height=int(m["height"]), width=int(m["width"]), num_inference_steps=int(m["steps"]),
                    guidance_scale=0.0 if m["guidance"] == "none" else float(m["guidance"]),
                    max_sequence_length=int(m["max_sequence_length"]), latents=self.g["latents_in"])
        args.update(kw)
        return self.pipe(m[prompt_key], **args)

    def test_text_embeddings_latents_and_image(self):
        embeds, pooled, text_ids = self.pipe.encode_prompt(self.meta["prompt0"], int(self.meta["max_sequence_length"]))
        self.assertLessEqual(rel_error(embeds, self.g["prompt_embeds"]), REL_TOL)
        self.assertLessEqual(rel_error(pooled, self.g["pooled_prompt_embeds"]), REL_TOL)
        np.testing.assert_array_equal(text_ids, self.g["text_ids"])

        steps = []
        out = self.call(on_step=lambda i, n, s: steps.append((i, n)))
        self.assertEqual(steps, [(i, int(self.meta["steps"])) for i in range(int(self.meta["steps"]))])
        self.assertLessEqual(rel_error(out.latents, self.g["latents_out"]), REL_TOL)
        self.assertEqual(len(out.images), 1)
        self.assertEqual(out.images[0].shape, (32, 32, 3))
        self.assertLessEqual(level_difference(out.images[0], self.g["image"]), LEVEL_TOL)
        self.assertEqual(out.info["steps"], int(self.meta["steps"]))
        self.assertIs(out[0], out.images)
        self.assertIs(self.call(return_dict=False)[0][0].dtype, np.dtype(np.uint8))

    def test_vram_budget_is_planned(self):
        with self.assertRaisesRegex(fluxswap.Error, "budget"):
            fluxswap.FluxPipeline.from_pretrained(os.path.join(self.dir, "pipeline"), device=DEVICE, vram=1000)
        pipe = fluxswap.FluxPipeline.from_pretrained(os.path.join(self.dir, "pipeline"), device=DEVICE, vram="3GB")  # the planner reserves 2.1 GB
        self.assertEqual(pipe.vram, 3 * 10**9)

    def test_fp8_is_close_and_turning_it_off_is_exact(self):
        base = self.call().latents
        self.pipe.enable_fp8(linears=True, attention=True)
        try:
            self.assertTrue(self.pipe.fp8 and self.pipe.fp8_attention)
            fp8 = self.call().latents
        finally:
            self.pipe.enable_fp8(linears=False, attention=False)
        self.assertFalse(self.pipe.fp8 or self.pipe.fp8_attention)
        # e4m3 keeps 3 mantissa bits: a few percent per value, measured 0.02-0.05 on the tiny pipelines.
        self.assertGreater(rel_error(fp8, base), 0.0)
        self.assertLessEqual(rel_error(fp8, base), 0.15)
        np.testing.assert_array_equal(self.call().latents, base)

    def test_lora_golden_unfused_and_fused(self):
        self.pipe.load_lora_weights(self.lora_a)  # adapter name: the file stem
        self.assertEqual(self.pipe.get_active_adapters(), ["lora_a_peft"])
        self.assertEqual(self.pipe.get_list_adapters(), {"transformer": ["lora_a_peft"]})
        self.assertEqual(self.pipe.lora_mode, "runtime")
        unfused = self.call("prompt1")
        self.assertLessEqual(level_difference(unfused.images[0], self.g["image_lora_a_prompt1"]), LEVEL_TOL)

        self.pipe.fuse_lora()
        self.assertEqual(self.pipe.lora_mode, "merged")
        self.assertTrue(self.pipe.lora_fused)
        fused = self.call("prompt1")
        self.assertLessEqual(level_difference(fused.images[0], self.g["image_lora_a_prompt1"]), LEVEL_TOL)
        self.assertLessEqual(rel_error(fused.latents, unfused.latents), REL_TOL)

        self.pipe.unfuse_lora()
        self.assertEqual(self.pipe.lora_mode, "runtime")
        again = self.call("prompt1")
        np.testing.assert_array_equal(again.latents, unfused.latents)  # same slots, same arithmetic

    def test_set_adapters_weights(self):
        base = self.call("prompt1")
        self.pipe.load_lora_weights(self.lora_a, adapter_name="a")
        full = self.call("prompt1")
        self.assertGreater(np.abs(full.latents - base.latents).max(), 1e-2)  # the LoRA changes the result

        self.pipe.set_adapters(["a"], [0.0])  # weight 0: the base model's output
        self.assertLessEqual(rel_error(self.call("prompt1").latents, base.latents), REL_TOL)
        self.pipe.set_adapters("a", 0.6)
        self.assertEqual(self.pipe.get_adapter_weights(), {"a": 0.6})
        partial = self.call("prompt1")
        self.assertGreater(np.abs(partial.latents - full.latents).max(), 1e-3)
        self.pipe.set_adapters("a")  # back to 1.0: exactly the first result
        np.testing.assert_array_equal(self.call("prompt1").latents, full.latents)

        # Weight 0.6 unfused == scale 0.6 fused (merged weights vs runtime slots, two independent paths).
        self.pipe.fuse_lora(lora_scale=0.6)
        self.assertLessEqual(rel_error(self.call("prompt1").latents, partial.latents), REL_TOL)
        self.pipe.unfuse_lora()

        # Two adapters with weights (0.7, -0.5): runtime slots and merged weights agree.
        self.pipe.load_lora_weights(self.lora_b, adapter_name="b")
        self.assertEqual(self.pipe.get_active_adapters(), ["a", "b"])
        self.pipe.set_adapters(["a", "b"], adapter_weights=[0.7, -0.5])
        both_unfused = self.call("prompt1")
        self.pipe.fuse_lora()
        both_fused = self.call("prompt1")
        self.assertLessEqual(rel_error(both_fused.latents, both_unfused.latents), REL_TOL)
        self.assertLessEqual(level_difference(both_fused.images[0], both_unfused.images[0][None] / 255.0), LEVEL_TOL)
        self.pipe.unfuse_lora()

        # Hot-swap a -> b: b alone, loaded under the name "a" (replacing its weights in place).
        self.pipe.delete_adapters("b")
        self.assertEqual(self.pipe.get_list_adapters(), {"transformer": ["a"]})
        self.pipe.set_adapters("a", 1.0)
        self.pipe.load_lora_weights(self.lora_b, adapter_name="a", hotswap=True)
        swapped = self.call("prompt1")
        self.pipe.unload_lora_weights()
        self.pipe.load_lora_weights(self.lora_b, adapter_name="b")
        np.testing.assert_array_equal(self.call("prompt1").latents, swapped.latents)

    def test_unload_gives_the_base_image_bit_exactly(self):
        base = self.call()
        self.pipe.load_lora_weights(self.lora_a)
        self.pipe.load_lora_weights(self.lora_b)
        self.assertFalse(np.array_equal(self.call().latents, base.latents))
        self.pipe.unload_lora_weights()
        self.assertEqual(self.pipe.get_list_adapters(), {})
        self.assertEqual(self.pipe.lora_mode, "none")
        after = self.call()
        np.testing.assert_array_equal(after.latents, base.latents)
        np.testing.assert_array_equal(after.images[0], base.images[0])

        self.pipe.load_lora_weights(self.lora_a)
        self.pipe.fuse_lora(lora_scale=0.8)
        self.pipe.unload_lora_weights()  # from merged weights too
        np.testing.assert_array_equal(self.call().images[0], base.images[0])

        self.pipe.load_lora_weights(self.lora_a)
        self.pipe.disable_lora()
        self.assertEqual(self.pipe.get_active_adapters(), ["lora_a_peft"])
        np.testing.assert_array_equal(self.call().latents, base.latents)
        self.pipe.enable_lora()
        self.assertFalse(np.array_equal(self.call().latents, base.latents))

    def test_clip_lora_changes_the_pooled_embedding_until_unloaded(self):
        with open(os.path.join(self.dir, "pipeline", "text_encoder", "config.json")) as f:
            cfg = json.load(f)
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        rng = np.random.default_rng(3)
        stem = "lora_te1_text_model_encoder_layers_0_mlp_fc2"  # fc2: [hidden, intermediate]
        prompt, length = self.meta["prompt0"], int(self.meta["max_sequence_length"])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "clip_style.safetensors")
            write_safetensors(path, {stem + ".lora_down.weight": rng.normal(0, 0.5, (4, inter)),
                                     stem + ".lora_up.weight": rng.normal(0, 0.1, (hidden, 4))})
            _, base, _ = self.pipe.encode_prompt(prompt, length)
            self.pipe.load_lora_weights(path)
            self.assertEqual(self.pipe.get_list_adapters(), {"text_encoder": ["clip_style"]})
            _, with_lora, _ = self.pipe.encode_prompt(prompt, length)
            self.assertGreater(rel_error(with_lora, base), 1e-3)
            self.pipe.unload_lora_weights()
            np.testing.assert_array_equal(self.pipe.encode_prompt(prompt, length)[1], base)

            wrong = os.path.join(tmp, "wrong.safetensors")  # a down one column too wide for fc2
            write_safetensors(wrong, {stem + ".lora_down.weight": rng.normal(0, 0.5, (4, inter + 1)),
                                      stem + ".lora_up.weight": rng.normal(0, 0.1, (hidden, 4))})
            with self.assertRaisesRegex(fluxswap.Error, stem):
                self.pipe.load_lora_weights(wrong)
            self.assertEqual(self.pipe.get_list_adapters(), {})

    def test_errors(self):
        missing = os.path.join(self.dir, "no_such_lora.safetensors")
        with self.assertRaises(FileNotFoundError) as cm:
            self.pipe.load_lora_weights(missing)
        self.assertIn(missing, str(cm.exception))

        self.pipe.load_lora_weights(self.lora_a, adapter_name="a")
        with tempfile.TemporaryDirectory() as d:
            bad = os.path.join(d, "broken.safetensors")
            with open(bad, "wb") as f:
                f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
            with self.assertRaises(fluxswap.Error) as cm:
                self.pipe.load_lora_weights(bad)
            self.assertIn(bad, str(cm.exception))
        # A LoRA made for another model (the 'small' fixture): an engine error naming the file; nothing changes.
        other = os.path.join(FIXTURES, "small", "lora_a_peft.safetensors")
        with self.assertRaises(fluxswap.Error) as cm:
            self.pipe.load_lora_weights(other, adapter_name="other")
        self.assertIn(other, str(cm.exception))
        self.assertEqual(self.pipe.get_list_adapters(), {"transformer": ["a"]})
        self.assertEqual(self.pipe.get_active_adapters(), ["a"])

        with self.assertRaisesRegex(ValueError, "already in use"):
            self.pipe.load_lora_weights(self.lora_b, adapter_name="a", hotswap=False)
        with self.assertRaisesRegex(ValueError, "no adapter named 'nope'; loaded: 'a'"):
            self.pipe.set_adapters(["nope"])
        with self.assertRaisesRegex(ValueError, "1 adapter names but 2 weights"):
            self.pipe.set_adapters(["a"], [1.0, 2.0])
        with self.assertRaisesRegex(fluxswap.Error, "expected"):
            self.call(latents=self.g["latents_in"][:, :3])  # wrong token count
        with self.assertRaisesRegex(fluxswap.Error, "multiples of 16"):
            self.call(width=40)
        with self.assertRaisesRegex(ValueError, "output_type"):
            self.call(output_type="pt")

    def test_seeds_batches_and_outputs(self):
        a = self.call(latents=None, generator=7)
        b = self.call(latents=None, seed=7)
        c = self.call(latents=None, generator=8)
        np.testing.assert_array_equal(a.images[0], b.images[0])
        self.assertFalse(np.array_equal(a.latents, c.latents))
        self.assertEqual(a.info["seed"], 7)

        two = self.call(prompt_key="prompt0", latents=None, num_images_per_prompt=2)
        self.assertEqual(len(two.images), 2)
        self.assertEqual(two.latents.shape[0], 2)

        lat = self.call(output_type="latent")
        np.testing.assert_array_equal(lat.images, lat.latents)
        try:
            import PIL  # noqa: F401
        except ImportError:
            with self.assertRaisesRegex(ImportError, "Pillow"):
                self.call(output_type="pil")
        else:
            img = self.call(output_type="pil").images[0]
            self.assertEqual(img.size, (32, 32))

    def test_progress_bar_uses_tqdm_when_present(self):
        bars = []

        class FakeBar:
            def __init__(self, total=None, **kw):
                self.total, self.kw, self.n, self.closed = total, kw, 0, False
                bars.append(self)

            def update(self, n):
                self.n += n

            def close(self):
                self.closed = True

        fake_auto = types.ModuleType("tqdm.auto")
        fake_auto.tqdm = FakeBar
        fake = types.ModuleType("tqdm")
        fake.auto = fake_auto
        saved = {k: sys.modules.get(k) for k in ("tqdm", "tqdm.auto")}
        sys.modules.update({"tqdm": fake, "tqdm.auto": fake_auto})
        try:
            self.pipe.set_progress_bar_config(leave=False)
            self.call()
            steps = int(self.meta["steps"])
            self.assertEqual([(b.total, b.n, b.closed, b.kw) for b in bars], [(steps, steps, True, {"leave": False})])
            self.pipe.set_progress_bar_config(disable=True)
            self.call()
            self.assertEqual(len(bars), 1)
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v

    def test_step_callback_exceptions_propagate(self):
        def boom(i, n, s):
            raise KeyError("stop here")

        with self.assertRaisesRegex(KeyError, "stop here"):
            self.call(on_step=boom)
        # The engine is usable afterwards.
        self.assertLessEqual(level_difference(self.call().images[0], self.g["image"]), LEVEL_TOL)


class TinyDev(_GoldenBase, unittest.TestCase):
    fixture = "tiny"

    def test_generation_releases_the_gil(self):
        # A thread that needs the GIL every millisecond keeps ticking while the engine works (~0.25 s here, ~120
        # ticks); were the GIL held, it could only run inside the 3 step callbacks.
        ticks, stop = [0], threading.Event()

        def tick():
            while not stop.is_set():
                time.sleep(0.001)
                ticks[0] += 1

        t = threading.Thread(target=tick)
        t.start()
        try:
            time.sleep(0.01)
            before = ticks[0]
            self.pipe("a cat", height=96, width=96, num_inference_steps=3, max_sequence_length=32)
            during = ticks[0] - before
        finally:
            stop.set()
            t.join()
        self.assertGreaterEqual(during, 20)


class TinySchnell(_GoldenBase, unittest.TestCase):
    fixture = "tiny_schnell"


if __name__ == "__main__":
    unittest.main()
