"""Train a small ViT or DeiT image classifier on scikit-learn's 8x8 digits, deterministically, in
about a minute on one CPU thread (used by bench/arch.py; not run in CI).

The training images are the `builtin:digits` calibration part and the test images its evaluation
part (d2compiler.evaluation.images), so calibration never sees a test image. Same seed, same thread count,
same torch build -> bit-identical weights (bench/arch.py checks this by training twice).

    python bench/digits_vit.py vit out/arch/digits-vit [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

from d2compiler.evaluation.images import digits, fit_to_model

ARCHITECTURES = {"vit": (transformers.ViTConfig, transformers.ViTForImageClassification),
                 "deit": (transformers.DeiTConfig, transformers.DeiTForImageClassification)}
SHAPE = dict(image_size=8, patch_size=2, num_channels=1, num_labels=10, hidden_size=64, num_hidden_layers=4,
             num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# Chosen as the first of three trial settings that fits the training images (the others underfit them).
EPOCHS, BATCH, LR, SEED = 100, 32, 1e-3, 0


def train(arch: str, epochs: int = EPOCHS) -> torch.nn.Module:
    """A trained classifier (eval mode). Deterministic for a given torch build and thread count."""
    config_cls, model_cls = ARCHITECTURES[arch]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        model = model_cls(config_cls(**SHAPE))
        train_set = digits("calibration")
        pixels, labels = fit_to_model(train_set.pixels, model.config), train_set.labels
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
        steps = epochs * -(-len(labels) // BATCH)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
        gen = torch.Generator().manual_seed(SEED)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=gen)
            for i in range(0, len(labels), BATCH):
                idx = order[i : i + BATCH]
                loss = model(pixel_values=pixels[idx], labels=labels[idx]).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        return model.eval()
    finally:
        torch.set_num_threads(threads)


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=sorted(ARCHITECTURES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="one epoch instead of the full training")
    args = parser.parse_args()
    train(args.arch, 1 if args.smoke else EPOCHS).save_pretrained(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
