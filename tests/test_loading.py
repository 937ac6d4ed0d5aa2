"""Checkpoint loading in every supported format, on tiny files written here."""

import copy
import logging
import warnings

import open_clip
import pytest
import torch
from open_clip import factory as open_clip_factory
from open_clip.model import CLIP

from alignednorm.backbone import loading
from alignednorm.backbone.loading import (
    config_problems,
    load_clip,
    matching_configs,
    model_problems,
    read_state_dict,
    read_torchscript_archive,
)
from alignednorm.backbone.tiny import TINY_MODEL_NAME, make_tiny_clip, register_tiny_configs, save_openai_state_dict
from alignednorm.errors import CheckpointError


@pytest.fixture(scope="module")
def small_clip():
    return make_tiny_clip(seed=5, layers=2, width=64, context_length=16)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


def _images_and_text(model):
    return torch.randn(2, 3, 32, 32), torch.randint(1, 400, (2, 16))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_openai_state_dict_roundtrip(tmp_path, small_clip, suffix):
    path = save_openai_state_dict(small_clip, tmp_path / f"clip{suffix}", half=False)
    loaded = load_clip(path)
    _same_weights(small_clip, loaded)
    images, _text = _images_and_text(small_clip)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), small_clip.encode_image(images), atol=1e-6)


def test_torchscript_archive_read_without_running_code(tmp_path, small_clip):
    images, text = _images_and_text(small_clip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(small_clip, {"encode_image": (images,), "encode_text": (text,)})
        torch.jit.save(traced, str(tmp_path / "ViT-tiny.pt"))
    tensors = read_torchscript_archive(tmp_path / "ViT-tiny.pt")
    expected = small_clip.state_dict()
    assert set(tensors) == set(expected)
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    loaded = load_clip(tmp_path / "ViT-tiny.pt")
    assert loaded.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"


def test_open_clip_checkpoint_with_model_name(tmp_path):
    register_tiny_configs()
    import open_clip

    model = open_clip.create_model(TINY_MODEL_NAME)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "epoch_3.pt")
    _same_weights(model, load_clip(tmp_path / "epoch_3.pt", model_name=TINY_MODEL_NAME))
    with pytest.raises(CheckpointError, match="unknown open_clip model 'ViT-Tiny-Nope'"):
        load_clip(tmp_path / "epoch_3.pt", model_name="ViT-Tiny-Nope")


def test_bad_checkpoints_name_the_problem(tmp_path, small_clip):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt: unknown checkpoint format"):
        load_clip(tmp_path / "garbage.pt")
    torch.save({"a": 1}, tmp_path / "dict.pt")
    with pytest.raises(CheckpointError, match="expected a state dict of tensors"):
        load_clip(tmp_path / "dict.pt")
    state = {k: v for k, v in small_clip.state_dict().items() if k != "ln_final.bias"}
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \['ln_final.bias'\]"):
        load_clip(tmp_path / "partial.pt")
    state = dict(small_clip.state_dict())
    state["visual.ln_post.weight"] = torch.ones(7)
    torch.save(state, tmp_path / "shapes.pt")
    with pytest.raises(CheckpointError, match=r"wrong shapes \['visual.ln_post.weight: checkpoint \(7,\)"):
        load_clip(tmp_path / "shapes.pt")
    # The text width is what most of its tensors say: a wrong ln_final.weight is the one named.
    state = dict(small_clip.state_dict())
    state["ln_final.weight"] = torch.ones(7)
    torch.save(state, tmp_path / "ln_final.pt")
    with pytest.raises(CheckpointError,
                       match=r"wrong shapes \['ln_final.weight: checkpoint \(7,\) vs model \(64,\)'\]$"):
        load_clip(tmp_path / "ln_final.pt")


# --- what a file without a model name can say about itself; architectures the runner refuses ---

# A tiny geometry as an open_clip config (heads 1: width 64 / head width 64).
TINY_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}


@pytest.fixture
def tiny_configs(monkeypatch):
    """Register tiny configs with open_clip for one test: name -> config (GELU unless quick_gelu)."""

    def register(**configs):
        for name, cfg in configs.items():
            monkeypatch.setitem(open_clip_factory._MODEL_CONFIGS, name, cfg)

    return register


def _gelu_model(seed: int = 3) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(**copy.deepcopy(TINY_CFG)).eval()  # GELU, as open_clip trains by default


def _features(model):
    generator = torch.Generator().manual_seed(0)
    images, text = torch.randn(2, 3, 32, 32, generator=generator), torch.randint(1, 400, (2, 16), generator=generator)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(text)


def test_gelu_open_clip_file_without_name_is_inferred_not_taken_as_quickgelu(tmp_path, tiny_configs, caplog):
    tiny_configs(**{"tiny-gelu": copy.deepcopy(TINY_CFG)})
    model = _gelu_model()
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    with caplog.at_level(logging.INFO, logger="alignednorm.backbone.loading"):
        loaded = load_clip(tmp_path / "open_clip_pytorch_model.bin")
    assert "weights fit open_clip's tiny-gelu; loaded as tiny-gelu" in caplog.text
    assert type(loaded.visual.transformer.resblocks[0].mlp.gelu) is torch.nn.GELU
    for got, want in zip(_features(loaded), _features(model)):
        assert torch.allclose(got, want, atol=1e-6)


def test_gelu_or_quickgelu_undecidable_asks_for_the_name(tmp_path, tiny_configs):
    tiny_configs(**{"tiny-b": copy.deepcopy(TINY_CFG),
                    "tiny-b-quickgelu": {**copy.deepcopy(TINY_CFG), "quick_gelu": True}})
    torch.save(_gelu_model().state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"w.pt: weights fit several open_clip models that differ in activation "
                                              r".*pass --clip-model .*\(its weights fit tiny-b, tiny-b-quickgelu\)"):
        load_clip(tmp_path / "w.pt")
    assert type(load_clip(tmp_path / "w.pt", "tiny-b").visual.transformer.resblocks[0].mlp.gelu) is torch.nn.GELU


def test_shapes_of_an_openai_release_load_as_openai_with_a_warning(tmp_path, tiny_configs, monkeypatch, caplog):
    # Pretend the tiny geometry is an OpenAI release: same keys as an open_clip GELU model, by design.
    tiny_configs(**{"tiny-release": copy.deepcopy(TINY_CFG)})
    monkeypatch.setattr(loading, "OPENAI_RELEASES", ("tiny-release",))
    torch.save(_gelu_model().state_dict(), tmp_path / "w.pt")
    with caplog.at_level(logging.WARNING, logger="alignednorm.backbone.loading"):
        loaded = load_clip(tmp_path / "w.pt")
    assert type(loaded.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert "shapes of OpenAI's tiny-release: loaded as OpenAI's weights (QuickGELU)" in caplog.text
    assert "pass --clip-model tiny-release" in caplog.text


def test_open_clip_files_without_name_ask_for_it(tmp_path, tiny_configs):
    tiny_configs(**{"tiny-gelu": copy.deepcopy(TINY_CFG)})
    state = _gelu_model().state_dict()
    torch.save({"epoch": 3, "name": "my-run", "state_dict": {f"module.{k}": v for k, v in state.items()}},
               tmp_path / "epoch_3.pt")
    with pytest.raises(CheckpointError, match=r"epoch_3.pt: an open_clip training checkpoint \(epoch, name beside "
                                              r"state_dict\).*pass --clip-model .*\(its weights fit tiny-gelu\)"):
        load_clip(tmp_path / "epoch_3.pt")
    torch.save({**state, "logit_bias": torch.zeros([])}, tmp_path / "siglip.pt")
    with pytest.raises(CheckpointError, match=r"siglip.pt: an open_clip checkpoint \(a logit_bias .*\), not OpenAI's "
                                              r"format; pass --clip-model"):
        load_clip(tmp_path / "siglip.pt")
    custom = {("text." + k if not k.startswith(("visual.", "logit_scale")) else k): v for k, v in state.items()}
    torch.save(custom, tmp_path / "custom_text.pt")
    with pytest.raises(CheckpointError, match=r"custom_text.pt: an open_clip checkpoint \(a custom text tower"):
        load_clip(tmp_path / "custom_text.pt")


def test_openai_formats_without_name_still_load(tmp_path, small_clip, caplog):
    # No config has the tiny test geometry: OpenAI layout with QuickGELU, said in a log line.
    path = save_openai_state_dict(small_clip, tmp_path / "clip.pt", half=False)
    with caplog.at_level(logging.INFO, logger="alignednorm.backbone.loading"):
        loaded = load_clip(path)
    assert "no open_clip config has these shapes; loaded in OpenAI's layout with QuickGELU" in caplog.text
    assert type(loaded.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    # What OpenAI's archives carry beside the weights marks a state dict as theirs.
    torch.save({**small_clip.state_dict(), "input_resolution": torch.tensor(32)}, tmp_path / "from_archive.pt")
    assert type(load_clip(tmp_path / "from_archive.pt")
                .visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_openai_archive_with_a_gelu_model_name_is_refused(tmp_path, small_clip, tiny_configs):
    tiny_configs(**{"tiny-gelu": copy.deepcopy(TINY_CFG)})
    images, text = _images_and_text(small_clip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(small_clip, {"encode_image": (images,), "encode_text": (text,)})
        torch.jit.save(traced, str(tmp_path / "ViT-tiny.pt"))
    with pytest.raises(CheckpointError, match=r"ViT-tiny.pt: an OpenAI archive, trained with QuickGELU, but "
                                              r"open_clip's tiny-gelu uses GELU; "
                                              r"pass --clip-model tiny-gelu-quickgelu"):
        load_clip(tmp_path / "ViT-tiny.pt", "tiny-gelu")


@pytest.mark.parametrize("missing, vision", [("visual.conv1.weight", "vit"), ("visual.proj", "vit"),
                                             ("token_embedding.weight", "vit"),
                                             ("visual.attnpool.positional_embedding", "resnet")])
def test_missing_required_key_is_one_line_naming_file_and_key(tmp_path, small_clip, missing, vision):
    if vision == "resnet":
        cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}
        state = CLIP(**cfg, quick_gelu=True).state_dict()
    else:
        state = small_clip.state_dict()
    torch.save({k: v for k, v in state.items() if k != missing}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError) as info:
        load_clip(tmp_path / "partial.pt")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "partial.pt") in message and repr(missing) in message
    torch.save({k: v for k, v in state.items() if not k.startswith("visual.")}, tmp_path / "no_visual.pt")
    with pytest.raises(CheckpointError, match=r"no_visual.pt: not a CLIP state dict in OpenAI naming: no image tower"):
        load_clip(tmp_path / "no_visual.pt")
    torch.save({k: v for k, v in state.items() if not k.startswith("transformer.")}, tmp_path / "no_text.pt")
    with pytest.raises(CheckpointError, match=r"no_text.pt: .*: no blocks \(transformer.resblocks.\*\)"):
        load_clip(tmp_path / "no_text.pt")


def test_resnet_in_openai_format_still_loads(tmp_path):
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}
    torch.manual_seed(0)
    model = CLIP(**cfg, quick_gelu=True).eval()
    torch.save(model.state_dict(), tmp_path / "rn.pt")
    _same_weights(model, load_clip(tmp_path / "rn.pt"))


def test_no_random_init_warning_when_weights_follow(tmp_path, tiny_configs, caplog):
    tiny_configs(**{"tiny-gelu": copy.deepcopy(TINY_CFG)})
    model = _gelu_model()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with caplog.at_level(logging.DEBUG):
        _same_weights(model, load_clip(tmp_path / "w.pt", "tiny-gelu"))
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()
                or "No pretrained weights" in r.getMessage()]


@pytest.mark.parametrize("name, reason", [
    ("ViT-L-14-CLIPA", (r"image pooling 'avg' instead of the class token .*the tokenizer bert-base-uncased .*"
                        r"text pooling 'last' .*without causal mask")),
    ("ViT-H-14-worldwide", (r"the tokenizer facebook/xlm-v-base instead of CLIP's BPE; a vocabulary of 901,629 "
                            r"tokens .*text pooling 'eos'")),
    ("ViT-B-16-SigLIP", (r"a timm image tower \(vit_base_patch16_siglip_224\) other than EVA-CLIP's Eva; image "
                         r"pooling 'map' \(attention pooling: SigLIP-style towers have no class token\).*"
                         r"text pooling 'last'")),
    ("coca_ViT-B-32", r"a CoCa captioning model .*attentional pooling in the image tower"),
    ("PE-Core-B-16", (r"a timm image tower \(vit_pe_core_base_patch16_224\) other than EVA-CLIP's Eva; "
                      r"image pooling 'map'")),
    ("convnext_base", r"a timm image tower \(convnext_base\)"),
    ("roberta-ViT-B-32", r"a Hugging Face text tower \(roberta-base\)"),
])
def test_architectures_the_runner_cannot_run_are_refused_by_name(tmp_path, small_clip, name, reason):
    path = save_openai_state_dict(small_clip, tmp_path / "clip.pt", half=False)
    with pytest.raises(CheckpointError,
                       match=rf"open_clip model '{name}' cannot be run block by block: it has {reason}"):
        load_clip(path, name)


def test_every_openai_and_laion_vit_config_is_accepted():
    for name in ("ViT-B-16", "ViT-B-16-quickgelu", "ViT-L-14-336", "RN50", "RN101", "ViT-H-14", "ViT-bigG-14",
                 "ViT-M-16-alt"):
        assert config_problems(open_clip.get_model_config(name)) == [], name
    assert config_problems({**open_clip.get_model_config("ViT-B-16"), "new_field": 1}) == [
        "settings this loader was not checked against: new_field"]


def _shrunk(name: str, **text_overrides) -> dict:
    """A real open_clip config at a tiny width and depth, to build with random weights in milliseconds."""
    cfg = open_clip.get_model_config(name)
    cfg["embed_dim"] = 32
    cfg["vision_cfg"].update(layers=1, width=64, head_width=64, patch_size=16, image_size=32)
    cfg["text_cfg"].update(width=64, heads=1, layers=1, **text_overrides)
    for key in ("hf_tokenizer_name", "tokenizer_kwargs"):
        cfg["text_cfg"].pop(key, None)
    return cfg


def test_built_models_are_checked_too():
    assert model_problems(CLIP(**_shrunk("ViT-B-16"))) == []
    clipa = model_problems(CLIP(**_shrunk("ViT-L-14-CLIPA", vocab_size=500)))
    assert clipa == ["image pooling 'avg' instead of the class token ('tok')",
                     "text pooling 'last' instead of the end-of-text token ('argmax')",
                     "a text tower without causal mask", "a vocabulary of 500 tokens instead of CLIP's 49,408 BPE"]
    worldwide = model_problems(CLIP(**_shrunk("ViT-H-14-worldwide", vocab_size=500)))
    assert "text pooling 'eos' instead of the end-of-text token ('argmax')" in worldwide
    custom = _shrunk("ViT-B-16")
    custom["vision_cfg"]["qk_norm"] = True
    assert model_problems(CLIP(**custom)) == ["custom attention blocks instead of nn.MultiheadAttention blocks"]
    assert model_problems(open_clip.model.CustomTextCLIP(**_shrunk("ViT-B-16"))) == []  # CLIP's text tower under .text
    siglip = _shrunk("ViT-B-16-SigLIP", vocab_size=500)
    siglip["vision_cfg"] = {"image_size": 32, "timm_model_name": "vit_base_patch16_siglip_224", "timm_pool": "map",
                            "timm_proj": "none"}
    siglip.pop("custom_text")
    with torch.device("meta"):
        problems = model_problems(open_clip.model.CustomTextCLIP(**siglip))
    assert problems[:3] == [("a timm image tower (VisionTransformer) that is not timm's Eva "
                             "(only EVA-CLIP's are supported)"),
                            "text pooling 'last' instead of the end-of-text token ('argmax')",
                            "a text tower without causal mask"]


def test_matching_configs_compares_every_shape():
    assert "ViT-B-16" not in matching_configs(_gelu_model().state_dict())
    with torch.device("meta"):
        b16 = CLIP(**open_clip.get_model_config("ViT-B-16")).state_dict()
    assert matching_configs(b16) == ["ViT-B-16", "ViT-B-16-quickgelu"]


def _vit_configs_we_accept() -> list[str]:
    names = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        if cfg and isinstance(cfg.get("vision_cfg", {}).get("layers"), int) and config_problems(cfg) == []:
            names.append(name)
    return names


@pytest.mark.parametrize("name", _vit_configs_we_accept())
def test_every_accepted_vit_config_runs_block_by_block_like_open_clip(name):
    """Each standard ViT family (QuickGELU or not, LayerScale, ...) on tiny random weights of its kind."""
    from alignednorm.backbone.clip import ClipBackbone

    torch.manual_seed(0)
    model = CLIP(**_shrunk(name)).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():  # non-trivial biases, norms and layer scales
            if param_name.endswith("bias") or "ln" in param_name or ".ls_" in param_name:
                param.add_(0.05 * torch.randn_like(param))
    backbone = ClipBackbone(model)
    images = torch.randn(2, 3, 32, 32)
    tokens = backbone.tokenize(["a photo of a cat.", "x"])
    with torch.no_grad():
        assert torch.allclose(backbone.encode_image(images).features, model.encode_image(images), atol=1e-5)
        assert torch.allclose(backbone.encode_text(tokens).features, model.encode_text(tokens), atol=1e-5)
