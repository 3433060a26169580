#!/usr/bin/env bash
# Builds what gpu/benches/device.sh runs on the lent GPU machine: the benchmarks and the
# GPU engine's test binary (tests/it: conformance, parity, fine-tuning) in release,
# stripped and compressed into .devbin (ignored by git, carried by the device call), and
# the Vulkan loader into .gl. The fine-tuning benchmark and the test binary are taken from
# cargo's listing (their names are not unique in target/).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo bench -p falaj-gpu --bench gpu --no-run
cargo bench -p falaj-gpu --bench finetune --no-run 2>&1 | tee /tmp/finetune-bench.txt
cargo test --release -p falaj-gpu --test it --no-run 2>&1 | tee /tmp/gpu-tests.txt
cargo build --release -p falaj
mkdir -p .devbin
newest() { ls -t target/release/deps/"$1"-* | grep -v '\.d$' | head -1; }
cp target/release/falaj .devbin/falaj && strip .devbin/falaj && xz -6 -f .devbin/falaj
listed() { sed -n "s|.*Executable $1 (\(.*\))|\1|p" "$2"; }
cp "$(listed benches/finetune.rs /tmp/finetune-bench.txt)" .devbin/finetune-bench
cp "$(listed tests/it/main.rs /tmp/gpu-tests.txt)" .devbin/gpu-tests
for pair in gpu:gpu-bench; do
    cp "$(newest "${pair%%:*}")" ".devbin/${pair##*:}"
done
for b in gpu-bench gpu-tests finetune-bench; do
    strip ".devbin/$b"
    xz -6 -f ".devbin/$b"
done
if ! ls .gl/libglvnd0_*.deb > /dev/null 2>&1; then
    mkdir -p .gl /tmp/amd64/partial
    o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
    apt-get $o update
    (cd .gl && apt-get $o download libvulkan1 libglvnd0 libegl1 libopengl0 libgl1 libglx0 libgles2)
fi
ls -la .devbin .gl
