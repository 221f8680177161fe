"""MODA: short descriptions and embeddings of fashion product photos.

MODA runs an exported bundle (the directory ``exporter onnx`` writes) with ONNX Runtime on the
CPU, through the Rust SDK::

    import moda
    model = moda.Model("demo/bundle")
    d = model.describe("shirt.jpg")            # a path, bytes, a PIL image or a numpy array
    print(d.text, d.token_ids, d.logprobs, d.timings.total_ms)
    d.attributes["Colour"].value               # with the bundle's caption schema
    for piece in model.stream("shirt.jpg"):    # the text as it is generated
        print(piece, end="", flush=True)
    emb = model.embed(["a.jpg", "b.jpg"], normalize=True)   # numpy float32, shape (2, d)

Generation keywords are named as in ``transformers``' ``generate``: ``max_new_tokens``,
``min_new_tokens``, ``num_beams``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
``seed``, ``repetition_penalty``, ``no_repeat_ngram_size``, ``length_penalty`` (greedy search
by default); ``constrain="auto"|"schema"|"none"`` says whether the description must fit the
bundle's caption schema (``"auto"``: when the bundle has one).

ONNX Runtime runs with the GIL released: Python threads may share one ``Model``. Errors are
subclasses of :class:`ModaError` carrying MODA's message.
"""

from ._native import (
    MAX_BATCH,
    Attribute,
    BundleError,
    Description,
    ImageError,
    InvalidArgumentError,
    ModaError,
    Model,
    OnnxRuntimeError,
    RuntimeNotFoundError,
    Timings,
    TokenStream,
    __version__,
)

__all__ = [
    "MAX_BATCH",
    "Attribute",
    "BundleError",
    "Description",
    "ImageError",
    "InvalidArgumentError",
    "ModaError",
    "Model",
    "OnnxRuntimeError",
    "RuntimeNotFoundError",
    "Timings",
    "TokenStream",
    "__version__",
]
