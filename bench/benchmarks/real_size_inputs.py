"""Inputs for a real-size run: a COCO 2017-layout batch and a ViT-B/32-shaped random checkpoint.

    python bench/benchmarks/real_size_inputs.py --out DIR --train 5000 --test 1000 [--workers 2] [--seed 0]

writes DIR/batch/ (dataset.yaml, train2017/, val2017/, annotations/; see
`bench.benchmarks.coco_like.write_coco_batch`) and DIR/vit-b-32-random/ (a CLIP shaped like
openai/clip-vit-base-patch32 with random weights and a tokenizer trained on the batch's
train captions; see `bench.benchmarks.pretrained_like.save_vit_b32_like`), then prints both paths,
the generation time and images/s. Point the pipeline's dataset at DIR/batch/dataset.yaml
and its base checkpoint at DIR/vit-b-32-random.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `bench` importable when run as a script

from bench.benchmarks.coco_like import write_coco_batch  # noqa: E402
from bench.benchmarks.pretrained_like import SHAPES, save_vit_b32_like  # noqa: E402
from spur_assets.core.data.coco_ingest import read_manifest  # noqa: E402

MODEL_DIR = "vit-b-32-random"


def write_real_size_inputs(out: Path, n_train: int, n_test: int, workers: int = 1, seed: int = 0, shape: str = "vit-b/32") -> dict:
    """Write DIR/batch and DIR/<MODEL_DIR>; return their paths and timings."""
    out = Path(out)
    started = time.perf_counter()
    manifest = write_coco_batch(out / "batch", n_train, n_test, seed=seed, workers=workers)
    generation_s = time.perf_counter() - started
    captions_file = read_manifest(manifest).splits["train"].captions
    captions = [record["caption"] for record in json.loads(captions_file.read_text(encoding="utf-8"))["annotations"]]
    started = time.perf_counter()
    model_dir = save_vit_b32_like(out / MODEL_DIR, captions, seed=seed, shape=shape)
    model_s = time.perf_counter() - started
    return {
        "manifest": manifest, "model": model_dir, "images": n_train + n_test,
        "generation_s": generation_s, "images_per_s": (n_train + n_test) / generation_s, "model_s": model_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (DIR/batch must not exist or be empty)")
    parser.add_argument("--train", type=int, default=5000, help="train images (default 5000)")
    parser.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    parser.add_argument("--workers", type=int, default=1, help="processes drawing images (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch and of the model weights (default 0)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="vit-b/32", help="model shape (default vit-b/32)")
    args = parser.parse_args(argv)
    if args.train < 1 or args.test < 1 or args.workers < 1:
        parser.error("--train, --test and --workers must be >= 1")
    result = write_real_size_inputs(args.out, args.train, args.test, args.workers, args.seed, args.shape)
    print(f"batch:  {result['manifest']}")
    print(f"model:  {result['model']}")
    print(
        f"generated {result['images']:,} images ({args.train:,} train + {args.test:,} test) in "
        f"{result['generation_s']:.1f} s with {args.workers} worker(s): {result['images_per_s']:.1f} images/s; "
        f"model written in {result['model_s']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
