#!/usr/bin/env bash
# Error ordering of the quantizers on real keys/values: the prefill of a TinyStories story through
# stories260K (head_dim 8), cut to a multiple of 32 tokens, every layer's keys and values through each
# method at 2 bits in complete tiles. Prints relative MSE (sum E_T / sum |x|^2) per method and role.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-build}"
kvdrift="$root/$build/kvdrift"
model_dir="$(bash "$root/scripts/find-model.sh")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
story="$(.venv/bin/python -c "
import sys
text = open('$root/../shared/data/tinystories/tinystories_sample_cs336.txt').read()
print(text.split('<|endoftext|>')[0].strip())")"
"$kvdrift" --log-level warn dump-kv --model "$model_dir/stories260K.bin" --tokenizer "$model_dir/tok512.bin" \
  --prompt "$story" --output "$work/kv.h5"
.venv/bin/python - "$work/kv.h5" "$work/cut.h5" <<'PY'
import sys, h5py
src, dst = h5py.File(sys.argv[1], "r"), h5py.File(sys.argv[2], "w")
n = src["tokens"].shape[0] // 32 * 32
for layer in src:
    if layer.startswith("layer"):
        for role in ("keys", "values"):
            dst[f"{layer}/{role}"] = src[f"{layer}/{role}"][:, :n, :]
print(f"{src['tokens'].shape[0]} prompt tokens, {n} used", file=sys.stderr)
PY
declare -A settings=(
  [rtn-2bit]="rtn --set k_bits=2 --set v_bits=2"
  [kivi-2bit]="kivi --set group_size=8 --set residual_length=32"
  [quarot-2bit]="quarot --set k_bits=2 --set v_bits=2"
  [kvarn-k2v2]="kvarn --set preset=k2v2 --set tile_size=32"
  [kvarn-k2v2-noVarN]="kvarn --set preset=k2v2 --set tile_size=32 --set iters=0"
  [kvarn-k2v2-norot]="kvarn --set preset=k2v2 --set tile_size=32 --set rotate=false"
)
printf "%-20s %12s %12s %10s\n" method "key relMSE" "value relMSE" "bits/elem"
for name in rtn-2bit kivi-2bit quarot-2bit kvarn-k2v2-noVarN kvarn-k2v2-norot kvarn-k2v2; do
  read -r method rest <<<"${settings[$name]}"
  for role in key value; do
    for layer in 0 1 2 3 4; do
      # shellcheck disable=SC2086
      "$kvdrift" --log-level warn quantize --input "$work/cut.h5" --dataset "layer$layer/${role}s" --role "$role" \
        --method "$method" $rest --output "$work/$name-$role-$layer.h5"
    done
  done
  .venv/bin/python - "$work" "$name" <<'PY'
import sys, h5py
work, name = sys.argv[1], sys.argv[2]
out = {}
bits = []
for role in ("key", "value"):
    err = sig = 0.0
    for layer in range(5):
        f = h5py.File(f"{work}/{name}-{role}-{layer}.h5", "r")
        x = h5py.File(f"{work}/cut.h5", "r")[f"layer{layer}/{role}s"][...]
        err += f["rows/E_T"][...].sum()
        sig += (x.astype("float64") ** 2).sum()
        bits.append(f.attrs["bits_per_element"])
    out[role] = err / sig
print(f"{name:<20} {out['key']:12.4e} {out['value']:12.4e} {sum(bits)/len(bits):10.3f}")
PY
done
