"""How hard each AdvBCT term pulls on the new embedding during the first steps of training.

Trains a new model against a finished old run (``old/model.pt`` and ``old/stats.pt`` of a quickstart folder) and
prints, every ``--every`` steps, the norm of the gradient that reaches the embedding from the classification
loss, the boundary loss and the weighted adversarial loss (through the gradient-reversal layer), next to the
discriminator's accuracy. Used to see whether the adversarial signal vanishes or swamps classification.

    python bench/adv_gradient_probe.py runs/quickstart --steps 120
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from advbct.compat import CompatBatch, CompatContext, create, load_statistics
from advbct.compat.advbct import adversarial_weight, dann_alpha
from advbct.data.batches import BatchStream, normalise
from advbct.data.sources import load_split
from advbct.models.checkpoint import build_model
from advbct.pipeline import load_old
from advbct.presets import train_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a quickstart folder holding old/model.pt and old/stats.pt")
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(1)
    cfg = train_config("new", args.preset, None, None, None, "cpu")
    old = load_old(args.run / "old" / "model.pt")
    stats = load_statistics(args.run / "old" / "stats.pt", old.meta.model_id)
    train = load_split(old.meta.data, "train")
    num_classes = train.num_classes
    model = build_model(old.meta.model_copy(update={"head_classes": list(range(num_classes))}))
    method = create("advbct", CompatContext(cfg.model.embedding_dim, num_classes, stats))
    params = [*model.parameters(), *method.parameters()]
    optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=5e-4)
    stream = BatchStream(train.images, train.labels, cfg.optim.batch_size, cfg.seed, augment=True)
    total_steps = cfg.optim.epochs * len(stream)
    old_net = old.model.eval()
    print(f"{'step':>5}{'alpha':>8}{'|g_cls|':>11}{'|g_bound|':>11}{'|g_adv|':>11}{'disc_acc':>10}")
    for step, (images_u8, labels) in enumerate(stream.epoch(0)):
        if step >= args.steps:
            break
        images = normalise(images_u8, old.meta.prep)
        emb = model(images)
        with torch.no_grad():
            old_emb = old_net(images)
        cls = F.cross_entropy(model.classify(emb, labels), labels)
        out = method(CompatBatch(emb, labels, old_emb, step / total_steps, 0, cfg.optim.epochs))
        terms = {
            "cls": cls,
            "bound": out.parts["bound"],
            "adv": adversarial_weight(0, cfg.optim.epochs) * out.parts["adv"],
        }
        norms = {}
        for name, term in terms.items():
            (grad,) = torch.autograd.grad(term, emb, retain_graph=True, allow_unused=True)
            norms[name] = 0.0 if grad is None else grad.norm().item()
        optimizer.zero_grad(set_to_none=True)
        (cls + out.total).backward()
        optimizer.step()
        if step % args.every == 0:
            alpha = dann_alpha(step / total_steps)
            acc = out.parts["disc_acc"].item()
            print(f"{step:5d}{alpha:8.3f}{norms['cls']:11.2e}{norms['bound']:11.2e}{norms['adv']:11.2e}{acc:10.2f}")


if __name__ == "__main__":
    main()
