"""Loading: a model id that is no folder, no model, offline, unreachable, gated or unknown says so in one line."""
import re
import time

import pytest
import torch

from conftest import run_script
from harness import errors, hub


@pytest.fixture
def online_hub(monkeypatch):
    """huggingface_hub as if online: offline mode off, and model_info answering for every id unless a test says else."""
    import huggingface_hub
    import huggingface_hub.constants
    import huggingface_hub.errors
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda model_id, timeout: None)
    hub._hub_unreachable.cache_clear()
    yield huggingface_hub
    hub._hub_unreachable.cache_clear()


def http_error(kind: type) -> Exception:
    import httpx2
    return kind("403 Client Error", response=httpx2.Response(403, request=httpx2.Request("GET", "https://huggingface.co/x")))


def never_called(model_id, **kwargs):
    raise AssertionError("loaded although the hub's answer decided it")


@pytest.mark.parametrize("model_id", ["/tmp/no-such-folder", "data/tiny/no-such-model", "./model", "~/model"])
def test_a_folder_that_does_not_exist_says_so(model_id):
    with pytest.raises(errors.UserError, match=f"^--model_id={re.escape(model_id)}: no such folder"):
        hub._from_hub(never_called, model_id)


def test_a_folder_without_a_model_says_so(tmp_path):
    with pytest.raises(errors.UserError, match=f"^the folder --model_id={tmp_path} holds no model"):
        hub.load_tokenizer(str(tmp_path))


def test_offline_mode_and_an_uncached_id():
    from transformers import AutoTokenizer  # the tests run with HF_HUB_OFFLINE=1 (conftest)
    with pytest.raises(errors.UserError, match="^nobody/no-such-model is neither a folder here nor in the local "
                                            "Hugging Face cache, and HF_HUB_OFFLINE is set: unset it"):
        hub._from_hub(AutoTokenizer.from_pretrained, "nobody/no-such-model")


def test_no_network_fails_at_once_without_retries(tmp_path):
    """No answer from the hub (here a closed port): one line after one request, where downloads retried ~50 s."""
    start = time.perf_counter()
    result = run_script("experiment.py", "--model_id=nobody/no-such-model", "--device=cpu",
                        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)})
    assert result.returncode == 1 and "Traceback" not in result.stderr and "Retry" not in result.stderr + result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert re.fullmatch(r"error: cannot reach http://127\.0\.0\.1:9 \(ConnectError: .*\), "
                        r"and nobody/no-such-model is not in the local Hugging Face cache: connect to the network, "
                        r"or set --model_id to a local model folder \(python tiny.py builds a tiny one\)", line)
    assert "HF_HUB_OFFLINE=1 skips this check" in result.stdout
    assert time.perf_counter() - start < 40


def test_no_network_loads_a_cached_model_from_the_cache(online_hub, monkeypatch, capsys):
    def unreachable(model_id, timeout):
        raise ConnectionError("no route to host")
    monkeypatch.setattr(online_hub, "model_info", unreachable)
    assert hub._from_hub(lambda model_id, **kwargs: kwargs, "someone/cached") == {"local_files_only": True}
    assert hub._from_hub(lambda model_id, **kwargs: kwargs, "someone/cached") == {"local_files_only": True}
    assert capsys.readouterr().out.count("cache only (HF_HUB_OFFLINE=1 skips this check)") == 1  # said once


def test_a_gated_model_says_so(online_hub):
    def gated(model_id, **kwargs):
        raise OSError("You are trying to access a gated repo.") from http_error(online_hub.errors.GatedRepoError)
    with pytest.raises(errors.UserError, match="^meta-llama/Llama-3.2-1B-Instruct is gated and this machine "
                                            "has no access: accept its license on "
                                            "https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct"):
        hub._from_hub(gated, "meta-llama/Llama-3.2-1B-Instruct")


def test_an_id_the_hub_does_not_know_says_so(online_hub, monkeypatch):
    def unknown(model_id, timeout):
        raise http_error(online_hub.errors.RepositoryNotFoundError)
    monkeypatch.setattr(online_hub, "model_info", unknown)
    with pytest.raises(errors.UserError,
                       match="^no folder nobody/nothing here and no model nobody/nothing on huggingface.co"):
        hub._from_hub(never_called, "nobody/nothing")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu():
    with pytest.raises(errors.UserError, match="torch sees no CUDA GPU"):
        hub.resolve_device("cuda")
