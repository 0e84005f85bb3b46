"""Classification training-step throughput of the small-input stems, as a ratio to the pooled stem.

The four ways a 32x32 image enters a ResNet here: a stride-1 3x3 conv with no pool (the paper's CIFAR
setting: every later layer runs at full resolution), the same conv followed by the max-pool, a stride-2 conv
with no pool, and a stride-2 conv followed by the max-pool (the quickstart's: an 8x8 map reaches the first
block). The middle two hand a 16x16 map to the first block, but the pooled stem still runs its conv, batch norm
and ReLU at 32x32. Rounds interleave the stems, so drift in a shared machine's speed falls on all of them
alike; each figure is the median over rounds.

    python bench/bench_stem.py                       # CPU, the quickstart network
    python bench/bench_stem.py --preset paper-cifar100 --device cuda --batch-size 512
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from advbct.presets import train_config
from bench_step import NUM_CLASSES, interleaved_medians, make_model

STEMS = {
    "stride 1, no pool": {"small_input_stride": 1, "small_input_pool": False},
    "stride 1 + max-pool": {"small_input_stride": 1, "small_input_pool": True},
    "stride 2, no pool": {"small_input_stride": 2, "small_input_pool": False},
    "stride 2 + max-pool": {"small_input_stride": 2, "small_input_pool": True},
}
BASELINE = "stride 1 + max-pool"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per stem before the first round")
    parser.add_argument("--steps", type=int, default=3, help="consecutive steps per timing sample")
    args = parser.parse_args()

    device = torch.device(args.device)
    cfg = train_config("new", args.preset, None, None, None, args.device)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, cfg.data.image_size, cfg.data.image_size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    use_amp = device.type == "cuda"

    def make_step(stem: dict):
        stem_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=stem)})
        model = make_model(stem_cfg, list(range(NUM_CLASSES))).to(device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = F.cross_entropy(model.classify(model(images).float(), labels).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    steps = {name: make_step(stem) for name, stem in STEMS.items()}
    median = interleaved_medians(steps, args.rounds, args.warmup, args.steps, device)

    print(f"device {device}, preset {args.preset}, batch {args.batch_size}, median of {args.rounds} interleaved rounds")
    print(f"{'stem':<22}{'ms':>9}{'img/s':>10}{'speed vs ' + BASELINE:>30}")
    for name, t in median.items():
        print(f"{name:<22}{t * 1e3:9.1f}{args.batch_size / t:10.0f}{median[BASELINE] / t:30.2f}")


if __name__ == "__main__":
    main()
