#!/usr/bin/env bash
# Proves relora's GGUF export outside relora: trains a small LLaMA with ReLoRA on the committed Shakespeare
# slices (a 512-token BPE tokenizer, 2 layers of width 64, two restarts; about a minute on 2 cores), exports
# it with --quant f32, q8_0 and q4_0, and checks each file with Tests/Fixtures/check_gguf_export.py:
# transformers' GGUF loader gives the loss `relora eval` prints, its GGUF tokenizer encodes like relora's,
# and, when llama-cpp-python is installed in the venv, llama.cpp loads the file, tokenizes like relora and
# gives the same logits.
#
# The Python side lives in a venv (default .venv-gguf, created if missing with gguf, transformers,
# accelerate, torch, numpy; add llama-cpp-python yourself: pip builds llama.cpp from source, 10+ minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gguf}
WORK=${WORK:-runs/gguf-check}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q gguf transformers accelerate torch numpy
fi
swift build --product relora 2>&1 | tail -n 1
R=.build/debug/relora
F=Tests/Fixtures/shakespeare
rm -rf "$WORK" && mkdir -p "$WORK"
$R tokenizer train --vocab-size 512 --in $F/train_slice.txt --out "$WORK/tokenizer.json" 2>/dev/null
$R tokenize --tokenizer "$WORK/tokenizer.json" --in $F/train_slice.txt --out "$WORK/train.npy" 2>/dev/null
$R tokenize --tokenizer "$WORK/tokenizer.json" --in $F/val_slice.txt --out "$WORK/val.npy" 2>/dev/null
cat > "$WORK/config.json" <<'EOF'
{"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
 "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
 "rope_theta": 10000.0, "tie_word_embeddings": false}
EOF
cat > "$WORK/recipe.json" <<EOF
{"model": "$WORK/config.json", "train_data": "$WORK/train.npy", "val_data": "$WORK/val.npy",
 "tokenizer": "$WORK/tokenizer.json", "run_dir": "$WORK/run", "seq_len": 64, "micro_batch": 8,
 "steps": 150, "lr": 3e-3, "warmup_steps": 10, "eval_every": 50, "eval_tokens": 4096, "checkpoint_every": 150,
 "log_every": 50, "seed": 0, "mode": "relora", "lora_r": 16, "lora_alpha": 32, "relora_every": 50,
 "restart_warmup": 5}
EOF
$R train "$WORK/recipe.json" | tail -n 1
LLAMA=""
"$VENV/bin/python" -c "import llama_cpp" 2>/dev/null && LLAMA="--llama-cpp"
for q in f32 q8_0 q4_0; do
    $R export "$WORK/run" --format gguf --quant $q --out "$WORK/model-$q.gguf" 2>/dev/null
    "$VENV/bin/python" Tests/Fixtures/check_gguf_export.py "$WORK/model-$q.gguf" "$WORK/val.npy" --seq-len 64 \
        --windows 64 --relora $R --tokenizer "$WORK/tokenizer.json" $LLAMA 2>&1 | grep -v -E "it/s\]|Warning|warn\("
done
