#!/usr/bin/env python
"""How to spend the cores on imbalanced-MNIST runs: one process with every thread, or one
one-thread process per core side by side (what ``bench/mnist_reproduction.py --shard K/N`` does).

    .venv/bin/python bench/mnist_thread_layout.py [--steps 40]

Times ``--steps`` SGD steps (batch 128, channels-last, after 5 warm-up steps) of Li et al.'s MNIST
CNN with a 10-class linear head and prints images/s of each layout; run it on an idle machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def worker(threads: int, steps: int) -> None:
    import torch

    from facepipe.models.mnist_cnn import MnistCNN

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = MnistCNN().to(memory_format=torch.channels_last)
    head = torch.nn.Linear(model.embedding_size, 10)
    optimiser = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    images = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (128,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(head(model(images)), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    for _ in range(5):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    print(steps * 128 / (time.perf_counter() - started))


def measure(processes: int, threads: int, steps: int) -> float:
    command = [sys.executable, __file__, "--worker", str(threads), "--steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) for _ in range(processes)]
    return sum(float(p.communicate()[0].strip()) for p in running)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.steps)
        return
    cores = os.cpu_count() or 1
    print("| layout | images/s in all |\n| --- | --- |")
    for processes, threads in ((1, cores), (cores, 1)):
        print(f"| {processes} process(es) x {threads} thread(s) | {measure(processes, threads, args.steps):.0f} |")


if __name__ == "__main__":
    main()
