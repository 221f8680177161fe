"""Type stubs of the ``moda._native`` extension module (re-exported by ``moda``)."""

import os
from typing import Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Union, overload

import numpy as np
import numpy.typing as npt

try:  # Pillow is optional: PIL images are accepted when it is installed.
    from PIL.Image import Image as _PILImage
except ImportError:  # pragma: no cover
    _PILImage = object  # type: ignore[misc,assignment]

__version__: str
MAX_BATCH: int
"""Images per encoder and decoder run; longer lists are split into runs of this size."""

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, "_PILImage", npt.NDArray[np.uint8]]
"""An image: a path (``str`` or ``os.PathLike``), an encoded file in memory (``bytes``), a
``PIL.Image.Image`` (converted to RGB) or a numpy ``uint8`` array of shape ``(H, W, 3)`` (RGB,
read in place when C-contiguous: do not modify it during the call)."""

class ModaError(Exception):
    """Base class of every error MODA raises; its message is MODA's."""

class ImageError(ModaError):
    """An image could not be read, decoded or preprocessed (the message names it)."""

class BundleError(ModaError):
    """The bundle directory, its moda.json or one of its files is missing or wrong."""

class RuntimeNotFoundError(ModaError):
    """The ONNX Runtime shared library could not be found or loaded (the message lists every
    place tried)."""

class OnnxRuntimeError(ModaError):
    """ONNX Runtime refused a graph or a session setting, or failed while running a graph."""

class InvalidArgumentError(ModaError):
    """An argument is out of range (generation options, an empty batch, ...)."""

class Timings:
    """Where the time of a description went, in milliseconds. In a batch every image reports
    the batch's times, except ``tokens`` and ``decode_ms``, which are the image's own."""

    @property
    def preprocess_ms(self) -> float:
        """Decoding and preprocessing the image(s)."""
    @property
    def encoder_ms(self) -> float:
        """The image encoder."""
    @property
    def projector_ms(self) -> float:
        """The projector."""
    @property
    def prefill_ms(self) -> float:
        """The decoder over the image prefix and the BOS."""
    @property
    def decode_ms(self) -> float:
        """The decoder steps after the prefill."""
    @property
    def total_ms(self) -> float:
        """The whole call."""
    @property
    def tokens(self) -> int:
        """Tokens generated."""
    @property
    def decoder_runs(self) -> int:
        """Decoder runs: the prefill and each step after it (a step that feeds several forced
        tokens counts once; under beam search, the batch's steps)."""
    @property
    def listed_runs(self) -> int:
        """Runs of the batch that computed the logits of the tokens the caption schema allowed
        only (constrained decoding)."""
    @property
    def step_ms(self) -> List[float]:
        """Each decoder step after the prefill, in order (under beam search, the batch's)."""
    def to_dict(self) -> dict:
        """The timings as a plain dict (without ``step_ms``)."""

Constrain = Literal["auto", "schema", "none"]
"""Whether a description must fit the bundle's caption schema: ``"auto"`` (the default)
constrains it to the schema when the bundle has one (it then always fits the template, with
values the catalog knows), ``"schema"`` requires that (an error for a bundle without a
schema), ``"none"`` lets the model write free text (the only way to get a value the catalog
never had). Any other value is a ``ValueError``."""

class Attribute:
    """One field of a description read with the bundle's caption schema."""

    @property
    def value(self) -> str:
        """The value, as the description writes it."""
    @property
    def confidence(self) -> Optional[float]:
        """The probability of the value's tokens given everything before them (``None`` when
        they could not be told apart); not normalised over the field's other values."""
    @property
    def alternatives(self) -> List[Tuple[str, float]]:
        """The field's next most likely values with their probabilities, most likely first,
        as ``(value, confidence)`` tuples; empty when none are known."""
    def to_dict(self) -> dict:
        """``value``, ``confidence``, ``alternatives`` (as in ``moda-sdk describe --json``'s
        ``attributes``)."""

class Description:
    """A generated description."""

    @property
    def text(self) -> str:
        """The text, special tokens removed."""
    @property
    def attributes(self) -> Optional[Dict[str, Optional[Attribute]]]:
        """Every field of the bundle's caption schema, in template order, with its
        :class:`Attribute`, or ``None`` where the text yields no value the schema knows;
        ``None`` for a bundle without a schema. A new dict on each access."""
    @property
    def finish(self) -> str:
        """Why generation ended: ``"end_of_text"`` (complete), ``"stop_string"``,
        ``"length"`` (``max_new_tokens`` cut the text: it may stop mid-caption, with the
        schema's later fields ``None``) or ``"stopped"``."""
    @property
    def token_ids(self) -> List[int]:
        """The generated tokens, the final ``</s>`` included when one was generated."""
    @property
    def logprobs(self) -> List[float]:
        """The log-probability of each generated token."""
    @property
    def timings(self) -> Timings:
        """Where the time went."""
    def embedding(self, normalize: bool = False) -> "np.ndarray":
        """The image's embedding, computed on the way to this description: ``float32``,
        shape ``(embedding_dim,)``, L2-normalised when ``normalize`` is true; equal to
        :meth:`Model.embed`'s row for the image (batched as this description was), without
        running the encoder again."""
    def to_dict(self) -> dict:
        """``text``, ``attributes`` (with a schema only: each a dict, or ``None``),
        ``finish``, ``token_ids``, ``logprobs``, ``timings_ms`` (the keys of ``moda-sdk
        describe --json``, without ``image``)."""

class TokenStream(Iterator[str]):
    """The text pieces of a description as they are generated, one ``str`` per generated
    token (``</s>`` gives ``""``); the pieces add up to the description's text."""

    def __iter__(self) -> "TokenStream": ...
    def __next__(self) -> str: ...
    @property
    def result(self) -> Optional[Description]:
        """The whole description once the iteration has ended, else ``None``."""

class Model:
    """An opened MODA bundle: describes and embeds product images with ONNX Runtime on the
    CPU. One ``Model`` may be used from many Python threads: ONNX Runtime runs with the GIL
    released."""

    def __init__(
        self,
        bundle: Union[str, os.PathLike],
        threads: Optional[int] = None,
        sessions: int = 1,
        verify_checksums: bool = False,
        embeddings_only: bool = False,
    ) -> None:
        """Opens ``bundle`` (the directory ``exporter onnx`` wrote).

        ``threads``: threads ONNX Runtime uses inside one graph run (default: the cores the
        process may use, at most 8, divided among the sessions). ``sessions``: the most ONNX
        Runtime session sets, each a copy of the weights, that calls from different threads
        use at once (with 1 they take turns). ``verify_checksums``: check every file's SHA-256
        against ``moda.json``. ``embeddings_only``: build only the image side (the encoder and
        the projector), which opens in about half the time and memory; :meth:`describe` and
        :meth:`stream` then raise :class:`InvalidArgumentError`. Raises :class:`BundleError`
        or :class:`RuntimeNotFoundError`.
        """
    def describe(
        self,
        image: ImageLike,
        *,
        max_new_tokens: Optional[int] = None,
        min_new_tokens: int = 0,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        seed: int = 0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        length_penalty: float = 1.0,
        stop_strings: Union[str, Sequence[str], None] = None,
        constrain: Constrain = "auto",
    ) -> Description:
        """Describes one image (greedy search unless the keywords say otherwise;
        ``max_new_tokens`` defaults to the bundle's). ``constrain``: see :data:`Constrain`
        (a ``ValueError`` unless ``"auto"``, ``"schema"`` or ``"none"``)."""
    @overload
    def describe_batch(
        self,
        images: Union[Sequence[ImageLike], npt.NDArray[np.uint8]],
        *,
        errors: Literal["raise"] = "raise",
        max_new_tokens: Optional[int] = None,
        min_new_tokens: int = 0,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        seed: int = 0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        length_penalty: float = 1.0,
        stop_strings: Union[str, Sequence[str], None] = None,
        constrain: Constrain = "auto",
    ) -> List[Description]: ...
    @overload
    def describe_batch(
        self,
        images: Union[Sequence[ImageLike], npt.NDArray[np.uint8]],
        *,
        errors: Literal["return"],
        max_new_tokens: Optional[int] = None,
        min_new_tokens: int = 0,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        seed: int = 0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        length_penalty: float = 1.0,
        stop_strings: Union[str, Sequence[str], None] = None,
        constrain: Constrain = "auto",
    ) -> List[Union[Description, ModaError]]:
        """Describes a list or tuple of images (or a uint8 array of shape ``(N, H, W, 3)``)
        in batches of at most ``MAX_BATCH``; one ``Description`` per image, in order. With
        ``errors="raise"`` the first image that fails raises; with ``errors="return"`` its
        place holds the exception and the others go on. Keywords as in :meth:`describe`."""
    def stream(
        self,
        image: ImageLike,
        *,
        max_new_tokens: Optional[int] = None,
        min_new_tokens: int = 0,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        seed: int = 0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        length_penalty: float = 1.0,
        stop_strings: Union[str, Sequence[str], None] = None,
        constrain: Constrain = "auto",
    ) -> TokenStream:
        """Streams one image's description: an iterator over text pieces, produced as the
        model generates them on a background thread (with beam search they come at the end).
        Dropping the iterator early stops the generation. Keywords as in :meth:`describe`."""
    @overload
    def embed(
        self,
        images: Union[ImageLike, Sequence[ImageLike]],
        normalize: bool = False,
        *,
        errors: Literal["raise"] = "raise",
    ) -> npt.NDArray[np.float32]: ...
    @overload
    def embed(
        self,
        images: Union[ImageLike, Sequence[ImageLike]],
        normalize: bool = False,
        *,
        errors: Literal["return"],
    ) -> Tuple[npt.NDArray[np.float32], List[Optional[ModaError]]]:
        """Image embeddings, ``float32`` of shape ``(n, embedding_dim)``, L2-normalised when
        ``normalize``. ``images``: a list or tuple, a uint8 array ``(N, H, W, 3)``, or one
        image (``n == 1``). With ``errors="raise"`` the first image that fails raises; with
        ``errors="return"`` the result is ``(array, errors)``: a failed image's row is NaN
        and its place in ``errors`` holds the exception (``None`` for the others)."""
    @property
    def bundle(self) -> str:
        """The bundle directory."""
    @property
    def threads(self) -> int:
        """Threads ONNX Runtime uses inside one graph run."""
    @property
    def sessions(self) -> int:
        """Most ONNX Runtime session sets used at once."""
    @property
    def attribute_names(self) -> Optional[List[str]]:
        """The fields of the bundle's caption schema in template order (the keys of every
        description's ``attributes``); ``None`` for a bundle without a schema."""
    @property
    def embedding_dim(self) -> int:
        """Length of an image embedding."""
    @property
    def max_new_tokens(self) -> int:
        """The bundle's default ``max_new_tokens``."""
