"""kvdrift's ggml method against the gguf package's numpy port of ggml's reference quantizers.

For every type gguf can quantize (q8_0, q4_0, q4_1, q5_0, q5_1, mxfp4), `kvdrift quantize --method ggml`
must dequantize SmolLM2-135M's real keys and values, and synthetic tensors with outlier channels, to
exactly gguf.quants.dequantize(gguf.quants.quantize(x)): equal float32 bit patterns, every element.
"""
import os
import unittest

import gguf
import h5py
import numpy as np

from tests.oracle import support

TYPES = {
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
    "q5_0": gguf.GGMLQuantizationType.Q5_0,
    "q5_1": gguf.GGMLQuantizationType.Q5_1,
    "mxfp4": gguf.GGMLQuantizationType.MXFP4,
}
PROMPT = "The key to quantizing a cache is knowing which channels carry the outliers: 3, 14, 159."


def gguf_round_trip(x, qtype):
    return gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).reshape(x.shape)


def synthetic_tensors():
    """[heads, tokens, head_dim] float32: Gaussian rows, outlier channels of both signs and scales from 1e-3
    to 1e2, ties of equal magnitude and opposite sign, all-zero and constant blocks."""
    rng = np.random.default_rng(20261207)
    x = rng.standard_normal((4, 24, 64)).astype(np.float32)
    x[:, :, 5] *= 40.0
    x[:, :, 37] *= -25.0
    x[1] *= 1e-3
    x[2] *= 1e2
    x[3, 0, :32] = 0.0                      # an all-zero block
    x[3, 1, :32] = 1.5                      # a constant block
    x[3, 2, :32] = np.tile([2.0, -2.0], 16)  # equal magnitudes, opposite signs: the first decides
    x[3, 3, 32:] = np.linspace(-4.0, 4.0, 32, dtype=np.float32)
    return {"synthetic": x}


class GgmlFormatsAgreeWithGguf(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = support.temp_dir("ggml-formats")
        model = support.smollm2_dir()
        kv_path = os.path.join(cls.dir, "kv.h5")
        support.run_cli(["dump-kv", "--model", model, "--tokenizer", os.path.join(model, "tokenizer.json"),
                         "--prompt", PROMPT, "--output", kv_path])
        cls.inputs = synthetic_tensors()
        with h5py.File(kv_path, "r") as f:
            for layer in (0, 2, 11, 29):  # keys up to |18.6| (layer 11) on this prompt; values up to |8.2| (29)
                for name in ("keys", "values"):
                    cls.inputs[f"layer{layer}/{name}"] = f[f"layer{layer}/{name}"][...]
        cls.input_path = os.path.join(cls.dir, "inputs.h5")
        with h5py.File(cls.input_path, "w") as f:
            for name, x in cls.inputs.items():
                f[name] = x

    def kvdrift_round_trip(self, dataset, type_name):
        out = os.path.join(self.dir, f"{dataset.replace('/', '-')}-{type_name}.h5")
        role = "value" if dataset.endswith("values") else "key"
        support.run_cli(["quantize", "--input", self.input_path, "--dataset", dataset, "--role", role,
                         "--method", "ggml", "--set", f"type={type_name}", "--output", out])
        with h5py.File(out, "r") as f:
            return f["dequantized"][...], float(f.attrs["quantized_bits_per_element"])

    def test_every_type_equals_gguf_bit_for_bit(self):
        bits = {"q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "mxfp4": 4.25}
        self.assertGreater(np.abs(self.inputs["layer11/keys"]).max(), 15.0)  # real outlier channels are in the test
        for type_name, qtype in TYPES.items():
            for dataset, x in self.inputs.items():
                with self.subTest(type=type_name, dataset=dataset):
                    ours, stored_bits = self.kvdrift_round_trip(dataset, type_name)
                    theirs = gguf_round_trip(x, qtype)
                    self.assertEqual(ours.shape, x.shape)
                    differing = np.flatnonzero(ours.view(np.uint32) != theirs.view(np.uint32))
                    self.assertEqual(differing.size, 0,
                                     f"{differing.size} of {x.size} elements differ; first at flat index "
                                     f"{differing[:1]}: ours {ours.ravel()[differing[:1]]}, gguf "
                                     f"{theirs.ravel()[differing[:1]]}, input {x.ravel()[differing[:1]]}")
                    self.assertAlmostEqual(stored_bits, bits[type_name], places=12)
                    # gguf's own block size in bytes says the same bits per element.
                    block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
                    self.assertAlmostEqual(8.0 * type_bytes / block, bits[type_name], places=12)


if __name__ == "__main__":
    unittest.main()
