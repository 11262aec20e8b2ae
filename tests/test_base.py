"""Tests for mergekit_cd.base (lazy base model) and mergekit_cd.hub (references, hub cache)."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_cd import hub
from mergekit_cd.base import BaseModel, kv_fingerprint, layer_order, open_base
from mergekit_cd.errors import MergeError

from hubcache import COMMIT, add_to_hub_cache, use_hub_cache

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
EXPECTED = {"sd1": ((64,), 64), "sd2": ((96,), 96), "sdxl": ((64, 96), 160)}


def _real_unet_kv(folder: Path) -> dict[str, torch.Tensor]:
    """K/V weights of the UNet as diffusers itself loads it (the reference for the lazy reader)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    return {name: tensor for name, tensor in unet.state_dict().items()
            if ".attn2.to_k." in name or ".attn2.to_v." in name}


def _copy_pipeline(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _rewrite_unet(folder: Path, change) -> None:
    """Replace the UNet weights file by ``change(state_dict, unet_folder)``'s output files."""
    state = load_file(folder / UNET_FILE)
    (folder / UNET_FILE).unlink()
    change(state, folder / "unet")


def _save_fp16(state, unet: Path) -> None:
    """Write the weights as diffusers writes the fp16 variant: ``.half()`` of every tensor."""
    save_file({name: tensor.half() for name, tensor in state.items()},
              unet / "diffusion_pytorch_model.fp16.safetensors")


# --- architecture, layers, K/V -------------------------------------------------------------

@pytest.mark.parametrize("architecture", ["sd1", "sd2", "sdxl"])
def test_detects_architecture_and_sizes(tiny_pipeline_path, architecture):
    base = open_base(tiny_pipeline_path(architecture))
    token_dims, context_dim = EXPECTED[architecture]
    assert base.architecture.name == architecture
    assert base.token_dims() == token_dims
    assert base.context_dim == context_dim
    assert base.name == str(tiny_pipeline_path(architecture))


@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_layers_shapes_and_weights_equal_the_real_unet(tiny_pipeline_path, architecture):
    folder = tiny_pipeline_path(architecture)
    real = _real_unet_kv(folder)
    base = open_base(folder)
    layers = base.layer_names()
    assert sorted(f"{layer}.to_{kind}.weight" for layer in layers for kind in "kv") == sorted(real)
    for layer, (key_shape, value_shape) in base.kv_shapes().items():
        assert key_shape == real[f"{layer}.to_k.weight"].shape
        assert value_shape == real[f"{layer}.to_v.weight"].shape
    for layer in layers:
        key, value = base.kv(layer)
        assert key.dtype == value.dtype == torch.float32
        assert torch.equal(key, real[f"{layer}.to_k.weight"])
        assert torch.equal(value, real[f"{layer}.to_v.weight"])


def test_layer_order_is_down_mid_up_and_deterministic(tiny_pipeline_path):
    layers = open_base(tiny_pipeline_path("sdxl")).layer_names()
    assert layers == open_base(tiny_pipeline_path("sdxl")).layer_names()
    assert layers == sorted(layers, key=layer_order)
    blocks = [layer.split(".")[0] for layer in layers]
    assert blocks == sorted(blocks, key=["down_blocks", "mid_block", "up_blocks"].index)
    assert "mid_block.attentions.0.transformer_blocks.1.attn2" in layers
    assert layer_order("down_blocks.2.attentions.0") < layer_order("down_blocks.10.attentions.0")


def test_merge_style_access_never_builds_the_unet(tiny_pipeline_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    def refuse(*args, **kwargs):
        raise AssertionError("the UNet must not be instantiated")

    monkeypatch.setattr(UNet2DConditionModel, "__init__", refuse)
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", refuse)
    base = open_base(tiny_pipeline_path("sd1"))
    base.kv_shapes()
    for layer in base.layer_names():
        base.kv(layer)
    assert len(base.fingerprint) == 64
    assert len(base.load_tokenizers()) == 1 and base.load_text_encoder(0).config.hidden_size == 64


def test_a_layer_read_again_is_not_read_from_disk_again(tiny_pipeline_path, monkeypatch):
    """A merge of full-weight inputs asks for the base's layer once per input: the file is opened
    once per layer, not once per input."""
    import mergekit_cd.base as base_module

    base = open_base(tiny_pipeline_path("sd1"))
    first, second = base.layer_names()[:2]
    opened = []
    real_open = base_module.safe_open
    monkeypatch.setattr(base_module, "safe_open",
                        lambda *args, **kwargs: opened.append(args[0]) or real_open(*args, **kwargs))
    pairs = [base.kv(first) for _ in range(3)]
    assert len(opened) == 1 and all(torch.equal(a, b) for pair in pairs for a, b in zip(pair, pairs[0]))
    base.kv(second), base.kv(first)
    assert len(opened) == 3


def test_unknown_layer_is_a_merge_error(tiny_pipeline_path):
    with pytest.raises(MergeError, match="no cross-attention layer down_blocks.9"):
        open_base(tiny_pipeline_path("sd1")).kv("down_blocks.9.attn2")


# --- fingerprint and weight layouts ----------------------------------------------------------

def test_fingerprint_is_stable_and_order_free(tiny_pipeline_path):
    folder = tiny_pipeline_path("sd1")
    base = open_base(folder)
    assert base.fingerprint == open_base(folder).fingerprint
    real = _real_unet_kv(folder)
    triples = [(layer, real[f"{layer}.to_k.weight"], real[f"{layer}.to_v.weight"])
               for layer in base.layer_names()]
    assert kv_fingerprint(reversed(triples)) == base.fingerprint


def test_fingerprint_changes_when_one_key_weight_changes(tiny_pipeline_path, tmp_path):
    folder = _copy_pipeline(tiny_pipeline_path("sd1"), tmp_path / "changed")
    layer = open_base(folder).layer_names()[3]

    def nudge(state, unet):
        state[f"{layer}.to_k.weight"][0, 0] += 1.0
        save_file(state, unet / "diffusion_pytorch_model.safetensors")

    _rewrite_unet(folder, nudge)
    assert open_base(folder).fingerprint != open_base(tiny_pipeline_path("sd1")).fingerprint


def test_fp16_variant_reads_and_has_the_same_fingerprint(tiny_pipeline_path, tmp_path):
    original = open_base(tiny_pipeline_path("sdxl"))
    folder = _copy_pipeline(tiny_pipeline_path("sdxl"), tmp_path / "fp16")
    _rewrite_unet(folder, _save_fp16)
    base = open_base(folder)
    assert base.fingerprint == original.fingerprint
    layer = base.layer_names()[0]
    key, _ = base.kv(layer)
    assert key.dtype == torch.float32
    assert torch.equal(key, original.kv(layer)[0].half().float())


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for name in ("tokenizer", "text_encoder") for p in (folder / name).rglob("*") if p.is_file())


def _counting_reads(monkeypatch) -> list[str]:
    """The files :mod:`mergekit_cd.fileio` opens from now on, by resolved path."""
    import builtins

    from mergekit_cd import fileio

    opened: list[str] = []

    def counting_open(file, *args, **kwargs):
        opened.append(str(Path(file).resolve()))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(fileio, "open", counting_open, raising=False)
    return opened


def test_text_fingerprint_remembers_each_file_by_its_stat_and_reads_a_changed_one_again(
        tiny_pipeline_path, tmp_path, monkeypatch):
    """With a memo folder, a second base reads none of its text files (it stats them), and a file
    rewritten with the same size and its old modification time restored is read again and changes
    the fingerprint (its change time moved): what lets a cached merge skip hashing 0.5 GB."""
    from mergekit_cd import fileio

    monkeypatch.setattr(fileio, "RACY_NANOSECONDS", 0)  # the copy was just written; see the next test
    folder = _copy_pipeline(tiny_pipeline_path("sd1"), tmp_path / "base")
    memo = tmp_path / "cache"
    opened = _counting_reads(monkeypatch)
    first = open_base(folder).remembered_text_fingerprint(memo)
    assert first == open_base(folder).text_fingerprint
    files = _text_files(folder)
    assert len(files) > 2 and (memo / fileio.STAT_MEMO).is_file()
    opened.clear()
    assert open_base(folder).remembered_text_fingerprint(memo) == first
    assert opened == []

    vocabulary = folder / "tokenizer" / "vocab.json"
    before = vocabulary.stat()
    text = vocabulary.read_bytes()
    time.sleep(0.05)  # past a tick of the file system's clock, so that the change time moves
    vocabulary.write_bytes(text.replace(b"a", b"b", 1))
    os.utime(vocabulary, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (vocabulary.stat().st_size, vocabulary.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    opened.clear()
    changed = open_base(folder).remembered_text_fingerprint(memo)
    assert opened == [str(vocabulary.resolve())]
    assert changed != first and changed == open_base(folder).text_fingerprint


def test_a_text_file_written_just_now_is_not_remembered(tiny_pipeline_path, tmp_path, monkeypatch):
    """A file whose stat is younger than :data:`~mergekit_cd.fileio.RACY_NANOSECONDS` could be
    written again within the same clock tick, unseen by its stat: it is read on every call."""
    folder = _copy_pipeline(tiny_pipeline_path("sd1"), tmp_path / "base")
    open_base(folder).remembered_text_fingerprint(tmp_path / "cache")
    opened = _counting_reads(monkeypatch)
    open_base(folder).remembered_text_fingerprint(tmp_path / "cache")
    assert sorted(opened) == sorted(str(p.resolve()) for p in _text_files(folder))


def _save_sharded(state, unet, index_name="diffusion_pytorch_model.safetensors.index.json", infix=""):
    names = sorted(state)
    shards = {f"diffusion_pytorch_model{infix}-0000{i}-of-00002.safetensors": names[i - 1::2] for i in (1, 2)}
    for shard, keys in shards.items():
        save_file({key: state[key] for key in keys}, unet / shard)
    weight_map = {key: shard for shard, keys in shards.items() for key in keys}
    (unet / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_unet_reads_like_the_single_file(tiny_pipeline_path, tmp_path):
    original = open_base(tiny_pipeline_path("sd1"))
    folder = _copy_pipeline(tiny_pipeline_path("sd1"), tmp_path / "sharded")
    _rewrite_unet(folder, _save_sharded)
    base = open_base(folder)
    assert base.layer_names() == original.layer_names()
    assert base.kv_shapes() == original.kv_shapes()
    assert base.fingerprint == original.fingerprint
    for layer in base.layer_names():
        assert all(torch.equal(a, b) for a, b in zip(base.kv(layer), original.kv(layer)))


def test_sharded_unet_with_a_missing_shard_names_it(tiny_pipeline_path, tmp_path):
    folder = _copy_pipeline(tiny_pipeline_path("sd1"), tmp_path / "sharded")
    _rewrite_unet(folder, _save_sharded)
    (folder / "unet/diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MergeError, match="lacks unet/diffusion_pytorch_model-00002-of-00002.safetensors"):
        open_base(folder)


@pytest.mark.parametrize(("components", "unet", "activation", "expected"), [
    (("text_encoder",), {}, "quick_gelu", "sd1"),
    (("text_encoder",), {}, None, "sd1"),  # transformers' CLIP default
    (("text_encoder",), {}, "gelu", "sd2"),
    (("text_encoder", "text_encoder_2"), {"addition_embed_type": "text_time"}, "quick_gelu", "sdxl"),
    (("text_encoder", "text_encoder_2"), {"addition_embed_type": "text_time"}, "gelu", "sdxl"),
    (("text_encoder", "text_encoder_2"), {}, "quick_gelu", "sd1"),  # a second encoder alone is no SDXL
])
def test_the_architecture_is_the_most_specific_table_entry_whose_facts_the_configs_show(components, unet,
                                                                                        activation, expected):
    from mergekit_cd.architectures import detect_architecture

    encoder = {} if activation is None else {"hidden_act": activation}
    assert detect_architecture(dict.fromkeys(components, ["transformers", "CLIPTextModel"]), unet,
                               encoder).name == expected
    with pytest.raises(MergeError, match="has no text_encoder"):
        detect_architecture({"unet": ["diffusers", "UNet2DConditionModel"]}, unet, encoder)


# --- user errors on local folders --------------------------------------------------------------

def test_folder_without_model_index_is_refused_by_name(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(MergeError) as caught:
        open_base(tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message
    assert "diffusers Stable Diffusion folder" in message
    assert "model_index.json, unet/config.json" in message


def test_missing_unet_weights_and_text_encoder_reported_together(tiny_pipeline_path, tmp_path):
    folder = _copy_pipeline(tiny_pipeline_path("sd1"), tmp_path / "broken")
    (folder / UNET_FILE).unlink()
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(MergeError) as caught:
        open_base(folder)
    message = str(caught.value)
    assert str(folder) in message
    assert "text_encoder/config.json" in message
    assert "unet/diffusion_pytorch_model.safetensors" in message


def test_a_file_is_not_a_base(tiny_pipeline_path):
    with pytest.raises(MergeError, match="is a file"):
        open_base(tiny_pipeline_path("sd1") / "model_index.json")


def test_neither_path_nor_repo_id(tmp_path):
    with pytest.raises(MergeError, match="not a local file or folder, nor a Hugging Face repo id"):
        open_base(str(tmp_path / "absent" / "deeper" / "folder"))


# --- hub references and the cache -------------------------------------------------------------

@pytest.fixture(scope="module")
def hub_cache(tiny_pipeline_path, tmp_path_factory) -> Path:
    """A hub cache with a complete tiny SD1 repo, one without text_encoder, one fp16-only."""
    cache = tmp_path_factory.mktemp("hf-cache")
    sd1 = tiny_pipeline_path("sd1")
    add_to_hub_cache(cache, "org/tiny-sd1", sd1)
    add_to_hub_cache(cache, "org/no-text-encoder", sd1, skip=("text_encoder/",))
    fp16 = _copy_pipeline(sd1, tmp_path_factory.mktemp("fp16") / "pipeline")
    _rewrite_unet(fp16, _save_fp16)
    add_to_hub_cache(cache, "org/fp16-only", fp16)
    return cache


@pytest.fixture
def offline_hub(hub_cache, monkeypatch) -> Path:
    use_hub_cache(monkeypatch, hub_cache, offline=True)
    return hub_cache


def test_opens_a_repo_id_from_the_cache_offline(offline_hub, tiny_pipeline_path):
    base = open_base("org/tiny-sd1")
    local = open_base(tiny_pipeline_path("sd1"))
    assert base.name == "org/tiny-sd1"
    assert base.path == offline_hub / "models--org--tiny-sd1" / "snapshots" / COMMIT
    assert base.architecture.name == "sd1"
    assert base.fingerprint == local.fingerprint
    assert open_base(f"org/tiny-sd1@{COMMIT}").path == base.path
    assert open_base("org/tiny-sd1", revision="main").path == base.path
    assert len(base.load_tokenizers()) == 1 and base.load_text_encoder(0) is not None  # through the symlinks


def test_repo_not_in_cache_gives_one_clear_error(offline_hub):
    with pytest.raises(MergeError) as caught:
        open_base("org/absent")
    message = str(caught.value)
    assert "org/absent" in message
    assert str(offline_hub) in message
    assert "HF_HUB_OFFLINE" in message
    assert "download org/absent" in message and "HF_HUB_CACHE" in message


def test_cached_repo_missing_a_file_names_it(offline_hub):
    with pytest.raises(MergeError) as caught:
        open_base("org/no-text-encoder")
    message = str(caught.value)
    assert "org/no-text-encoder" in message
    assert "text_encoder/config.json" in message
    assert str(offline_hub) in message
    assert "download org/no-text-encoder" in message


def _record_patterns(monkeypatch) -> list[list[str]]:
    """Record the allow_patterns of every snapshot_download call hub.resolve makes."""
    asked: list[list[str]] = []
    real_download = hub.snapshot_download

    def recording(repo_id, **kwargs):
        asked.append(kwargs["allow_patterns"])
        return real_download(repo_id, **kwargs)

    monkeypatch.setattr(hub, "snapshot_download", recording)
    return asked


def test_falls_back_to_the_fp16_variant_of_that_component_only(offline_hub, tiny_pipeline_path, monkeypatch):
    asked = _record_patterns(monkeypatch)
    assert open_base("org/fp16-only").fingerprint == open_base(tiny_pipeline_path("sd1")).fingerprint
    assert len(asked) == 2
    added = set(asked[1]) - set(asked[0])
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in added
    assert not any(pattern.startswith("text_encoder") for pattern in added)


def test_fetches_only_what_a_merge_reads(offline_hub, tiny_pipeline_path, monkeypatch):
    asked = _record_patterns(monkeypatch)
    open_base("org/tiny-sd1")
    source = tiny_pipeline_path("sd1")
    files = [file.relative_to(source).as_posix() for file in source.rglob("*") if file.is_file()]
    fetched = {file for file in files if any(fnmatch.fnmatch(file, pattern) for pattern in asked[0])}
    assert len(asked) == 1  # plain weights were found: no second pass for the fp16 variant
    assert not any(file.startswith(("vae/", "scheduler/")) for file in fetched)
    assert {"model_index.json", "unet/config.json", UNET_FILE, "text_encoder/config.json",
            "text_encoder/model.safetensors", "tokenizer/vocab.json"} <= fetched


def test_unreachable_hub_without_offline_flag_uses_the_cache_quickly(hub_cache, monkeypatch):
    use_hub_cache(monkeypatch, hub_cache, offline=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    start = time.monotonic()
    assert open_base("org/tiny-sd1").architecture.name == "sd1"
    with pytest.raises(MergeError, match="cannot be reached") as caught:
        open_base("org/absent")
    assert "download org/absent" in str(caught.value)
    assert time.monotonic() - start < 2 * hub.PROBE_TIMEOUT_SECONDS


def test_local_paths_pass_through_resolve(tiny_pipeline_path):
    folder = tiny_pipeline_path("sd1")
    assert hub.resolve(str(folder)) == folder
    index = folder / "model_index.json"
    assert hub.resolve(str(index), allow_patterns=["*.json"]) == index


def test_repo_references_parse():
    assert hub.parse_repo_reference("org/name") == ("org/name", None)
    assert hub.parse_repo_reference("org/name@v1.0") == ("org/name", "v1.0")
    assert hub.parse_repo_reference("org/name", "dev") == ("org/name", "dev")
    with pytest.raises(MergeError, match="give it once"):
        hub.parse_repo_reference("org/name@v1", "v2")
    for bad in ("./relative/folder", "/abs/path", "org/../x", "a/b/c", "org/name@"):
        with pytest.raises(MergeError, match="nor a Hugging Face repo id"):
            hub.parse_repo_reference(bad)


def test_base_model_repr_names_architecture(tiny_pipeline_path):
    base = open_base(tiny_pipeline_path("sd2"))
    assert isinstance(base, BaseModel)
    assert "sd2" in repr(base)
