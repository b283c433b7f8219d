import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the user cache (generated data, base-model verdicts) of a test session is its own, never the user's
os.environ["SALUN_DIFFUSERS_CACHE"] = __import__("tempfile").mkdtemp(prefix="salun-test-cache-")
__import__("atexit").register(__import__("shutil").rmtree, os.environ["SALUN_DIFFUSERS_CACHE"], True)

import pytest  # noqa: E402
import torch  # noqa: E402

from salun_diffusers.data import default_data_dir  # noqa: E402

# Tiny models gain nothing from intra-op threads, and OpenMP threads spin badly when the other core is busy
# (measured: 21 ms vs 382 ms per tiny U-Net forward, 1 vs 2 threads, with a second job running).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir():
    """../shared/data (the project's test data); tests using it skip where it is absent."""
    path = default_data_dir()
    if path is None or not os.path.isdir(path):
        pytest.skip("shared test data (../shared/data) not available")
    return path


@pytest.fixture(scope="session")
def dummy_pipeline_dir(tmp_path_factory):
    from salun_diffusers.testing import save_dummy_pipeline

    return save_dummy_pipeline(str(tmp_path_factory.mktemp("pipe") / "tiny-sd"))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One image cache for all erasure runs in the session (generated once, reused)."""
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture
def erase_config(dummy_pipeline_dir, data_cache, tmp_path):
    """A seconds-long EraseConfig on the tiny pipeline; pass overrides as keyword arguments."""
    from salun_diffusers.config import EraseConfig

    def make(**overrides):
        kw = dict(pretrained_model_name_or_path=dummy_pipeline_dir, concept="nudity", output_dir=str(tmp_path / "out"),
                  cache_dir=data_cache, num_forget_images=4, num_retain_images=4, data_num_inference_steps=2,
                  max_train_steps=3, train_batch_size=2, learning_rate=1e-2, adam_weight_decay=0.1, seed=0)
        kw.update(overrides)
        return EraseConfig(**kw)

    return make


@pytest.fixture
def killed_and_resumed(erase_config, tmp_path):
    """``run(**kw)``: an erasure checkpointing every 2 steps, killed after its last checkpoint (its final outputs
    dropped) and resumed from the latest one; returns the resumed run's EraseResult."""
    from salun_diffusers.erase import erase
    from salun_diffusers.testing import drop_final_outputs

    def run(**kw):
        cfg = erase_config(output_dir=str(tmp_path / "resumed"), checkpointing_steps=2, **kw)
        erase(cfg)
        drop_final_outputs(cfg.output_dir)
        return erase(erase_config(output_dir=cfg.output_dir, resume_from_checkpoint="latest", **kw))

    return run


@pytest.fixture
def resumed_equals_full(erase_config, killed_and_resumed, tmp_path):
    """``check(**kw)``: whether the :func:`killed_and_resumed` erasure's U-Net equals an uninterrupted run's, bit for
    bit (every parameter ``torch.equal``)."""
    import torch

    from salun_diffusers.erase import erase

    def check(**kw):
        full = erase(erase_config(output_dir=str(tmp_path / "full"), **kw))
        a, b = dict(full.unet.named_parameters()), dict(killed_and_resumed(**kw).unet.named_parameters())
        return all(torch.equal(a[n].detach(), b[n].detach()) for n in a)

    return check
