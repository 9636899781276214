"""kvdrift's forward pass against transformers on SmolLM2-135M-Instruct, float32 on CPU: greedy tokens of
`kvdrift generate` and of `kvdrift run`'s reference lane for 256 new tokens from 5 GSM8K and 5 HumanEval
prompts (chat template applied), and per-step logits within a stated tolerance."""
import json
import os
import unittest

import h5py
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.oracle import support

NEW_TOKENS = 256
STOP_IDS = [0, 2]  # <|endoftext|> and <|im_end|>: what kvdrift stops at (model EOS + tokenizer end tokens)
# Largest |kvdrift logit - transformers logit| allowed at any step and vocabulary entry. Measured on
# the project's machine (AMD EPYC, LibTorch 2.12, float32, 1 and 2 threads): 1.0e-4 over two 256-step
# generations, on logits of magnitude ~30. The bound leaves 20x room for other CPUs' kernels.
LOGIT_TOLERANCE = 2e-3


def until_stop(ids):
    for i, token in enumerate(ids):
        if token in STOP_IDS:
            return ids[:i]
    return ids


class GenerationAgreesWithTransformers(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(int(os.environ.get("KVDRIFT_THREADS", "0")) or os.cpu_count())
        cls.model_dir = support.smollm2_dir()
        cls.tokenizer = AutoTokenizer.from_pretrained(cls.model_dir)
        cls.model = AutoModelForCausalLM.from_pretrained(cls.model_dir, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
        cls.prompts = support.gsm8k_questions(5) + support.humaneval_prompts(5)
        cls.expected = [cls.transformers_greedy(text) for text in cls.prompts]
        cls.work = support.temp_dir("oracle-generation")

    @classmethod
    def chat_ids(cls, text):
        rendered = cls.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=False)
        return cls.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    @classmethod
    def transformers_greedy(cls, text):
        prompt = torch.tensor([cls.chat_ids(text)])
        with torch.no_grad():
            out = cls.model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=STOP_IDS,
                                     pad_token_id=2)
        return until_stop(out[0, prompt.shape[1]:].tolist())

    def test_generate_gives_transformers_greedy_tokens(self):
        for index, (text, expected) in enumerate(zip(self.prompts, self.expected)):
            out = support.run_cli(["generate", "--model", self.model_dir, "--chat", "--prompt", text,
                                   "--steps", str(NEW_TOKENS), "--json"])
            got = json.loads(out)
            self.assertEqual(got["prompt_ids"], self.chat_ids(text), f"prompt {index}")
            self.assertEqual(got["ids"], expected, f"prompt {index}: first difference at "
                             f"{next((i for i, (a, b) in enumerate(zip(got['ids'], expected)) if a != b), 'the end')}")
        # The prompts exercise both ends: some answers stop early, some run to the step limit.
        self.assertTrue(any(len(e) == NEW_TOKENS for e in self.expected))
        self.assertTrue(any(len(e) < NEW_TOKENS for e in self.expected))

    def test_run_reference_lane_gives_transformers_greedy_tokens(self):
        config = os.path.join(self.work, "reference.yaml")
        output = os.path.join(self.work, "reference.h5")
        with open(config, "w") as f:
            json.dump({  # YAML is a superset of JSON
                "model": {"path": self.model_dir},
                "prompts": {"source": "inline", "texts": self.prompts, "chat_template": True},
                "decoding": {"max_new_tokens": NEW_TOKENS, "stop_at_eos": True, "batch_prompts": 5},
                "quantizers": [{"name": "none", "method": "none"}],
                "lanes": ["teacher_forced"],
                "output": {"path": output},
            }, f)
        support.run_cli(["run", config])
        with h5py.File(output, "r") as log:
            for index, expected in enumerate(self.expected):
                sample = log[f"samples/{index}"]
                self.assertEqual(sample["prompt_tokens"][()].tolist(), self.chat_ids(self.prompts[index]))
                reference = sample["reference_tokens"][()].tolist()
                self.assertEqual(until_stop(reference), expected, f"prompt {index}")

    def test_logits_agree_within_tolerance_at_every_step(self):
        worst = 0.0
        for index in (0, 5):  # one GSM8K and one HumanEval prompt
            logits_path = os.path.join(self.work, f"logits-{index}.h5")
            out = support.run_cli(["generate", "--model", self.model_dir, "--chat", "--prompt", self.prompts[index],
                                   "--steps", str(NEW_TOKENS), "--json", "--logits", logits_path])
            got = json.loads(out)
            with h5py.File(logits_path, "r") as f:
                ours = f["logits"][()]
            os.remove(logits_path)
            sequence = got["prompt_ids"] + got["ids"]
            with torch.no_grad():
                theirs = self.model(torch.tensor([sequence])).logits[0].numpy()
            # Step s's logits come from the position of token len(prompt) + s - 1.
            start = len(got["prompt_ids"]) - 1
            theirs = theirs[start:start + len(ours)]
            self.assertEqual(ours.shape, theirs.shape)
            difference = float(np.abs(ours - theirs).max())
            worst = max(worst, difference)
            self.assertLess(difference, LOGIT_TOLERANCE, f"prompt {index}")
        print(f"largest |logit difference| over {NEW_TOKENS}-step generations: {worst:.2e}")


if __name__ == "__main__":
    unittest.main()
