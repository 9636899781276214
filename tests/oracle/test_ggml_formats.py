"""kvdrift's ggml method against the gguf package's numpy port of ggml's reference quantizers.

For every type gguf can quantize (q8_0, q4_0, q4_1, q5_0, q5_1, mxfp4), `kvdrift quantize --method ggml`
must dequantize SmolLM2-135M's real keys and values, and synthetic tensors with outlier channels, to
exactly gguf.quants.dequantize(gguf.quants.quantize(x)): equal float32 bit patterns, every element.

gguf 0.19.0 cannot quantize iq4_nl or nvfp4 (NotImplementedError), but it dequantizes them. For those two,
kvdrift's codes and scales, packed into ggml's block layout, must dequantize through gguf to kvdrift's own
values bit for bit, and must equal the codes and scales of numpy ports of quantize_row_iq4_nl_ref /
quantize_row_nvfp4_ref written here from ggml-quants.c (float32, one rounding per operation, sums in the C
loop's order; nvfp4's scale byte through gguf's own NVFP4.fp32_to_ue4m3).
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
IQ4NL_GRID = np.array(gguf.quants.IQ4_NL.kvalues, dtype=np.float32)
E2M1_DOUBLED = np.array(gguf.quants.NVFP4.kvalues, dtype=np.float32)
PROMPT = "The key to quantizing a cache is knowing which channels carry the outliers: 3, 14, 159."


def gguf_round_trip(x, qtype):
    return gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).reshape(x.shape)


def iq4_nl_reference(blocks):
    """quantize_row_iq4_nl_ref (ntry = -1) on [n, 32] float32 blocks: (codes [n, 32], float32 d [n], live [n]),
    live False where the block is under GROUP_MAX_EPS (d = 0, codes left unset by ggml)."""
    f32 = np.float32
    magnitudes = np.abs(blocks)
    signed_max = np.take_along_axis(blocks, magnitudes.argmax(axis=1)[:, None], axis=1)[:, 0]  # first of equals
    live = magnitudes.max(axis=1) >= f32(1e-15)
    inverse = f32(1) / np.where(live, signed_max / f32(-127), f32(1))
    scaled = inverse[:, None] * blocks
    upper = np.clip(np.searchsorted(IQ4NL_GRID, scaled, side="right"), 1, 15)  # best_index_int8's binary search
    lower_closer = (scaled - IQ4NL_GRID[upper - 1]) < (IQ4NL_GRID[upper] - scaled)
    codes = np.where(scaled <= IQ4NL_GRID[0], 0,
                     np.where(scaled >= IQ4NL_GRID[15], 15, np.where(lower_closer, upper - 1, upper)))
    sum_qx = np.zeros(len(blocks), f32)
    sum_q2 = np.zeros(len(blocks), f32)
    for j in range(blocks.shape[1]):  # in the C loop's order
        x, q = blocks[:, j], IQ4NL_GRID[codes[:, j]]
        w = x * x
        sum_qx = sum_qx + (w * q) * x
        sum_q2 = sum_q2 + (w * q) * q
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(live, sum_qx / sum_q2, f32(0))
    return codes.astype(np.uint8), d.astype(np.float32), live


def nvfp4_reference(groups):
    """quantize_row_nvfp4_ref on [n, 16] float32 groups: (codes [n, 16], ue4m3 scale bytes [n])."""
    scale_bytes = gguf.quants.NVFP4.fp32_to_ue4m3(np.abs(groups).max(axis=1) / np.float32(6))
    half_scale = gguf.quants.NVFP4.ue4m3_to_fp32(scale_bytes).astype(np.float32)
    distance = np.abs(half_scale[:, None, None] * E2M1_DOUBLED - groups[:, :, None])
    return distance.argmin(axis=2).astype(np.uint8), scale_bytes  # argmin: the first code on ties


def pack_iq4_nl(codes, d):
    """block_iq4_nl bytes: float16 d, then 16 bytes, element j in the low nibble and j + 16 in the high."""
    codes = codes.reshape(-1, 32)
    d_bytes = d.reshape(-1).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return np.concatenate([d_bytes, codes[:, :16] | (codes[:, 16:] << 4)], axis=1).astype(np.uint8)


def pack_nvfp4(codes, scale_bytes):
    """block_nvfp4 bytes per 64 elements: 4 ue4m3 scales, then per 16-element group 8 bytes, element j low
    and j + 8 high."""
    groups = codes.reshape(-1, 4, 16)
    packed = (groups[:, :, :8] | (groups[:, :, 8:] << 4)).reshape(-1, 32)
    return np.concatenate([scale_bytes.reshape(-1, 4).astype(np.uint8), packed], axis=1).astype(np.uint8)


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
            self.stored = {"codes": f["codes"][...]}
            self.stored.update({name: f["params"][name][...] for name in f["params"]})
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

    def test_iq4_nl_and_nvfp4_equal_the_c_reference_and_dequantize_through_gguf(self):
        for type_name, qtype in (("iq4_nl", gguf.GGMLQuantizationType.IQ4_NL),
                                 ("nvfp4", gguf.GGMLQuantizationType.NVFP4)):
            for dataset, x in self.inputs.items():
                with self.subTest(type=type_name, dataset=dataset):
                    ours, stored_bits = self.kvdrift_round_trip(dataset, type_name)
                    codes = self.stored["codes"].reshape(-1)
                    if type_name == "iq4_nl":
                        d = self.stored["scale"].reshape(-1)
                        ref_codes, ref_d, live = iq4_nl_reference(x.reshape(-1, 32))
                        live_codes = codes.reshape(-1, 32)[live]
                        np.testing.assert_array_equal(live_codes, ref_codes[live])
                        # float16 storage of the float32 d, bit for bit
                        np.testing.assert_array_equal(d.astype(np.float16).view(np.uint16),
                                                      ref_d.astype(np.float16).view(np.uint16))
                        packed = pack_iq4_nl(codes, d)
                        if dataset == "synthetic":  # its all-zero block: d = 0, +0 back (ggml leaves the codes unset)
                            self.assertFalse(np.signbit(ours[3, 0, :32]).any())
                            self.assertEqual(np.abs(ours[3, 0, :32]).max(), 0.0)
                    else:
                        scale_bytes = self.stored["ue4m3_scale"].reshape(-1).astype(np.uint8)
                        ref_codes, ref_scales = nvfp4_reference(x.reshape(-1, 16))
                        np.testing.assert_array_equal(codes.reshape(-1, 16), ref_codes)
                        np.testing.assert_array_equal(scale_bytes, ref_scales)
                        packed = pack_nvfp4(codes, scale_bytes)
                    theirs = gguf.quants.dequantize(packed, qtype).reshape(x.shape)
                    differing = np.flatnonzero(ours.view(np.uint32) != theirs.view(np.uint32))
                    self.assertEqual(differing.size, 0, f"{differing.size} of {x.size} elements differ from gguf's "
                                     f"dequantization of kvdrift's own blocks")
                    block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
                    self.assertAlmostEqual(stored_bits, 8.0 * type_bytes / block, places=12)
                    self.assertAlmostEqual(stored_bits, 4.5, places=12)


if __name__ == "__main__":
    unittest.main()
