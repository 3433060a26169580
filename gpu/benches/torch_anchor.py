"""PyTorch (CUDA, fp32, TF32 off) on the models of benches/gpu.rs, for BENCHMARKS.md.

Same architectures as falaj_common::onnx::zoo (mlp [256, 1024, 1024, 10] and cnn), random
weights, eval mode. Inference is timed host to host (input copied to the GPU, output
copied back), as the wgpu figures are; the GPU-only time is printed beside it. GEMM is
timed with CUDA events. Prints Markdown tables.
"""

import statistics
import time

import torch
from torch import nn

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
DEVICE = "cuda"


def conv_bn(c_in, c_out, groups=1, relu=True):
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class Cnn(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 32), conv_bn(32, 32), nn.MaxPool2d(2), conv_bn(32, 64))
        self.block = nn.Sequential(conv_bn(64, 64, groups=64), conv_bn(64, 64, relu=False))
        self.tail = nn.Sequential(nn.MaxPool2d(2), conv_bn(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(128, classes), nn.Softmax(dim=1))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.tail(x)


def mlp():
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 10), nn.Softmax(dim=1))


def median_seconds(f, budget=2.0):
    f()
    torch.cuda.synchronize()
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 200):
        t = time.perf_counter()
        f()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gemm():
    print("\n| GEMM fp32 (n × n × n), PyTorch | ms | TFLOP/s |")
    print("|---|---|---|")
    for n in (4096, 8192):
        a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / 10
        print(f"| {n} | {ms:.3f} | {2 * n ** 3 / ms / 1e9:.2f} |")


def models():
    print("\n| model, PyTorch | batch | host-to-host ms | rows/s | GPU-only ms |")
    print("|---|---|---|---|---|")
    for name, model, row in (("MLP 256-1024-1024-10", mlp(), (256,)), ("CNN 3x32x32", Cnn(), (3, 32, 32))):
        model = model.to(DEVICE).eval()
        for batch in (1, 64, 1024):
            x = torch.randn(batch, *row)
            x_dev = x.to(DEVICE)
            with torch.inference_mode():
                host = median_seconds(lambda: model(x.to(DEVICE)).cpu())
                dev = median_seconds(lambda: model(x_dev))
            print(f"| {name} | {batch} | {host * 1e3:.3f} | {batch / host:.0f} | {dev * 1e3:.3f} |")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    gemm()
    models()
