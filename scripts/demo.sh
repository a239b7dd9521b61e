#!/usr/bin/env bash
# The demo on a fresh machine: set up, fetch the default data (Shakespeare), train a tokenizer,
# tokenize, train a small LLaMA on CPU for a few minutes, evaluate on the held-out plays, print a
# sample and export a Hugging Face checkpoint. Re-running starts a fresh run (the old one is replaced).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== build (release)"
swift build -c release --product relora 2>&1 | tail -n 1
R=.build/release/relora
DATA=data/shakespeare
RUN=runs/shakespeare-demo
echo "== data"
python3 scripts/fetch_shakespeare.py --out "$DATA"
if [ ! -f "$DATA/tokenizer.json" ]; then
    echo "== tokenizer (byte-level BPE, 4096 tokens)"
    $R tokenizer train --vocab-size 4096 --in "$DATA/train.txt" --out "$DATA/tokenizer.json"
fi
echo "== tokenize"
$R tokenize --tokenizer "$DATA/tokenizer.json" --in "$DATA/train.txt" --out "$DATA/train.npy"
$R tokenize --tokenizer "$DATA/tokenizer.json" --in "$DATA/val.txt" --out "$DATA/val.npy"
echo "== train ($RUN)"
rm -rf "$RUN"
$R train Configs/recipes/shakespeare_demo.json
echo "== export (Hugging Face)"
$R export "$RUN" --format hf --out "$RUN/hf"
echo "== evaluate on the held-out plays (Macbeth, Twelfth Night, Richard II)"
$R eval --model "$RUN/hf" --data "$DATA/val.npy" --seq-len 128
echo "== sample"
$R sample --model "$RUN/hf" --prompt "ROMEO." --max-tokens 120 --temperature 0.8 --top-k 40 --seed 1
echo "== done: Hugging Face model in $RUN/hf, metrics in $RUN/metrics.jsonl"
