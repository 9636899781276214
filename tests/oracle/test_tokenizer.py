"""kvdrift's tokenizer and chat template against transformers' on SmolLM2-135M-Instruct: the ids of
every prompt (and reference answer) of the five shared data sets, the round trip back to text, and the
chat-template rendering of apply_chat_template(..., add_generation_prompt=True)."""
import json
import os
import unittest

from transformers import AutoTokenizer

from tests.oracle import support


def dataset_texts():
    """(name, text) of every prompt and reference answer/solution in ../shared/data."""
    texts = []
    for name, path, fields in [
        ("gsm8k", "gsm8k/test.jsonl", ["question", "answer"]),
        ("math500", "math500/test.jsonl", ["problem", "solution"]),
        ("aime24", "aime24/test.jsonl", ["problem", "solution"]),
        ("aime24-mas", "aime24/test_mas-tts.jsonl", ["problem", "solution"]),
        ("humaneval", "humaneval/HumanEval.jsonl.gz", ["prompt", "canonical_solution", "test"]),
    ]:
        for index, record in enumerate(support.read_jsonl(os.path.join(support.DATA_DIR, path))):
            texts += [(f"{name}:{index}:{field}", str(record[field])) for field in fields if field in record]
    for story_file in ["TinyStories-valid_excerpt_ahmedessaa.txt", "tinystories_sample_cs336.txt"]:
        with open(os.path.join(support.DATA_DIR, "tinystories", story_file), encoding="utf-8") as f:
            whole = f.read()
        texts.append((f"{story_file}:whole", whole))
        texts += [(f"{story_file}:{i}", line) for i, line in enumerate(whole.split("\n")) if line.strip()]
    return texts


class TokenizerAgreesWithTransformers(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model_dir = support.smollm2_dir()
        cls.hf = AutoTokenizer.from_pretrained(cls.model_dir)

    def kvdrift_encode(self, texts, chat=False):
        lines = "".join(json.dumps({"text": text}) + "\n" for text in texts)
        out = support.run_cli(["tokenize", "--tokenizer", self.model_dir] + (["--chat"] if chat else []), lines)
        return [json.loads(line) for line in out.splitlines()]

    def test_every_prompt_of_the_shared_data_sets_encodes_to_transformers_ids_and_round_trips(self):
        texts = dataset_texts()
        self.assertGreater(len(texts), 4000)  # gsm8k alone has 1319 questions and answers
        ours = self.kvdrift_encode([text for _, text in texts])
        self.assertEqual(len(ours), len(texts))
        mismatches = []
        for (name, text), got in zip(texts, ours):
            expected = self.hf(text)["input_ids"]
            if got["ids"] != expected:
                mismatches.append(name)
            # Byte-level BPE is lossless; decoding leaves out end tokens (a TinyStories file has
            # literal <|endoftext|> separators), as kvdrift's decoded continuations do.
            self.assertEqual(got["decoded"], text.replace("<|endoftext|>", "").replace("<|im_end|>", ""), name)
        self.assertEqual(mismatches, [], f"{len(mismatches)} of {len(texts)} texts encode differently")

    def test_special_and_awkward_text_agrees(self):
        texts = ["<|im_start|>user\nhi<|im_end|>\n", "12345 + 678 = 13023", "  leading and trailing  ",
                 "tabs\tand\r\nnewlines\n\n\n", "naïve café — “quotes” 日本語 🙂", "<|endoftext|>x<|im_end|>", ""]
        for text, got in zip(texts, self.kvdrift_encode(texts)):
            self.assertEqual(got["ids"], self.hf(text)["input_ids"], repr(text))

    def test_long_words_and_whitespace_runs_agree(self):
        # One pre-tokenized piece of 100 KB: the merges of a long word run through a priority queue
        # (kvdrift's was quadratic: 200 KB took 28 s), and ties between equal pairs resolve leftmost.
        texts = ["supercalifragilistic" * 5000, "ab" * 50_000 + "a", "x" * 100_001, " " * 100_000 + "end",
                 "日本語" * 10_000, "1234567890" * 10_000]
        for text, got in zip(texts, self.kvdrift_encode(texts)):
            self.assertEqual(got["ids"], self.hf(text)["input_ids"], repr(text[:30]))

    def test_chat_template_renders_and_encodes_as_apply_chat_template(self):
        questions = support.gsm8k_questions(5) + support.humaneval_prompts(5)
        for question, got in zip(questions, self.kvdrift_encode(questions, chat=True)):
            messages = [{"role": "user", "content": question}]
            rendered = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            self.assertEqual(got["text"], rendered)
            self.assertEqual(got["ids"], self.hf(rendered, add_special_tokens=False)["input_ids"])
            self.assertTrue(got["text"].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"))


if __name__ == "__main__":
    unittest.main()
