"""Batch inference on Ray Data (moda.ray.Describer and examples/ray_catalog.py) on a local Ray
cluster of 2 CPUs: every image of a synthetic catalog comes out exactly once, with the
description `moda-sdk describe` gives it, also when an actor dies in the middle of the job."""

import importlib.util
import json
import os
import subprocess
import time

import numpy as np
import pytest

from conftest import REPO, _binary

import pyarrow.parquet as pq  # Ray Data's dependency
import ray

EXAMPLE = REPO / "ffi" / "python" / "examples" / "ray_catalog.py"
PRODUCTS = 120


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("ray_catalog", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """A synthetic catalog in the Kaggle layout (`trainer synth`)."""
    out = tmp_path_factory.mktemp("catalog") / "catalog"
    trainer = _binary("MODA_TRAINER", "trainer")
    subprocess.run(
        [str(trainer), "synth", "--out", str(out), "--count", str(PRODUCTS), "--seed", "0"],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def cli_records(cli, bundle, catalog):
    out = subprocess.run(
        [str(cli), "describe", "--model", str(bundle), "--json", "--quiet",
         "--csv", str(catalog / "fashion.csv"), "--image-column", "Image"],
        check=True, capture_output=True, text=True,
    ).stdout
    records = {r["image"]: r for r in map(json.loads, out.splitlines())}
    assert len(records) == PRODUCTS
    return records


@pytest.fixture(scope="module")
def cluster():
    # One small local cluster for the module: 2 CPUs, no dashboard, a fixed object store
    # (small machines and containers have little shared memory).
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        log_to_driver=False,
        configure_logging=False,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


def read_output(out):
    """The job's Parquet files as a list of row dicts."""
    return pq.read_table(out).to_pylist()


def check_exactly_once(rows, cli_records):
    assert len(rows) == PRODUCTS, f"{len(rows)} rows for {PRODUCTS} images"
    assert sorted(r["image_id"] for r in rows) == sorted(cli_records), "every image once"
    for row in rows:
        want = cli_records[row["image_id"]]
        assert row["error"] is None, row["error"]
        assert row["token_ids"] == want["token_ids"], row["image_id"]
        assert row["description"] == want["description"], row["image_id"]
        assert row["finish"] == want["finish"], row["image_id"]
        np.testing.assert_allclose(row["logprobs"], want["logprobs"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("actors", [1, 2])
def test_ray_job_describes_every_image_once(cluster, example, bundle, catalog, cli_records,
                                            tmp_path, actors):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    example.main(["--model", str(bundle), "--catalog", str(catalog), "--out", str(out),
                  "--actors", str(actors), "--threads", "1", "--batch-size", "8", "--embed"])
    seconds = time.perf_counter() - t0
    print(f"ray job: {PRODUCTS} images, {actors} actors: {PRODUCTS / seconds:.1f} images/s")
    rows = read_output(out)
    check_exactly_once(rows, cli_records)
    emb = np.array([r["embedding"] for r in rows], dtype=np.float32)
    assert emb.dtype == np.float32 and emb.shape[0] == PRODUCTS
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_a_killed_actor_leaves_every_image_once(cluster, example, bundle, catalog, cli_records,
                                               tmp_path):
    from moda.ray import Describer

    marker = tmp_path / "killed"

    class DyingDescriber(Describer):
        """Kills its own process in the middle of its second batch, once per job: Ray
        restarts the actor and retries the batch."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == 2 and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
            return super().__call__(batch)

    out = tmp_path / "out"
    rows = example.catalog_rows(example_args(catalog))
    example.run(rows, bundle, str(out), actors=2, threads=1, batch_size=8,
                describer=DyingDescriber)
    assert marker.exists(), "no actor was killed"
    check_exactly_once(read_output(out), cli_records)


def example_args(catalog):
    class Args:
        pass

    a = Args()
    a.catalog = str(catalog)
    a.csv = None
    return a


def test_describer_writes_the_attributes_of_a_schema_bundle(schema_bundle):
    import moda
    from moda.ray import Describer

    good = str(REPO / "tests" / "fixtures" / "images" / "photo.jpg")
    bad = str(REPO / "tests" / "fixtures" / "images" / "not_an_image.jpg")
    out = Describer(str(schema_bundle), image_column="path")(
        {"path": np.array([good, bad])}).to_pydict()
    want = moda.Model(str(schema_bundle)).describe(good)
    names = list(want.attributes)
    assert names and moda.Model(str(schema_bundle)).attribute_names == names
    for field, attr in want.attributes.items():
        assert out[field][0] == (attr.value if attr else None)
        if attr is None or attr.confidence is None:
            assert out[f"{field}_confidence"][0] is None
        else:
            assert abs(out[f"{field}_confidence"][0] - attr.confidence) < 1e-6
        # A failed image has nulls, and the columns are there all the same.
        assert out[field][1] is None and out[f"{field}_confidence"][1] is None


def test_describer_keeps_going_past_a_bad_image(bundle):
    from PIL import Image

    from moda.ray import Describer

    good = str(REPO / "tests" / "fixtures" / "images" / "photo.jpg")
    bad = str(REPO / "tests" / "fixtures" / "images" / "not_an_image.jpg")
    d = Describer(str(bundle), image_column="path", embed=True)
    out = d({"path": np.array([good, bad, good]), "id": np.array([1, 2, 3])}).to_pydict()
    assert out["id"] == [1, 2, 3] and out["path"] == [good, bad, good]
    assert out["error"][0] is None and "not_an_image.jpg" in out["error"][1]
    assert out["description"][1] is None and out["description"][0] == out["description"][2]
    assert out["finish"][1] is None and out["finish"][0] == out["finish"][2] is not None
    assert out["token_ids"][1] is None and len(out["token_ids"][0]) == len(out["logprobs"][0])
    assert np.isnan(out["embedding"][1]).all()
    # The good rows: the embeddings of those images as one batch, which is how they went
    # through the encoder on the way to their descriptions.
    np.testing.assert_array_equal(
        np.array([out["embedding"][0], out["embedding"][2]], dtype=np.float32),
        d.model.embed([good, good], normalize=True),
    )
    # Pixels (ray.data.read_images gives (N, H, W, 3) arrays) and encoded bytes work as well,
    # and such an image column is left out of the output.
    pixels = np.stack([np.asarray(Image.open(good).convert("RGB"))] * 2)
    for images in [pixels, np.array([open(good, "rb").read()] * 2, dtype=object)]:
        out2 = Describer(str(bundle))({"image": images}).to_pydict()
        assert "image" not in out2 and out2["description"] == [out["description"][0]] * 2


def test_embedder_embeds_every_row_and_keeps_going_past_a_bad_image(bundle):
    from PIL import Image

    import moda
    from moda.ray import Embedder

    good = str(REPO / "tests" / "fixtures" / "images" / "photo.jpg")
    wide = str(REPO / "tests" / "fixtures" / "images" / "wide.png")
    bad = str(REPO / "tests" / "fixtures" / "images" / "not_an_image.jpg")
    model = moda.Model(str(bundle))
    want = model.embed([good, wide], normalize=True)
    e = Embedder(str(bundle), image_column="path")
    # A clean batch goes through the encoder at once: the whole model's batch, to the bit.
    out = e({"path": np.array([good, wide]), "id": np.array([1, 2])}).to_pydict()
    assert out["id"] == [1, 2] and out["error"] == [None, None]
    np.testing.assert_array_equal(np.array(out["embedding"], dtype=np.float32), want)
    # A bad image: its row NaN with the error, the others as embedded one by one.
    out = e({"path": np.array([good, bad, wide])}).to_pydict()
    assert out["error"][0] is None and out["error"][2] is None
    assert "not_an_image.jpg" in out["error"][1]
    assert np.isnan(out["embedding"][1]).all()
    for row, path in [(0, good), (2, wide)]:
        np.testing.assert_array_equal(
            np.array(out["embedding"][row], dtype=np.float32),
            model.embed(path, normalize=True)[0],
        )
    # Raw embeddings on request; pixels in, and the pixel column left out of the output.
    raw = Embedder(str(bundle), normalize=False)(
        {"image": np.stack([np.asarray(Image.open(good).convert("RGB"))])}
    ).to_pydict()
    assert "image" not in raw
    np.testing.assert_array_equal(
        np.array(raw["embedding"], dtype=np.float32),
        model.embed(Image.open(good), normalize=False),
    )
