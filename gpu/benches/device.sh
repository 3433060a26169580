#!/usr/bin/env bash
# One device call (see DEVELOPERS.md and the device tool's README): the Vulkan loader from
# .gl, then the GPU engine's benchmark, its conformance and parity tests on the card, the
# head fine-tuning kernel's test and benchmark, and PyTorch on the same models, all on the
# same machine. The binaries are built here by
# `gpu/benches/prepare.sh` and carried in .devbin.
set -uo pipefail
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
export VK_DRIVER_FILES="${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}"
export FALAJ_PYTHON=python3 FALAJ_REQUIRE_GPU=1
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
lscpu | grep -E "Model name|^CPU\(s\)"
for b in .devbin/*.xz; do xz -d -k -f "$b"; chmod +x "${b%.xz}"; done
echo "== wgpu benchmark"
.devbin/gpu-bench 2>&1 | tee "$OUT/wgpu.md"
echo "== ONNX node tests and parity on this GPU"
.devbin/gpu-tests conformance --nocapture > "$OUT/conformance.txt" 2>&1
grep -E "passed on|refused as listed|problems|WRONG|not listed|test result" "$OUT/conformance.txt" | cut -c1-300
.devbin/gpu-tests parity 2>&1 | tail -3 | tee "$OUT/parity.txt"
echo "== fine-tuning a head: the GPU kernel against the CPU one, then throughput"
.devbin/gpu-tests finetune --nocapture 2>&1 | grep -E "difference|test result|panicked" | tee "$OUT/finetune.txt"
.devbin/finetune-bench 2>&1 | tee "$OUT/finetune.md"
echo "== the agent serving a bundle hinted gpu"
bash gpu/benches/serve_check.sh 2>&1 | tee "$OUT/serve.txt"
echo "== PyTorch"
PYTHONUNBUFFERED=1 python3 gpu/benches/torch_anchor.py 2>&1 | tee "$OUT/torch.md"
