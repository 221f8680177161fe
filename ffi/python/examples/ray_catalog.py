"""Describes (and embeds) a whole product catalog with Ray Data and writes Parquet.

    python ray_catalog.py --model demo/bundle --catalog demo/catalog --out descriptions/
    python ray_catalog.py --model bundle --csv products.csv --image-column path --out out/ \
        --address auto --actors 8 --threads 4 --embed

The catalog is the Kaggle "fashion-images" layout (a directory with fashion.csv, each image at
<Category>/<Gender>/Images/images_with_product_ids/<Image>, as `trainer synth` writes it), or
any CSV with a column of image paths (relative ones start at --root, by default the CSV's
directory). Each output row has `image_id` (the image's path relative to the catalog, the key
`moda-sdk describe --csv` gives its records), `description`, `token_ids`, `logprobs`, `error`
(None, or why that image failed) and, with --embed, `embedding` (float32, L2-normalised).

The same script runs on a laptop (no --address: `ray.init()` starts a local cluster) and on a
cluster (`--address auto` inside a Ray cluster or a KubeRay pod). The images are read by the
actors from their paths, so on a cluster they must be on storage every node mounts. Each of
the --actors actors opens the bundle once and gets --threads cores (ONNX Runtime's threads in
one graph run); actors x threads should not exceed the cluster's cores.
"""

import argparse
import csv
import os
import sys
import time


def catalog_rows(args):
    """(image_id, path) of every image of the catalog, in the CSV's order."""
    if args.catalog:
        root = args.catalog
        csv_path = os.path.join(root, "fashion.csv")
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        ids = [
            "/".join([r["Category"], r["Gender"], "Images", "images_with_product_ids", r["Image"]])
            for r in rows
        ]
    else:
        root = args.root or os.path.dirname(os.path.abspath(args.csv))
        with open(args.csv, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and args.image_column not in rows[0]:
            sys.exit(f"{args.csv} has no column {args.image_column!r}")
        ids = [r[args.image_column] for r in rows]
    return [{"image_id": i, "path": os.path.join(os.path.abspath(root), i)} for i in ids]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the bundle directory (exporter onnx)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--catalog", help="a catalog directory in the Kaggle layout")
    src.add_argument("--csv", help="a CSV file with a column of image paths")
    p.add_argument("--image-column", default="path", help="with --csv: the image column")
    p.add_argument("--root", help="with --csv: where relative image paths start")
    p.add_argument("--out", required=True, help="the Parquet output directory")
    p.add_argument("--address", help="a Ray cluster to join ('auto' inside one); default: local")
    p.add_argument("--actors", type=int, default=2, help="actors, each with its own model")
    p.add_argument("--threads", type=int, default=1, help="cores (ONNX Runtime threads) per actor")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call")
    p.add_argument("--embed", action="store_true", help="add the image embeddings")
    p.add_argument("--max-new-tokens", type=int, help="longest description, in tokens")
    args = p.parse_args(argv)

    import ray

    rows = catalog_rows(args)
    if not ray.is_initialized():
        if args.address:
            ray.init(address=args.address)
        else:
            ray.init(include_dashboard=False)
    generation = {}
    if args.max_new_tokens is not None:
        generation["max_new_tokens"] = args.max_new_tokens
    t0 = time.perf_counter()
    run(rows, args.model, args.out, args.actors, args.threads, args.batch_size, args.embed,
        generation)
    seconds = time.perf_counter() - t0
    print(
        f"{len(rows)} images in {seconds:.1f} s ({len(rows) / seconds:.1f} images/s) with "
        f"{args.actors} actors x {args.threads} threads -> {args.out}"
    )


def run(rows, model, out, actors, threads, batch_size, embed=False, generation=None,
        describer=None):
    """The Ray Data job: `rows` ({"image_id", "path"} dicts) described by `actors` actors
    of `threads` cores each, written to Parquet files in `out`. `describer` replaces
    moda.ray.Describer (a subclass, say)."""
    import ray

    from moda.ray import Describer

    ds = ray.data.from_items(rows).map_batches(
        describer or Describer,
        fn_constructor_kwargs={
            "bundle": os.path.abspath(model),
            "image_column": "path",
            "embed": embed,
            "threads": threads,
            "generation": generation or {},
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=threads,
        batch_size=batch_size,
        batch_format="numpy",
    )
    ds.drop_columns(["path"]).write_parquet(out)


if __name__ == "__main__":
    main()
