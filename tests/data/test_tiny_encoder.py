"""The tiny encoder recipe: targets, batch-norm recomputation, and TimmEncoder building a missing checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlgen.data.synthetic import Scene, SceneObject, ShapesWorld
from vlgen.data.synthetic.tiny_encoder import (
    KINDS,
    ShapesTinyEncoder,
    cell_targets,
    recompute_batch_norm,
    scene_targets,
)
from vlgen.encoders import TimmEncoder
from vlgen.loading import EncoderRecipe

TRANSFORM = {"input_size": [3, 64, 64], "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3}


def test_targets_mark_exactly_the_kinds_in_the_scene():
    scene = Scene((SceneObject("circle", "red", "small", 0.3, 0.3), SceneObject("square", "blue", "large", 0.7, 0.6)))
    targets = scene_targets(scene)
    assert targets.shape == (len(KINDS),) and targets.sum() == 2
    assert targets[KINDS.index(("red", "circle", "small"))] == 1
    assert targets[KINDS.index(("blue", "square", "large"))] == 1
    assert targets[KINDS.index(("blue", "square", "small"))] == 0


def test_cell_targets_put_each_kind_in_the_cell_of_its_centre():
    scene = Scene((SceneObject("circle", "red", "small", 0.1, 0.9), SceneObject("square", "blue", "large", 0.6, 0.3)))
    cells = cell_targets(scene, 4, 4)  # row-major, as a [D, 4, 4] map flattens
    assert cells.shape == (16, len(KINDS)) and cells.sum() == 2
    assert cells[3 * 4 + 0, KINDS.index(("red", "circle", "small"))] == 1  # row 3 (y 0.9), column 0 (x 0.1)
    assert cells[1 * 4 + 2, KINDS.index(("blue", "square", "large"))] == 1  # row 1 (y 0.3), column 2 (x 0.6)
    edge = Scene((SceneObject("circle", "red", "small", 1.0, 1.0),))
    assert cell_targets(edge, 4, 4)[15].sum() == 1  # a centre on the far edge stays in the last cell


def test_recomputed_batch_norm_statistics_are_the_exact_averages():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    pixels = torch.randn(40, 3, 8, 8)
    model.eval()
    recompute_batch_norm(model, pixels, batch_size=8)  # five equal batches: the cumulative average is exact
    with torch.no_grad():
        feats = model[0](pixels)
    norm = model[1]
    torch.testing.assert_close(norm.running_mean, feats.mean((0, 2, 3)))
    per_batch_var = torch.stack([feats[i : i + 8].var((0, 2, 3), unbiased=True) for i in range(0, 40, 8)])
    torch.testing.assert_close(norm.running_var, per_batch_var.mean(0))
    assert norm.momentum == 0.1  # restored


class Shift(EncoderRecipe):
    """Writes the fresh weights plus one, and counts its calls."""

    calls = 0

    def build(self, encoder, out_file):
        Shift.calls += 1
        torch.save({k: v + 1 if v.is_floating_point() else v for k, v in encoder.model.state_dict().items()}, out_file)


def test_missing_checkpoint_is_built_once_then_loaded(tmp_path):
    path = tmp_path / "sub" / "enc.pth"
    path.parent.mkdir()
    fresh = TimmEncoder("test_resnet", init_seed=3)
    built = TimmEncoder("test_resnet", init_seed=3, checkpoint_path=str(path), build_if_missing=Shift())
    weight = next(k for k, v in fresh.state_dict().items() if v.is_floating_point())
    torch.testing.assert_close(built.state_dict()[weight], fresh.state_dict()[weight] + 1)
    assert not any(p.requires_grad for p in built.parameters())  # frozen after building, as configured
    again = TimmEncoder("test_resnet", checkpoint_path=str(path), build_if_missing=Shift())
    assert Shift.calls == 1
    torch.testing.assert_close(again.state_dict()[weight], built.state_dict()[weight])


@pytest.mark.slow
def test_recipe_learns_the_kinds_in_unseen_pictures(tmp_path):
    world = ShapesWorld(seed=0, num_train=1, num_val=1, num_test=1, num_text=1)
    recipe = ShapesTinyEncoder(world, num_images=1000, steps=250, num_held_out=128)
    path = tmp_path / "enc.pth"
    TimmEncoder("test_resnet", checkpoint_path=str(path), transform=TRANSFORM, build_if_missing=recipe)
    assert path.is_file() and not list(tmp_path.glob(".*partial*"))
    # Every scene holds 1-3 objects, so "nothing there" scores 0 and a guess of one fixed set almost 0.
    assert recipe.held_out_accuracy > 0.3


@pytest.mark.slow
def test_the_cell_task_teaches_the_read_map_where_each_kind_is(tmp_path):
    world = ShapesWorld(seed=0, num_train=1, num_val=1, num_test=1, num_text=1)
    recipe = ShapesTinyEncoder(world, num_images=1000, steps=250, num_held_out=128, cell_weight=1.0)
    path = tmp_path / "enc.pth"
    encoder = TimmEncoder(
        "test_resnet", checkpoint_path=str(path), transform=TRANSFORM, build_if_missing=recipe, feature_stage=3
    )
    assert "cell_weight=1.0" in repr(recipe)
    # 16 cells x 36 kinds all right in one picture: an untrained head (or one blind to where) gets next to none.
    assert recipe.held_out_cell_accuracy > 0.3 and recipe.held_out_accuracy > 0.3
    assert encoder(torch.zeros(1, 3, 64, 64)).shape == (1, 16, encoder.embed_dim)
