"""Converts a GGUF checkpoint into a Hugging Face model directory kvdrift (and transformers) can load.

    .venv/bin/python scripts/convert_gguf.py MODEL.gguf OUTPUT_DIR [--source TEXT]

transformers' GGUF loader dequantizes the weights (and undoes llama.cpp's Q/K row permutation); they
are written as float32 model.safetensors beside config.json, tokenizer.json, tokenizer_config.json
(with the chat template) and kvdrift-provenance.json (what the weights came from). The directory is
built under a temporary name and renamed into place, so an interrupted conversion leaves nothing that
looks complete. OUTPUT_DIR must not exist.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile


def fail(message):
    print(f"convert_gguf.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(gguf_path, work_dir):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never ask the hub
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights written here are plain float32
    config.pop("_name_or_path", None)  # a temporary path of this conversion
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    with open(os.path.join(work_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)

    weights = {key: value.detach().to(torch.float32).contiguous() for key, value in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)  # the classifier is the embedding; safetensors stores it once
    save_file(weights, os.path.join(work_dir, "model.safetensors"), metadata={"format": "pt"})

    tokenizer.save_pretrained(work_dir)
    if not tokenizer.chat_template:
        fail(f"{gguf_path} carries no chat template (tokenizer.chat_template)")
    # transformers 5 keeps the template in chat_template.jinja; kvdrift and older readers look in
    # tokenizer_config.json, so it is written there as well.
    config_path = os.path.join(work_dir, "tokenizer_config.json")
    with open(config_path) as f:
        tokenizer_config = json.load(f)
    tokenizer_config["chat_template"] = tokenizer.chat_template
    with open(config_path, "w") as f:
        json.dump(tokenizer_config, f, indent=2, sort_keys=True)
    return {"transformers": transformers.__version__, "torch": torch.__version__,
            "parameters": sum(v.numel() for v in weights.values())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf")
    parser.add_argument("output")
    parser.add_argument("--source", default="", help="where the GGUF came from (written to the provenance)")
    args = parser.parse_args()
    if not os.path.isfile(args.gguf):
        fail(f"{args.gguf}: no such file")
    output = os.path.abspath(args.output)
    if os.path.lexists(output):
        fail(f"{output} already exists; remove it to convert again")
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix=os.path.basename(output) + ".converting-", dir=parent)
    try:
        try:
            versions = convert(args.gguf, work_dir)
        except SystemExit:
            raise
        except Exception as error:  # transformers/gguf raise many kinds; the user needs one line
            fail(f"converting {args.gguf} failed: {type(error).__name__}: {error}")
        provenance = {
            "source": args.source,
            "gguf_file": os.path.basename(args.gguf),
            "gguf_sha256": sha256_of(args.gguf),
            "weights": "GGUF tensors dequantized to float32 by transformers (not the original checkpoint)",
            **versions,
        }
        with open(os.path.join(work_dir, "kvdrift-provenance.json"), "w") as f:
            json.dump(provenance, f, indent=2, sort_keys=True)
        os.chmod(work_dir, 0o755)  # mkdtemp makes it private; the model is for every user
        for name in os.listdir(work_dir):
            os.chmod(os.path.join(work_dir, name), 0o644)
        os.rename(work_dir, output)
    finally:
        if os.path.isdir(work_dir):
            shutil.rmtree(work_dir)
    print(f"convert_gguf.py: wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
