"""transformers' side of `kvdrift bench transformers`: times eager greedy generate() of the same model
on the same prompt ids with the same thread count, and prints one JSON line
{"seconds": [per repeat], "ids": [generated ids], "torch": ..., "transformers": ...}.

    .venv/bin/python scripts/bench_transformers.py --model DIR --ids 1,2,3 --steps 256 --repeats 3 --threads 2
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--ids", required=True, help="prompt token ids, comma-separated")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager").eval()
    prompt = torch.tensor([[int(i) for i in args.ids.split(",")]])
    settings = dict(max_new_tokens=args.steps, min_new_tokens=args.steps, do_sample=False, eos_token_id=None,
                    pad_token_id=0)
    seconds = []
    with torch.inference_mode():
        model.generate(prompt, **{**settings, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = model.generate(prompt, **settings)
            seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": seconds, "ids": out[0, prompt.shape[1]:].tolist(), "torch": torch.__version__,
                      "transformers": transformers.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    sys.exit(main())
