"""Which vision encoder the demo should train: timm's small CNN or its small ViT, same recipe, same budget.

    python bench/demo_encoders.py                    # encoder level, ~2 min: held-out exact-set accuracy, time
    python bench/demo_encoders.py --captions DIR     # also the demo's captioner on a frozen random ViT (~15 min)

No pretrained vision weights are reachable offline, so the demo (configs/demo/shapes_smollm2.yaml) pre-trains its
encoder on the shapes world's own pictures (`vlgen.data.synthetic.tiny_encoder.ShapesTinyEncoder`: which
colour-shape-size kinds are in a picture). The encoder level trains each candidate with that recipe and prints the
share of held-out pictures whose set of kinds it gets exactly right. ``--captions`` runs the demo's fit, test and
report in DIR with the encoder swapped for a frozen, randomly initialised test_vit (64 px, patch 16), the other
choice the demo had; compare its fact accuracy with the demo's own.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRANSFORM = {"input_size": [3, 64, 64], "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3}
CANDIDATES = {  # name -> (timm name, create_model kwargs, recipe kwargs)
    "test_resnet, 400 steps x 32 (the demo's)": ("test_resnet", {}, {"steps": 400, "batch_size": 32}),
    "test_vit 64 px patch 16, 600 steps x 64": (
        "test_vit",
        {"img_size": 64, "patch_size": 16},
        {"steps": 600, "batch_size": 64, "lr": 2e-3, "num_images": 4000},
    ),
}
RANDOM_VIT = """
model:
  init_args:
    encoder:
      class_path: vlgen.encoders.TimmEncoder
      init_args:
        name: test_vit
        checkpoint_path: null
        build_if_missing: null
        feature_stage: null
        init_seed: 0
        model_kwargs: {img_size: 64, patch_size: 16}
    bridge:
      init_args: {protect_first: true}
"""


def encoder_level(seeds: list[int]) -> None:
    from vlgen.data.synthetic import ShapesWorld
    from vlgen.data.synthetic.tiny_encoder import ShapesTinyEncoder
    from vlgen.encoders import TimmEncoder

    world = ShapesWorld(seed=0)
    print(f"{'encoder':<44} {'init seed':>9} {'held-out exact-set accuracy':>28} {'time':>6}")
    for label, (name, kwargs, recipe_kwargs) in CANDIDATES.items():
        for seed in seeds:
            recipe = ShapesTinyEncoder(world, **recipe_kwargs)
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                TimmEncoder(
                    name,
                    checkpoint_path=f"{tmp}/e.pth",
                    build_if_missing=recipe,
                    model_kwargs=kwargs,
                    transform=TRANSFORM,
                    init_seed=seed,
                )
            seconds = time.perf_counter() - start
            print(f"{label:<44} {seed:>9} {100 * recipe.held_out_accuracy:>27.1f}% {seconds:>5.0f}s")


def caption_level(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    overlay = work / "random_vit.yaml"
    overlay.write_text(RANDOM_VIT)
    configs = ["--config", str(REPO / "configs/demo/shapes_smollm2.yaml"), "--config", str(overlay)]
    vlgen = [sys.executable, "-m", "vlgen.cli"]
    subprocess.run([*vlgen, "fit", *configs], cwd=work, check=True)
    test_configs = [*configs, "--config", str(REPO / "configs/demo/test.yaml")]
    ckpt = "runs/demo/fit/checkpoints/last.ckpt"
    subprocess.run([*vlgen, "test", *test_configs, "--ckpt_path", ckpt], cwd=work, check=True)
    subprocess.run([*vlgen, "report", "runs/demo/test", "--world", "data/demo-shapes", "--samples", "3"], cwd=work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=Path, default=None, help="also run the random-ViT captioner in this dir")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="initialisations of each encoder")
    args = parser.parse_args()
    encoder_level(args.seeds)
    if args.captions is not None:
        caption_level(args.captions)


if __name__ == "__main__":
    main()
