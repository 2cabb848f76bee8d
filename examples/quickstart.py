"""Build each biosam2 variant on a tiny random SAM2, train a few steps on synthetic shapes, fuse LW,
save and reload. Runs on the CPU in about a minute: ``python examples/quickstart.py``."""

from __future__ import annotations

import tempfile
import warnings

import torch
import torch.nn.functional as F

import biosam2
from biosam2.model.sam2_weights import RandomWeightsWarning


def synthetic_batch(batch: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey images with a bright disc (class 1) and a dark square (class 2) on noise."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    images, labels = torch.rand(batch, 1, height, width) * 0.2 + 0.4, torch.zeros(batch, height, width, dtype=torch.long)
    for i in range(batch):
        cy, cx = torch.randint(10, height - 10, (1,)).item(), torch.randint(10, width - 10, (1,)).item()
        disc = (ys - cy) ** 2 + (xs - cx) ** 2 < 64
        labels[i][disc], images[i, 0][disc] = 1, 0.9
        sy, sx = torch.randint(0, height - 12, (1,)).item(), torch.randint(0, width - 12, (1,)).item()
        labels[i, sy : sy + 12, sx : sx + 12], images[i, 0, sy : sy + 12, sx : sx + 12] = 2, 0.1
    return images, labels


def main() -> None:
    warnings.simplefilter("ignore", RandomWeightsWarning)
    torch.manual_seed(0)
    for adapter in ["hp", "lw"]:
        model = biosam2.build_model("tiny", weights="random", num_classes=3, adapter=adapter)
        print(f"{adapter}: {biosam2.count_parameters(model)}")
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        for step in range(5):
            images, labels = synthetic_batch(2, 96, 160)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            print(f"  step {step}: loss {loss.item():.4f}")
        model.eval()
        images, _ = synthetic_batch(1, 97, 211)  # any size: no resizing
        with torch.no_grad():
            logits = model(images)
            if adapter == "lw":
                unfused = logits
                model.reparameterize()
                logits = model(images)
                print(f"  fused: {biosam2.count_parameters(model)}; max |fused - unfused| = "
                      f"{(logits - unfused).abs().max().item():.2e}")
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory)
            restored = biosam2.load_model(directory).eval()
            with torch.no_grad():
                same = torch.equal(restored(images), logits)
        print(f"  logits {tuple(logits.shape)}; save/load round trip identical: {same}")


if __name__ == "__main__":
    main()
