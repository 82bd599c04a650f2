#!/usr/bin/env bash
# Builds the wheel in a clean virtual environment (pip wheel ., PEP 517 via
# maturin), installs it, and checks that its `tome-compile` command and its
# Python API give the cargo-built command's bytes. Run from the repository
# root after `cargo test --workspace` (it reuses target/, dev profile).
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
"$py" -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
# A dev-profile wheel reuses the test build; `pip wheel .` alone builds --release.
MATURIN_PEP517_ARGS="--profile dev" "$py" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$tmp/dist" .
wheel=$(ls "$tmp"/dist/tome_compile-*.whl)
case "$wheel" in *abi3*) ;; *) echo "not an abi3 wheel: $wheel"; exit 1;; esac
"$py" -m pip install --quiet --disable-pip-version-check "$wheel"
# The command the Rust tests built (same features: no second build of tract).
cargo test --workspace --no-run --quiet 2> /dev/null
target/debug/tome-compile fixtures/timm_vit/model.onnx --r 8 -o "$tmp/cli.onnx" > /dev/null
"$tmp/venv/bin/tome-compile" fixtures/timm_vit/model.onnx --r 8 -o "$tmp/wheel_cli.onnx" > /dev/null
cmp "$tmp/cli.onnx" "$tmp/wheel_cli.onnx"
set +e
"$tmp/venv/bin/tome-compile" fixtures/timm_vit/model.onnx --r x -o "$tmp/bad.onnx" 2> /dev/null
code=$?
set -e
[ "$code" = 1 ] || { echo "wheel CLI: --r x exits $code, expected 1"; exit 1; }
"$py" -m tome_compile --version
"$py" tests/python/test_api.py "$tmp/cli.onnx" "$tmp"
echo "wheel: $(basename "$wheel") ok"
