"""Seed corpora for the fuzz harnesses (scripts/fuzz.sh): OUT/<target>/<name>, from the project's
configs, experiments and models and from small valid files made here.

usage: make_seeds.py OUT STORIES_DIR
"""
import glob
import json
import os
import struct
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


def put(out, target, name, data):
    os.makedirs(os.path.join(out, target), exist_ok=True)
    with open(os.path.join(out, target, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def read(path, limit=None):
    with open(path, "rb") as f:
        return f.read(limit) if limit else f.read()


def llama2c_checkpoint(dim=8, hidden=16, layers=1, heads=2, kv_heads=2, vocab=8, seq=4, tied=True):
    head = dim // heads
    floats = (vocab * dim + layers * dim + layers * dim * dim * 2 + layers * kv_heads * head * dim * 2
              + layers * dim + layers * hidden * dim * 3 + dim + 2 * seq * head // 2 + (0 if tied else vocab * dim))
    header = struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab if tied else -vocab, seq)
    return header + struct.pack(f"<{floats}f", *[(i % 7) * 0.125 for i in range(floats)])


def safetensors(tensors, metadata=None):
    header, blobs, offset = {}, b"", 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs += data
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blobs


def main(out, stories_dir):
    put(out, "llama2c_checkpoint", "tied.bin", llama2c_checkpoint())
    put(out, "llama2c_checkpoint", "untied-gqa.bin", llama2c_checkpoint(heads=4, kv_heads=2, tied=False))
    put(out, "llama2c_checkpoint", "stories260K-header.bin", read(os.path.join(stories_dir, "stories260K.bin"), 28))

    put(out, "safetensors", "two.safetensors", safetensors({
        "a": ("F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4)),
        "b": ("F16", [3], struct.pack("<3e", 1, -2, 0.5)),
        "c": ("BF16", [1, 2], b"\x80\x3f\x00\x40")}, {"format": "pt"}))
    put(out, "safetensors", "empty.safetensors", safetensors({"e": ("F32", [0, 4], b"")}))

    for path in glob.glob(os.path.join(ROOT, "models", "*", "config.json")):
        put(out, "hf_config", os.path.basename(os.path.dirname(path)) + ".json", read(path))
    put(out, "hf_config", "llama.json", json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": [2, 3], "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))

    put(out, "hf_shard_index", "index.json", json.dumps({
        "metadata": {"total_size": 64},
        "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                       "lm_head.weight": "model-00002-of-00002.safetensors"}}))

    put(out, "tokenizer_bin", "tok512.bin", read(os.path.join(stories_dir, "tok512.bin")))
    for path in glob.glob(os.path.join(ROOT, "models", "*", "tokenizer.json")):
        # The real ones are megabytes; their head (settings, added tokens) seeds the structure.
        put(out, "tokenizer_json", os.path.basename(os.path.dirname(path)) + ".json", read(path, 4096))
    vocab = {c: i for i, c in enumerate("abcdefghij \u0120")}
    vocab.update({"ab": 12, "abc": 13, "\u0120a": 14})
    put(out, "tokenizer_json", "small.json", json.dumps({
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "added_tokens": [{"id": 15, "content": "<|endoftext|>", "special": True}],
        "model": {"type": "BPE", "vocab": vocab, "merges": ["a b", "ab c", "\u0120 a"]}}))

    texts = ["Once upon a time, there was a little girl.", "x = 12345 * 678; print(x)\n\n\tdone",
             "\u00e9t\u00e9 \u4e2d\u6587 \U0001f642 <|im_start|>user\nhi<|im_end|>", " \n \r\n   "]
    gsm8k = os.path.join(SHARED_DATA, "gsm8k", "test.jsonl")
    if os.path.exists(gsm8k):
        with open(gsm8k) as f:
            records = [json.loads(next(f)) for _ in range(3)]
        texts += [r["question"] for r in records]
        lines = "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in records)
        put(out, "prompts", "gsm8k-template.jsonl", b"\x02" + lines.encode())
        put(out, "prompts", "gsm8k-field.jsonl", b"\x08" + lines.encode())
    for i, text in enumerate(texts):
        put(out, "tokenizer_encode", f"text{i}.txt", text)
    stories = glob.glob(os.path.join(SHARED_DATA, "tinystories", "*.txt"))
    if stories:
        put(out, "prompts", "stories.txt", b"\x03" + read(stories[0], 3000))
    put(out, "prompts", "lines.txt", b"\x01first prompt\n\n  second prompt  \n")

    for path in glob.glob(os.path.join(ROOT, "configs", "*.yaml")):
        put(out, "run_config", os.path.basename(path), b"\x00" + read(path))
    for path in glob.glob(os.path.join(ROOT, "experiments", "*", "*.yaml")):
        text = read(path)
        put(out, "sweep_file" if b"grid:" in text or b"zip:" in text else "run_config",
            os.path.basename(path), text if b"grid:" in text or b"zip:" in text else b"\x00" + text)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
