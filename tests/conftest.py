"""Test setup: 8 simulated CPU devices, no hub access, float32 matmuls at full precision,
a session-wide XLA compilation cache.

The environment variables must be set before jax is imported anywhere, which is why
this happens at import time of the conftest (pytest imports it first).
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One XLA compilation cache for the whole session (subprocesses read the same variables):
# many tests compile the same tiny-model programs; reusing them keeps the suite fast.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="qzhou-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _root_log_handlers_do_not_outlive_a_test():
    """The CLI's logging.basicConfig binds a handler to the sys.stderr of its first call, which
    is pytest's capture file in a test; remove it after the test, or later tests that log
    through the CLI write to a closed file."""
    import logging

    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for h in root.handlers[:]:
        if h not in before:
            root.removeHandler(h)


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data; skips the test when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA} (only present in the project workspace)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2 HF folder (transformers' own save) with the demo tokenizer."""
    import shutil as _shutil

    from hf_utils import save_hf, tiny_hf_model
    from qzhou_jax.tokenizer import DEMO_TOKENIZER

    path = tmp_path_factory.mktemp("hf") / "model"
    save_hf(tiny_hf_model(vocab=2048, hidden=32, layers=2), path)
    for f in os.listdir(DEMO_TOKENIZER):
        _shutil.copy(os.path.join(DEMO_TOKENIZER, f), path / f)
    return path
