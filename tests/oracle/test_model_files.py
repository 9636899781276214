"""A model folder's files read as transformers reads them. config.json: for every key kvdrift reads, a small
random-weight folder per layout (transformers 4: top-level rope_theta and rope_scaling; transformers 5:
rope_parameters), on which kvdrift's logits equal transformers' or kvdrift refuses the folder (where
transformers refuses it too, or computes what kvdrift does not implement). Chat templates: the standalone
chat_template.jinja comes before tokenizer_config.json's. tokenizer.json: two added tokens with one id."""
import copy
import json
import os
import shutil
import subprocess
import unittest

import h5py
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests.oracle import support

PROMPT = "Once upon a time, there was a little girl named Lily."  # 53 byte tokens
STEPS = 8
# Largest |kvdrift logit - transformers logit| allowed (float32): measured 3.2e-5 on the project's machine
# (AMD EPYC, 1 thread) on logits up to 12.5 in magnitude.
LOGIT_TOLERANCE = 5e-4
# Every variant that is read must change transformers' logits by more than this against the plain model
# of its family (unless it is meant to be equivalent), so that a key kvdrift misread would show.
MATTERS = 1e-2

FAMILY = {
    "llama": {"model_type": "llama", "num_key_value_heads": 2},
    "mistral": {"model_type": "mistral", "num_key_value_heads": 2},
    "qwen2": {"model_type": "qwen2", "num_key_value_heads": 2},
    "qwen3": {"model_type": "qwen3", "num_key_value_heads": 2, "head_dim": 8},
}
SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "vocab_size": 256, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
# The two layouts of RoPE's base frequency (100000, SmolLM2's).
LAYOUTS = {
    "t4": {"rope_theta": 100000.0},
    "t5": {"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}},
}
OMIT = object()  # a key left out of config.json: the config class's default applies
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# (name, family, layout or None (no RoPE keys), keys set (or OMIT), None or a fragment of kvdrift's refusal,
# whether the logits equal the family's plain model's (the variant spells a default out)).
VARIANTS = [
    ("plain", "llama", None, {}, None, True),
    ("rope_theta", "llama", "t4", {}, None, False),
    ("rope_parameters", "llama", "t5", {}, None, False),
    ("theta-default-spelled-out", "llama", None, {"rope_theta": 10000.0}, None, True),
    ("theta-beside-parameters-without-it", "llama", None,
     {"rope_theta": 100000.0, "rope_parameters": {"rope_type": "default"}}, None, False),
    ("parameters-without-type", "llama", None, {"rope_parameters": {"rope_theta": 100000.0}}, None, False),
    ("parameters-theta-wins", "llama", None,
     {"rope_theta": 7.0, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}, None, False),
    ("linear-old-type-key", "llama", "t4", {"rope_scaling": {"type": "linear", "factor": 2.0}}, None, False),
    ("linear", "llama", "t5",
     {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0}}, None, False),
    ("scaling-beside-parameters", "llama", "t5", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, None, False),
    ("empty-scaling-beside-parameters", "llama", "t5", {"rope_scaling": {}}, None, False),
    ("llama3", "llama", "t4", {"rope_scaling": {"rope_type": "llama3", **LLAMA3}}, None, False),
    ("llama3", "llama", "t5",
     {"rope_parameters": {"rope_type": "llama3", "rope_theta": 100000.0, **LLAMA3}}, None, False),
    ("llama3-original-context-defaults", "llama", "t4",
     {"max_position_embeddings": 64,
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
     None, False),
    ("llama3-without-low-freq", "llama", "t4", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "rope_scaling: missing required key 'low_freq_factor'", False),
    ("linear-without-factor", "llama", "t5", {"rope_parameters": {"rope_type": "linear"}},
     "rope_parameters: missing required key 'factor'", False),
    ("dynamic", "llama", "t5", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
     "unsupported rope_type 'dynamic'", False),
    ("partial-rotary", "llama", "t5",
     {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor = 0.5 is not supported", False),
    ("kv-heads-null", "llama", "t4", {"num_key_value_heads": None}, None, False),
    ("head-dim", "llama", "t5", {"head_dim": 16}, None, False),
    ("rms-norm-eps", "llama", "t4", {"rms_norm_eps": 0.3}, None, False),
    ("tied-embeddings", "llama", "t5", {"tie_word_embeddings": True}, None, False),
    ("swish", "llama", None, {"hidden_act": "swish"}, None, True),
    ("gelu", "llama", "t5", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported", False),
    ("mlp-bias", "llama", "t4", {"mlp_bias": True}, "mlp_bias = true is not supported", False),
    ("attention-bias", "llama", "t5", {"attention_bias": True}, "attention_bias = true is not supported", False),
    ("context-shorter-than-the-prompt", "llama", "t4", {"max_position_embeddings": 32},
     "exceed the model's context of 32 positions", False),
    ("plain", "mistral", None, {}, None, True),
    ("rope_theta", "mistral", "t4", {}, None, False),
    ("rope_parameters", "mistral", "t5", {}, None, False),
    ("window-smaller-than-the-prompt", "mistral", "t5", {"sliding_window": 16}, "context of 16 positions", False),
    ("attention-bias-ignored", "mistral", "t4", {"attention_bias": True}, None, False),
    ("plain", "qwen2", None, {}, None, True),
    ("rope_theta", "qwen2", "t4", {}, None, False),
    ("rope_parameters", "qwen2", "t5", {}, None, False),
    ("attention-bias-false-ignored", "qwen2", "t5", {"attention_bias": False}, None, False),
    ("window-unused", "qwen2", "t4", {"sliding_window": 16}, None, False),
    ("plain", "qwen3", None, {}, None, True),
    ("rope_theta", "qwen3", "t4", {}, None, False),
    ("rope_parameters", "qwen3", "t5", {}, None, False),
    ("head-dim-default", "qwen3", "t5", {"head_dim": OMIT}, None, False),
]


def byte_level_tokenizer():
    """A byte-level BPE tokenizer.json whose 256 ids are the bytes (GPT-2's byte-to-character table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = dict(zip(printable, map(chr, printable)))
    for byte in range(256):
        characters.setdefault(byte, chr(256 + sum(1 for b in range(byte) if b not in printable)))
    tokenizer = Tokenizer(models.BPE(vocab={characters[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def raw_config(family, layout, keys):
    config = {**SHAPE, **FAMILY[family], **copy.deepcopy(LAYOUTS.get(layout, {}))}
    for key, value in keys.items():
        if value is OMIT:
            config.pop(key)
        else:
            config[key] = copy.deepcopy(value)
    return config


class ModelFilesAsTransformersReadsThem(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(int(os.environ.get("KVDRIFT_THREADS", "0")) or os.cpu_count())
        cls.work = support.temp_dir("oracle-model-files")
        cls.tokenizer_json = os.path.join(cls.work, "tokenizer.json")
        byte_level_tokenizer().save(cls.tokenizer_json)

    def make_folder(self, name, config):
        """A folder holding `config` as config.json, with weights transformers makes for it (seeded, larger than
        its initializer's so that RoPE's frequencies move the logits), or None when transformers refuses it."""
        folder = os.path.join(self.work, name)
        os.makedirs(folder)
        shutil.copy(self.tokenizer_json, folder)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
        try:
            hf_config = AutoConfig.from_pretrained(folder)
        except (KeyError, ValueError, TypeError):
            return folder, False
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf_config)
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "norm" in parameter_name:
                    parameter.normal_(1.0, 0.1)
                else:
                    parameter.normal_(0.0, 0.5)
        model.save_pretrained(folder)
        with open(os.path.join(folder, "config.json"), "w") as f:  # the variant's own text, not transformers'
            json.dump(config, f)
        return folder, True

    def kvdrift_logits(self, folder):
        logits_path = os.path.join(folder, "logits.h5")
        result = subprocess.run([support.CLI, "generate", "--model", folder, "--prompt", PROMPT, "--steps",
                                 str(STEPS), "--json", "--logits", logits_path], capture_output=True, text=True)
        if result.returncode != 0:
            return None, result.stderr
        with h5py.File(logits_path, "r") as f:
            return (json.loads(result.stdout), f["logits"][()]), result.stderr

    @staticmethod
    def transformers_logits(folder, sequence):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            return model(torch.tensor([sequence])).logits[0].numpy()

    def test_every_key_in_both_layouts_gives_transformers_logits_or_is_refused(self):
        plain = {}  # family -> (sequence, transformers' logits) of its plain model
        worst, least_moved, largest_logit = 0.0, float("inf"), 0.0
        for name, family, layout, keys, refusal, equivalent in VARIANTS:
            label = f"{family}-{layout or 'none'}-{name}"
            with self.subTest(label):
                folder, transformers_reads_it = self.make_folder(label, raw_config(family, layout, keys))
                got, stderr = self.kvdrift_logits(folder)
                if refusal is not None:
                    self.assertIsNone(got, f"{label}: kvdrift read a folder it should refuse")
                    lines = [line for line in stderr.splitlines() if line.startswith("kvdrift: error: ")]
                    self.assertEqual(len(lines), 1, stderr)
                    self.assertIn(refusal, lines[0])
                    continue
                self.assertTrue(transformers_reads_it, f"{label}: transformers refuses it, kvdrift should too")
                self.assertIsNotNone(got, f"{label}: {stderr.strip()}")
                generated, ours = got
                sequence = generated["prompt_ids"] + generated["ids"]
                theirs = self.transformers_logits(folder, sequence)
                start = len(generated["prompt_ids"]) - 1
                difference = float(np.abs(ours - theirs[start:start + len(ours)]).max())
                worst = max(worst, difference)
                largest_logit = max(largest_logit, float(np.abs(ours).max()))
                self.assertLess(difference, LOGIT_TOLERANCE, label)
                if name == "plain":
                    plain[family] = (sequence, theirs)
                    continue
                base_sequence, base_logits = plain[family]
                moved = float(np.abs(self.transformers_logits(folder, base_sequence) - base_logits).max())
                if equivalent:
                    self.assertLess(moved, LOGIT_TOLERANCE, label)
                else:
                    self.assertGreater(moved, MATTERS, f"{label}: the variant does not change transformers' logits")
                    least_moved = min(least_moved, moved)
        print(f"{len(VARIANTS)} variants: largest |logit difference| {worst:.2e} (largest |logit| {largest_logit:.1f}); "
              f"the least a variant moved transformers' logits: {least_moved:.2e}")

    def test_chat_template_jinja_comes_before_tokenizer_config(self):
        template = json.load(open(os.path.join(support.smollm2_dir(), "tokenizer_config.json")))["chat_template"]
        edited = template.replace("You are a helpful AI assistant named SmolLM", "You are a terse assistant")
        self.assertNotEqual(edited, template)
        messages = [{"role": "user", "content": "What is 2+3?"}]
        for name, in_config, in_jinja, kvdrift_reads_it in [("known-jinja", edited, template, True),
                                                            ("edited-jinja", template, edited, False)]:
            folder = os.path.join(self.work, "chat-" + name)
            os.makedirs(folder)
            shutil.copy(self.tokenizer_json, folder)
            with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
                json.dump({"chat_template": in_config}, f)
            with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
                f.write(in_jinja)
            rendered = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, add_generation_prompt=True,
                                                                                 tokenize=False)
            self.assertIn("You are a terse" if in_jinja == edited else "named SmolLM", rendered)
            result = subprocess.run([support.CLI, "tokenize", "--tokenizer", folder, "--chat"],
                                    input=json.dumps({"text": "What is 2+3?"}) + "\n", capture_output=True, text=True)
            if kvdrift_reads_it:
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertEqual(json.loads(result.stdout)["text"], rendered)
            else:
                self.assertEqual(result.returncode, 1)
                self.assertIn(f"kvdrift: error: {folder}/chat_template.jinja: unsupported chat template", result.stderr)

    def test_two_added_tokens_with_one_id_are_refused(self):
        tokenizer = json.loads(byte_level_tokenizer().to_str())
        tokenizer["added_tokens"] = [
            {"id": 256, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True} for content in ("<a>", "<bb>")]
        folder = os.path.join(self.work, "duplicate-added-id")
        os.makedirs(folder)
        path = os.path.join(folder, "tokenizer.json")
        with open(path, "w") as f:
            json.dump(tokenizer, f)
        # Hugging Face tokenizers gives the second another id.
        self.assertEqual(Tokenizer.from_file(path).encode("x<a>y<bb>z", add_special_tokens=False).ids,
                         [120, 256, 121, 257, 122])
        result = subprocess.run([support.CLI, "tokenize", "--tokenizer", path], input='{"text": "x<bb>"}\n',
                                capture_output=True, text=True)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.strip(), f'kvdrift: error: {path}: added tokens "<a>" and "<bb>" both have id 256 '
                         "(Hugging Face tokenizers would give the second another id); give each added token its own id")


if __name__ == "__main__":
    unittest.main()
