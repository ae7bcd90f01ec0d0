#!/usr/bin/env bash
# Build and run the C model of the W4A8 nibble GEMM's inner loop (scripts/bench_gemm_epilogue.c): what the per-group
# float epilogue costs on this CPU, and which vector instructions share its pipes. One core; needs gcc.
set -euo pipefail
cd "$(dirname "$0")"
out="$(mktemp -d)/bench_gemm_epilogue"
gcc -O3 -march=native -o "$out" bench_gemm_epilogue.c
"$out"
