"""A tiny visual encoder pre-trained on the shapes world's own scenes: the frozen encoder of CPU tiny configs.

BLIP-2, P-Former and EVLGen bridge a *pretrained, frozen* image encoder to a frozen LLM. A random encoder trained
for a few hundred caption steps learns almost nothing about the pictures, so the CPU tier gets the same situation
as the papers in miniature: a small timm backbone trained for a few seconds to tell which of the world's
(colour, shape, size) kinds are in a picture. It trains on scenes drawn from a split of their own ("vision"), never
on the captioning splits, and sees no text. The weights are written to a file that
:class:`~vlgen.encoders.TimmEncoder` then loads as its ``checkpoint_path``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from vlgen.data.synthetic.shapes import COLORS, SHAPES, SIZES, Scene, ShapesWorld, render
from vlgen.loading import EncoderRecipe

if TYPE_CHECKING:
    from vlgen.encoders.timm import TimmEncoder

log = logging.getLogger(__name__)

KINDS = [(color, shape, size) for color in COLORS for shape in SHAPES for size in SIZES]


def scene_targets(scene: Scene) -> Tensor:
    """``[K]``: 1 for every (colour, shape, size) kind in the scene, else 0."""
    out = torch.zeros(len(KINDS))
    for obj in scene.objects:
        out[KINDS.index((obj.color, obj.shape, obj.size))] = 1.0
    return out


def cell_targets(scene: Scene, height: int, width: int) -> Tensor:
    """``[height * width, K]``: 1 where a kind's centre lies in that cell of a ``height x width`` grid (row-major,
    as a feature map flattens), else 0."""
    out = torch.zeros(height * width, len(KINDS))
    for obj in scene.objects:
        row, col = min(int(obj.y * height), height - 1), min(int(obj.x * width), width - 1)
        out[row * width + col, KINDS.index((obj.color, obj.shape, obj.size))] = 1.0
    return out


class ShapesTinyEncoder(EncoderRecipe):
    """Pre-train a :class:`~vlgen.encoders.TimmEncoder`'s backbone on rendered scenes and save its weights.

    The task is multi-label classification of the (colour, shape, size) kinds in a scene, through the backbone's
    average-pooled features and a linear head that is thrown away afterwards. With ``cell_weight > 0`` a second
    linear head reads each cell of the feature map the encoder hands on (its ``feature_stage``) and names the kinds
    whose centre lies in that cell, so each token says what is where, not only the picture as a whole what is in
    it: a caption's relations ("left of", "above") need that. Batch-norm statistics are recomputed over the
    training pictures at the end: the running averages lag far behind weights that move this fast and would make
    the frozen encoder's eval-mode features stale.

    Args:
        world: the world whose scenes (split "vision") and image size are used.
        num_images: distinct scenes rendered for training; the next ``num_held_out`` score the result (logged).
        steps: optimiser steps.
        batch_size: images per step.
        lr: AdamW learning rate (constant).
        seed: initialisation and batching seed.
        num_held_out: held-out scenes whose exact-set accuracy is logged.
        cell_weight: weight of the per-cell loss (0: the whole-picture task alone).
    """

    def __init__(
        self,
        world: ShapesWorld,
        num_images: int = 2000,
        steps: int = 400,
        batch_size: int = 32,
        lr: float = 5e-3,
        seed: int = 0,
        num_held_out: int = 256,
        cell_weight: float = 0.0,
    ) -> None:
        self.world, self.num_images, self.num_held_out = world, num_images, num_held_out
        self.steps, self.batch_size, self.lr, self.seed = steps, batch_size, lr, seed
        self.cell_weight = cell_weight
        self.held_out_accuracy: float | None = None
        self.held_out_cell_accuracy: float | None = None

    def __repr__(self) -> str:
        cells = f", cell_weight={self.cell_weight}" if self.cell_weight else ""
        return f"ShapesTinyEncoder(steps={self.steps}, num_images={self.num_images}{cells})"

    def _scenes(self, transform: Callable, start: int, count: int, grid: tuple[int, int]) -> tuple[Tensor, ...]:
        size = self.world.args["image_size"]
        scenes = [self.world.scene("vision", i)[0] for i in range(start, start + count)]
        pixels = torch.stack([transform(render(s, size)) for s in scenes])
        cells = torch.stack([cell_targets(s, *grid) for s in scenes])
        return pixels, torch.stack([scene_targets(s) for s in scenes]), cells

    def build(self, encoder: TimmEncoder, out_file: Path) -> None:
        """Train ``encoder.model`` (fresh, float32) in place through the encoder's eval transform; save it."""
        transform = encoder.image_transform(train=False)
        backbone = encoder.model
        stage = encoder.feature_stage if encoder.feature_stage is not None else len(backbone.feature_info) - 1
        side = self.world.args["image_size"]
        with torch.no_grad():  # the read map's grid, [B, D, h, w]
            probe = backbone.forward_intermediates(torch.zeros(1, 3, side, side), indices=[stage])[1][0]
        grid = (probe.shape[-2], probe.shape[-1])
        pixels, targets, cells = self._scenes(transform, 0, self.num_images, grid)  # [N, 3, H, W], [N, K], [N, h*w, K]
        head = nn.Linear(backbone.num_features, len(KINDS))  # on the final features, whatever stage is read

        def logits(x: Tensor) -> tuple[Tensor, Tensor]:
            """``[B, K]`` whole-picture and ``[B, h*w, K]`` per-cell logits."""
            final, (read,) = backbone.forward_intermediates(x, indices=[stage])
            pooled = final.flatten(2).mean(-1) if final.ndim == 4 else final.mean(1)
            return head(pooled), cell_head(read.flatten(2).transpose(1, 2))

        was_training = backbone.training
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            head.reset_parameters()
            cell_head = nn.Linear(probe.shape[1], len(KINDS))  # on each cell of the map that is read
            params = [*backbone.parameters(), *head.parameters(), *cell_head.parameters()]
            gen = torch.Generator().manual_seed(self.seed)
            opt = torch.optim.AdamW(params, lr=self.lr)
            backbone.train()
            for p in params:
                p.requires_grad_(True)
            loss = torch.tensor(float("nan"))
            for _ in tqdm(range(self.steps), desc="pre-training the tiny encoder", unit="step", mininterval=1.0):
                pick = torch.randint(len(pixels), (self.batch_size,), generator=gen)
                whole, per_cell = logits(pixels[pick])
                loss = F.binary_cross_entropy_with_logits(whole, targets[pick])
                if self.cell_weight:
                    loss = loss + self.cell_weight * F.binary_cross_entropy_with_logits(per_cell, cells[pick])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            recompute_batch_norm(backbone, pixels)
            backbone.eval()
            exact = cell_exact = float("nan")
            if self.num_held_out > 0:
                held_x, held_y, held_cells = self._scenes(transform, self.num_images, self.num_held_out, grid)
                whole, per_cell = logits(held_x)
                exact = ((whole > 0).float() == held_y).all(-1).float().mean().item()
                cell_exact = ((per_cell > 0).float() == held_cells).flatten(1).all(-1).float().mean().item()
        backbone.train(was_training)
        self.held_out_accuracy, self.held_out_cell_accuracy = exact, cell_exact
        cell_text = f", every cell right on {100 * cell_exact:.1f}%" if self.cell_weight else ""
        log.info(
            "tiny encoder: %d steps on %d scenes, final loss %.3f, held-out exact-set accuracy %.1f%%%s",
            self.steps, len(pixels), loss.item(), 100 * exact, cell_text,
        )  # fmt: skip
        out_file.parent.mkdir(parents=True, exist_ok=True)
        partial = out_file.with_name(f".{out_file.name}.partial-{os.getpid()}")
        torch.save(backbone.state_dict(), partial)
        partial.rename(out_file)


def recompute_batch_norm(model: nn.Module, pixels: Tensor, batch_size: int = 64) -> None:
    """Replace every batch-norm layer's running statistics with exact averages over ``pixels`` (train mode)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    model.train()
    for i in range(0, len(pixels), batch_size):
        model(pixels[i : i + batch_size])
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
