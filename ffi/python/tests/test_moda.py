"""The `moda` Python package against the `moda-sdk` command line on the same bundle."""

import ast
import io
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

import moda
from conftest import IMAGES, run_cli

# Images whose pixels Pillow decodes exactly as the SDK does (8-bit PNGs of every colour
# type and a baseline JPEG: both use libjpeg-turbo's default IDCT and upsampling).
PIXEL_IMAGES = ["photo.jpg", "wide.png", "small.png", "rgba.png", "palette.png", "gray.png"]


def to_rgb(image):
    """`transformers`' `convert_to_rgb`: RGB, with transparency composited onto white."""
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def strided(array):
    """The same pixels in a view that is not C-contiguous (every other column of a wider
    array)."""
    h, w, c = array.shape
    wide = np.zeros((h, 2 * w, c), dtype=array.dtype)
    wide[:, ::2] = array
    view = wide[:, ::2]
    assert not view.flags.c_contiguous
    return view


@pytest.fixture(scope="module")
def cli_descriptions(cli, bundle):
    return run_cli(cli, bundle, "describe", [IMAGES / n for n in PIXEL_IMAGES])


def cli_tokens(records, name):
    return records[str(IMAGES / name)]["token_ids"]


@pytest.mark.parametrize("name", PIXEL_IMAGES)
def test_every_input_kind_gives_the_cli_tokens(model, cli_descriptions, name):
    path = IMAGES / name
    want = cli_tokens(cli_descriptions, name)
    record = cli_descriptions[str(path)]
    pil = Image.open(path)
    inputs = {
        "str": str(path),
        "PathLike": pathlib.Path(path),
        "bytes": path.read_bytes(),
        "bytearray": bytearray(path.read_bytes()),
        "PIL": pil,
        "numpy": np.asarray(to_rgb(pil)),
        # Not C-contiguous: copied before the SDK reads it.
        "numpy view": strided(np.asarray(to_rgb(pil))),
    }
    for kind, image in inputs.items():
        d = model.describe(image)
        assert d.token_ids == want, kind
        assert d.text == record["description"], kind
        np.testing.assert_allclose(d.logprobs, record["logprobs"], rtol=0, atol=1e-5)


def test_describe_result_is_typed(model):
    d = model.describe(IMAGES / "photo.jpg")
    assert isinstance(d, moda.Description)
    assert isinstance(d.text, str) and str(d) == d.text
    assert all(isinstance(t, int) for t in d.token_ids)
    assert len(d.logprobs) == len(d.token_ids) == d.timings.tokens
    assert isinstance(d.timings, moda.Timings)
    assert d.timings.total_ms > 0
    assert d.to_dict()["token_ids"] == d.token_ids
    assert d.finish in {"end_of_text", "stop_string", "length", "stopped"}
    assert d.to_dict()["finish"] == d.finish
    # min = max masks </s>: the token limit ends the description.
    cut = model.describe(IMAGES / "photo.jpg", max_new_tokens=4, min_new_tokens=4)
    assert cut.finish == "length"
    assert set(d.to_dict()["timings_ms"]) >= {"total_ms", "encoder_ms", "tokens"}


def test_describe_batch_equals_the_cli(model, cli_descriptions):
    paths = [IMAGES / n for n in PIXEL_IMAGES]
    got = model.describe_batch([str(p) for p in paths])
    assert [d.token_ids for d in got] == [cli_tokens(cli_descriptions, n) for n in PIXEL_IMAGES]
    # A (N, H, W, 3) array is a batch too.
    arrays = np.stack([np.asarray(Image.open(IMAGES / "photo.jpg").convert("RGB"))] * 3)
    got = model.describe_batch(arrays)
    assert [d.token_ids for d in got] == [cli_tokens(cli_descriptions, "photo.jpg")] * 3


def test_describe_batch_errors(model):
    images = [IMAGES / "photo.jpg", IMAGES / "not_an_image.jpg", b"not an image either"]
    with pytest.raises(moda.ImageError, match="not_an_image.jpg"):
        model.describe_batch(images)
    got = model.describe_batch(images, errors="return")
    assert isinstance(got[0], moda.Description)
    assert isinstance(got[1], moda.ImageError) and "not_an_image.jpg" in str(got[1])
    assert isinstance(got[2], moda.ImageError) and "image 2" in str(got[2])
    with pytest.raises(ValueError):
        model.describe_batch(images, errors="ignore")
    with pytest.raises(TypeError):
        model.describe_batch(str(IMAGES / "photo.jpg"))


@pytest.mark.parametrize(
    "keywords, flags",
    [
        ({"max_new_tokens": 5}, ["--max-new-tokens", "5"]),
        ({"num_beams": 3, "length_penalty": 0.5}, ["--num-beams", "3", "--length-penalty", "0.5"]),
        (
            {"do_sample": True, "seed": 7, "temperature": 0.7, "top_k": 20, "top_p": 0.9},
            ["--do-sample", "--seed", "7", "--temperature", "0.7", "--top-k", "20", "--top-p", "0.9"],
        ),
        (
            {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 4},
            ["--repetition-penalty", "1.3", "--no-repeat-ngram-size", "2", "--min-new-tokens", "4"],
        ),
    ],
)
def test_generation_keywords_match_the_cli_flags(model, cli, bundle, keywords, flags):
    path = IMAGES / "photo.jpg"
    want = run_cli(cli, bundle, "describe", [path], *flags)[str(path)]["token_ids"]
    assert model.describe(path, **keywords).token_ids == want
    assert model.describe_batch([path], **keywords)[0].token_ids == want


def test_stop_strings_end_the_description_as_the_cli_does(model, cli, bundle):
    path = IMAGES / "photo.jpg"
    free = model.describe(path, max_new_tokens=16)
    text = free.text
    assert len(text) >= 4, text
    # Two characters from the middle of the free description: generation stops once the text
    # holds them, and the description ends before them.
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    got = model.describe(path, max_new_tokens=16, stop_strings=stop)
    assert text.startswith(got.text) and stop not in got.text, (text, stop, got.text)
    assert len(got.token_ids) <= len(free.token_ids)
    assert got.token_ids == free.token_ids[: len(got.token_ids)]
    want = run_cli(
        cli, bundle, "describe", [path], "--max-new-tokens", "16", "--stop-string", stop
    )[str(path)]
    assert got.token_ids == want["token_ids"]
    assert got.text == want["description"]
    assert got.finish == want["finish"] == "stop_string"
    # A list works as well; an empty list turns stop strings off.
    assert model.describe(path, max_new_tokens=16, stop_strings=[stop]).text == got.text
    assert model.describe(path, max_new_tokens=16, stop_strings=[]).text == text


def test_bad_generation_keywords(model):
    path = IMAGES / "photo.jpg"
    with pytest.raises(TypeError, match="max_length"):
        model.describe(path, max_length=5)
    with pytest.raises(TypeError, match="num_beams"):
        model.describe(path, num_beams="two")
    with pytest.raises(moda.InvalidArgumentError, match="min_new_tokens"):
        model.describe(path, max_new_tokens=3, min_new_tokens=5)
    assert issubclass(moda.InvalidArgumentError, moda.ModaError)


def test_stream_yields_the_description_piece_by_piece(model):
    path = IMAGES / "photo.jpg"
    want = model.describe(path)
    stream = model.stream(path)
    assert stream.result is None
    pieces = list(stream)
    assert len(pieces) == len(want.token_ids)
    assert "".join(pieces) == want.text.rstrip("\ufffd")
    assert stream.result.token_ids == want.token_ids
    assert list(stream) == []
    # Every input kind works, and a stream dropped early stops its generation cleanly.
    partial = model.stream(Image.open(path))
    assert isinstance(next(partial), str)
    del partial
    with pytest.raises(moda.ImageError, match="not_an_image.jpg"):
        list(model.stream(IMAGES / "not_an_image.jpg"))


def test_embeddings_equal_the_cli(model, cli, bundle):
    paths = [IMAGES / n for n in PIXEL_IMAGES]
    for normalize, flags in [(False, []), (True, ["--normalize"])]:
        records = run_cli(cli, bundle, "embed", paths, *flags)
        want = np.array([records[str(p)]["embedding"] for p in paths], dtype=np.float32)
        # One image per call, as the command line runs them: the same numbers (the JSON
        # floats are the shortest decimal that reads back as the same float32).
        single = np.concatenate([model.embed(p, normalize=normalize) for p in paths])
        assert single.dtype == np.float32 and single.shape == (len(paths), model.embedding_dim)
        np.testing.assert_array_equal(single, want)
        # One batch through the encoder: ONNX Runtime's kernels may sum in another order
        # for another batch size, a few float32 ulps at most.
        batch = model.embed([str(p) for p in paths], normalize=normalize)
        assert batch.shape == want.shape
        np.testing.assert_allclose(batch, want, rtol=1e-5, atol=1e-6)
    norms = np.linalg.norm(model.embed(paths, normalize=True), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)


def test_a_description_carries_its_images_embedding(model):
    paths = [IMAGES / n for n in PIXEL_IMAGES]
    described = model.describe_batch(paths, max_new_tokens=3)
    # The same batch of pixels through the same encoder session: the same floats.
    for normalize in (False, True):
        want = model.embed(paths, normalize=normalize)
        got = np.stack([d.embedding(normalize=normalize) for d in described])
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    one = model.describe(paths[0], max_new_tokens=3)
    np.testing.assert_array_equal(one.embedding(), model.embed(paths[0])[0])


def test_embeddings_only_embeds_and_refuses_to_describe(model, bundle):
    only = moda.Model(bundle, embeddings_only=True)
    paths = [IMAGES / n for n in PIXEL_IMAGES]
    # The same graphs with the same options as the whole model: the same numbers.
    np.testing.assert_array_equal(only.embed(paths), model.embed(paths))
    with pytest.raises(moda.InvalidArgumentError, match="embeddings only"):
        only.describe(paths[0])
    with pytest.raises(moda.InvalidArgumentError, match="embeddings only"):
        list(only.stream(paths[0]))


def test_embed_can_return_each_images_error(model):
    paths = [IMAGES / "photo.jpg", IMAGES / "not_an_image.jpg", IMAGES / "wide.png"]
    emb, errors = model.embed(paths, normalize=True, errors="return")
    assert emb.shape == (3, model.embedding_dim) and emb.dtype == np.float32
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], moda.ImageError) and "not_an_image.jpg" in str(errors[1])
    assert np.isnan(emb[1]).all()
    # The rows that read are the batch of those images alone, to float32 rounding.
    np.testing.assert_allclose(
        emb[[0, 2]], model.embed([paths[0], paths[2]], normalize=True), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(moda.ImageError, match="not_an_image.jpg"):
        model.embed(paths)
    with pytest.raises(ValueError, match="errors"):
        model.embed(paths, errors="ignore")


def test_embed_inputs(model):
    path = IMAGES / "photo.jpg"
    want = model.embed(path)
    pil = Image.open(path)
    for image in [str(path), path.read_bytes(), pil, np.asarray(pil.convert("RGB"))]:
        np.testing.assert_array_equal(model.embed(image), want)
    with pytest.raises(moda.ImageError, match="not_an_image.jpg"):
        model.embed([path, IMAGES / "not_an_image.jpg"])


def test_four_threads_on_one_model_equal_serial(bundle):
    names = PIXEL_IMAGES * 2
    for sessions in (1, 2):
        model = moda.Model(bundle, sessions=sessions)
        serial = [model.describe(IMAGES / n).token_ids for n in names]
        serial_emb = model.embed([IMAGES / n for n in names])
        results = {}
        errors = []

        def work(t):
            try:
                for i, n in enumerate(names):
                    # Each thread goes through the images in its own order.
                    j = (i + 3 * t) % len(names)
                    results[(t, j)] = model.describe(IMAGES / names[j]).token_ids
                    if i % 4 == t:
                        emb = model.embed(IMAGES / names[j])
                        np.testing.assert_allclose(emb[0], serial_emb[j], rtol=1e-5, atol=1e-6)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for (t, j), ids in results.items():
            assert ids == serial[j], (sessions, t, names[j])
        assert len(results) == 4 * len(names)


def test_bad_images_raise_image_error_naming_them(model):
    bad = IMAGES / "not_an_image.jpg"
    with pytest.raises(moda.ImageError, match="not_an_image.jpg") as e:
        model.describe(bad)
    assert isinstance(e.value, moda.ModaError)
    with pytest.raises(moda.ImageError, match="no_such_image.jpg"):
        model.describe(IMAGES / "no_such_image.jpg")
    with pytest.raises(moda.ImageError, match="image bytes"):
        model.describe(b"\x89PNG but not really")
    with pytest.raises(moda.ImageError, match=r"uint8 with shape \(H, W, 3\)"):
        model.describe(np.zeros((4, 4, 4), dtype=np.uint8))
    with pytest.raises(moda.ImageError, match="float32"):
        model.describe(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="expected an image"):
        model.describe(42)


def test_missing_or_broken_bundle_raises_bundle_error(tmp_path):
    missing = tmp_path / "no_bundle"
    with pytest.raises(moda.BundleError, match="no_bundle"):
        moda.Model(missing)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "moda.json").write_text("{not json")
    with pytest.raises(moda.BundleError, match="moda.json"):
        moda.Model(tmp_path / "broken")
    with pytest.raises(ValueError):
        moda.Model(missing, sessions=0)


def test_missing_runtime_raises_runtime_not_found(bundle):
    # ONNX Runtime is loaded once per process: try a wrong one in a fresh interpreter.
    code = (
        "import moda, sys\n"
        "try:\n"
        f"    moda.Model({str(bundle)!r})\n"
        "except moda.RuntimeNotFoundError as e:\n"
        "    print('RuntimeNotFoundError:', e)\n"
        "    sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    env = dict(os.environ, ORT_DYLIB_PATH="/nonexistent/libonnxruntime.so")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ORT_DYLIB_PATH=/nonexistent/libonnxruntime.so" in r.stdout


def test_model_properties(model, bundle):
    assert model.bundle == str(bundle)
    assert model.threads >= 1 and model.sessions == 1
    assert model.embedding_dim > 0 and model.max_new_tokens > 0
    assert model.attribute_names is None  # a bundle without a caption schema
    assert "moda.Model(" in repr(model)


def test_stubs_cover_the_module():
    stub = pathlib.Path(moda.__file__).with_name("_native.pyi")
    assert (stub.parent / "py.typed").is_file()
    tree = ast.parse(stub.read_text())
    stubbed = {
        n.name if isinstance(n, ast.ClassDef) else t.id
        for n in tree.body
        for t in (n.targets if isinstance(n, ast.Assign) else [getattr(n, "target", None)])
        if isinstance(n, ast.ClassDef) or isinstance(t, ast.Name)
    }
    public = {n for n in moda.__all__}
    assert public <= stubbed, public - stubbed
    for cls in (moda.Model, moda.Description, moda.Attribute, moda.Timings, moda.TokenStream):
        stub_cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
        stub_members = {n.name for n in stub_cls.body if isinstance(n, ast.FunctionDef)}
        real = {m for m in dir(cls) if not m.startswith("_")}
        assert real <= stub_members, (cls.__name__, real - stub_members)
        assert cls.__doc__


@pytest.fixture(scope="module")
def schema_model(schema_bundle):
    return moda.Model(schema_bundle)


@pytest.mark.parametrize("constrain", ["auto", "schema", "none"])
def test_constrain_keyword_matches_the_cli_flag(schema_model, cli, schema_bundle, constrain):
    path = IMAGES / "photo.jpg"
    want = run_cli(cli, schema_bundle, "describe", [path], "--constrain", constrain)[str(path)]
    d = schema_model.describe(path, constrain=constrain)
    assert d.token_ids == want["token_ids"]
    assert d.text == want["description"]
    assert schema_model.describe_batch([path], constrain=constrain)[0].token_ids == want["token_ids"]
    # The decoder runs the CLI's record counts: under the schema fewer than the tokens (forced
    # text goes in with the token before it), each asking for the allowed tokens' logits only.
    assert d.timings.decoder_runs == want["timings_ms"]["decoder_runs"]
    assert d.timings.listed_runs == want["timings_ms"]["listed_runs"]
    assert d.to_dict()["timings_ms"]["listed_runs"] == d.timings.listed_runs
    if constrain == "none":
        assert d.timings.listed_runs == 0
        assert d.timings.decoder_runs == len(d.token_ids)
    else:
        assert 0 < d.timings.decoder_runs < len(d.token_ids)
        assert d.timings.listed_runs == d.timings.decoder_runs
    stream = schema_model.stream(path, constrain=constrain)
    pieces = list(stream)
    assert stream.result.token_ids == want["token_ids"]
    assert len(pieces) == len(want["token_ids"])
    if constrain == "auto":
        # The default.
        assert schema_model.describe(path).token_ids == want["token_ids"]


def test_constrain_takes_auto_schema_or_none(model):
    path = IMAGES / "photo.jpg"
    for bad in ["free", "AUTO", "", None, 1, True]:
        with pytest.raises(ValueError, match="constrain"):
            model.describe(path, constrain=bad)
        with pytest.raises(ValueError, match="constrain"):
            model.describe_batch([path], constrain=bad)
        with pytest.raises(ValueError, match="constrain"):
            model.stream(path, constrain=bad)
    # On a bundle without a schema, "auto" and "none" both write free text.
    assert model.describe(path, constrain="none").token_ids == model.describe(path).token_ids


def test_attributes_and_their_alternatives_equal_the_cli(schema_model, model, cli, schema_bundle):
    paths = [IMAGES / "photo.jpg", IMAGES / "wide.png"]
    alternatives = 0
    for constrain in ["auto", "none"]:
        records = run_cli(cli, schema_bundle, "describe", paths, "--constrain", constrain)
        for path, d in zip(paths, schema_model.describe_batch(paths, constrain=constrain)):
            want = records[str(path)]["attributes"]
            attrs = d.attributes
            # Every field of the schema, in template order.
            assert list(attrs) == ["Head", "Tail"]
            if path.name == "photo.jpg":
                # The photo's free description is the catalog's first row.
                assert attrs["Head"] is not None, (constrain, d.text)
            for field, a in attrs.items():
                w = want[field]
                if w is None:
                    assert a is None, (field, a)
                    continue
                assert isinstance(a, moda.Attribute)
                assert a.value == w["value"] and str(a) == a.value
                assert a.confidence == pytest.approx(w["confidence"], rel=1e-6)
                assert isinstance(a.alternatives, list)
                for alt in a.alternatives:
                    assert isinstance(alt, tuple) and len(alt) == 2
                    assert isinstance(alt[0], str) and isinstance(alt[1], float)
                assert [v for v, _ in a.alternatives] == [v for v, _ in w["alternatives"]]
                np.testing.assert_allclose(
                    [c for _, c in a.alternatives], [c for _, c in w["alternatives"]], rtol=1e-6
                )
                alternatives += len(a.alternatives)
                assert repr(a).startswith("Attribute(value=")
                assert a.to_dict() == {
                    "value": a.value,
                    "confidence": a.confidence,
                    "alternatives": a.alternatives,
                }
            as_dict = d.to_dict()["attributes"]
            assert list(as_dict) == ["Head", "Tail"]
            assert as_dict == {k: (a.to_dict() if a else None) for k, a in attrs.items()}
    # The schema's Head field has other values ("Navy", a prefix of the head): the SDK
    # reports them as alternatives.
    assert alternatives > 0
    # A new dict on each access: the description itself does not change.
    d = schema_model.describe(paths[0])
    d.attributes.clear()
    assert list(d.attributes) == ["Head", "Tail"]
    # Without a schema: no attributes.
    d = model.describe(paths[0])
    assert d.attributes is None
    assert "attributes" not in d.to_dict()
