"""Fixtures of the `moda` package's tests.

The tests run the package against a bundle exported from the repository's test fixtures
(tests/fixtures: random weights of a small CLIP encoder and OPT decoder, the recipe's
checkpoint layout) and compare it with the `moda-sdk` command line on the same bundle. Both
binaries come from the repository's cargo build (`scripts/test_python.sh` builds them); the
environment variables MODA_EXPORTER and MODA_CLI name other ones.
"""

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / "tests" / "fixtures"
IMAGES = FIXTURES / "images"


def _binary(env: str, name: str) -> Path:
    path = Path(os.environ.get(env) or REPO / "target" / "debug" / name)
    if not path.is_file():
        # Missing binaries are a broken test setup, never a reason to skip.
        raise RuntimeError(
            f"{path} not found: build it with `cargo build -p exporter -p moda-cli` "
            f"(or set {env})"
        )
    return path


@pytest.fixture(scope="session")
def cli() -> Path:
    return _binary("MODA_CLI", "moda-sdk")


def _export(out: Path, *extra: str) -> Path:
    """The recipe fixture (tests/fixtures/moda/fashion_opt.pth with the clip_gelu encoder and
    the opt_preln decoder) exported to ``out`` by the ``exporter`` binary, with ``extra``
    options."""
    exporter = _binary("MODA_EXPORTER", "exporter")
    subprocess.run(
        [
            str(exporter), "onnx",
            "--checkpoint", str(FIXTURES / "moda" / "fashion_opt.pth"),
            "--encoder", str(FIXTURES / "clip_gelu"),
            "--decoder", str(FIXTURES / "opt_preln"),
            *extra,
            "--out", str(out),
        ],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """The recipe fixture (tests/fixtures/moda/fashion_opt.pth with the clip_gelu encoder
    and the opt_preln decoder) exported to ONNX once per test session, as the Rust tests of
    the SDK's command line do."""
    return _export(tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture(scope="session")
def schema_bundle(cli, bundle, tmp_path_factory) -> Path:
    """The same fixture exported with a caption schema (``--caption-template "{Head} {Tail}"
    --catalog CSV``) as the Rust tests of the command line make it: the catalog's rows are the
    photo's own free description split at its first space, plus decoys (a prefix of the head,
    values the model never writes), so that descriptions have attributes."""
    photo = IMAGES / "photo.jpg"
    text = run_cli(cli, bundle, "describe", [photo], "--constrain", "none")[str(photo)][
        "description"
    ]
    head, tail = text.strip().split(" ", 1)
    out = tmp_path_factory.mktemp("schema")
    catalog = out / "catalog.csv"
    with open(catalog, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Head", "Tail", "Other"])
        w.writerows(
            [[head, tail, "a"], [head, tail, "b"], [head[:2], "zzz", "c"], ["Navy", "never written", "d"]]
        )
    return _export(
        out / "bundle", "--caption-template", "{Head} {Tail}", "--catalog", str(catalog),
        "--no-verify",
    )


@pytest.fixture(scope="session")
def model(bundle):
    import moda

    return moda.Model(bundle)


def run_cli(cli: Path, bundle: Path, command: str, images, *flags) -> dict:
    """`moda-sdk COMMAND --json` on `images`: its records keyed by the image path."""
    out = subprocess.run(
        [str(cli), command, "--model", str(bundle), "--json", "--quiet", *flags]
        + [str(p) for p in images],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {r["image"]: r for r in records}
