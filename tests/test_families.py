"""The registry of model families (pdepth.families): each preset's probes on tiny
random-initialised timm, torchvision and Hugging Face models, the token rule (cls / mean /
all) against the hooked block outputs by hand, and "auto" refusing a model it does not know.
Nothing is downloaded: timm with pretrained=False, torchvision classes built directly,
Hugging Face models from config objects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pdepth import families, models
from pdepth.probes import PRESETS, ProbeRecorder, ProbeSpec, extract, resolve_probes


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


X = torch.randn(3, 3, 32, 32)


def _timm(name, **kw):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=5, **kw).eval()


def _timm_vit():
    return _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
                 num_heads=2)


def _timm_deit():
    return _timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2,
                 embed_dim=32, num_heads=2)


def _timm_swin():
    return _timm("swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=16,
                 depths=(1, 1), num_heads=(1, 2))


def _tv_vit():
    pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=64, num_classes=5).eval()


def _tv_swin():
    pytest.importorskip("torchvision")
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                           window_size=[4, 4], num_classes=5).eval()


def _tv_convnext():
    pytest.importorskip("torchvision")
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=5).eval()


def _hf_vit_config():
    transformers = pytest.importorskip("transformers")
    return transformers, transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=5)


def _hf_vit_classifier():
    transformers, cfg = _hf_vit_config()
    return transformers.ViTForImageClassification(cfg).eval()


def _hf_vit_model():
    transformers, cfg = _hf_vit_config()
    return transformers.ViTModel(cfg).eval()


def _hooked(model, name, x=X):
    """The output of module ``name`` in a forward pass, by a forward hook of the test's own."""
    got = []
    module = dict(model.named_modules())[name]
    handle = module.register_forward_hook(
        lambda m, a, out: got.append((out[0] if isinstance(out, tuple) else out).detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return got[0]


# name -> (builder, family auto finds, probed modules, their dims with the default token)
CASES = {
    "timm vit": (_timm_vit, "vit", ["blocks.0", "blocks.1"], [32, 32], "cls", (0, 1)),
    "timm deit distilled": (_timm_deit, "vit", ["blocks.0", "blocks.1"], [32, 32], "cls", (0, 2)),
    "torchvision vit": (_tv_vit, "vit", ["encoder.layers.encoder_layer_0",
                                         "encoder.layers.encoder_layer_1"], [32, 32], "cls",
                        (0, 1)),
    "hf vit classifier": (_hf_vit_classifier, "vit", None, [32, 32], "cls", (0, 1)),
    "timm swin": (_timm_swin, "swin", ["layers.0.blocks.0", "layers.1.blocks.0"], [16, 32],
                  "mean", (None, 0)),
    "torchvision swin": (_tv_swin, "swin", ["features.1.0", "features.3.0"], [16, 32], "mean",
                         (None, 0)),
    "timm convnext_atto": (lambda: _timm("convnext_atto"), "convnext",
                           [f"stages.{i}.blocks.{j}" for i, n in enumerate((2, 2, 6, 2))
                            for j in range(n)],
                           [40 * 8 * 8] * 2 + [80 * 4 * 4] * 2 + [160 * 2 * 2] * 6 + [320] * 2,
                           None, None),
    "torchvision convnext": (_tv_convnext, "convnext", ["features.1.0", "features.3.0"],
                             [8 * 8 * 8, 16 * 4 * 4], None, None),
}


def _hf_blocks(model):
    # transformers 5 names the blocks vit.layers.i, earlier versions vit.encoder.layer.i
    names = dict(model.named_modules())
    path = "vit.layers" if "vit.layers" in names else "vit.encoder.layer"
    return [f"{path}.0", f"{path}.1"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_family_preset_names_dims_and_token(case):
    build, family, modules, dims, token, layout = CASES[case]
    model = build()
    modules = modules or _hf_blocks(model)
    for probes in ("auto", family):
        spec = resolve_probes(model, probes)
        assert spec.preset == family and spec.modules == tuple(modules)
        assert spec.token == token  # the family's default, recorded on the spec
        if layout is not None:
            assert (spec.layout.class_token, spec.layout.prefix) == layout
    emb = extract(model, X, family, batch_size=2)
    assert emb.names == ["input", *modules, "softmax"]
    assert [t.shape[1] for t in emb.layers.values()] == [3 * 32 * 32, *dims, 5]
    assert all(torch.isfinite(t).all() for t in emb.layers.values())


@pytest.mark.parametrize("case", ["timm vit", "timm deit distilled", "torchvision vit",
                                  "hf vit classifier"])
def test_cls_is_row_0_and_mean_leaves_out_the_prefix_tokens(case):
    build, _, modules, _, _, (_, prefix) = CASES[case]
    model = build()
    block = (modules or _hf_blocks(model))[-1]
    out = _hooked(model, block)  # [B, T, C]
    assert out.dim() == 3
    cls = extract(model, X, "vit", token="cls")
    mean = extract(model, X, "vit", token="mean")
    every = extract(model, X, "vit", token="all")
    torch.testing.assert_close(cls.layers[block], out[:, 0])
    torch.testing.assert_close(mean.layers[block], out[:, prefix:].mean(1))
    assert not torch.allclose(mean.layers[block], out.mean(1))  # the prefix is left out
    torch.testing.assert_close(every.layers[block], out.transpose(1, 2).reshape(3, -1))
    # the default is the class token; module names take a token too
    torch.testing.assert_close(extract(model, X, "vit").layers[block], out[:, 0])
    torch.testing.assert_close(extract(model, X, [block], token="mean").layers[block],
                               out[:, prefix:].mean(1))


def test_all_tokens_pool_over_tokens_to_max_dim():
    model = _timm_vit()
    out = _hooked(model, "blocks.1")  # [3, 17, 32]
    emb = extract(model, X, "vit", token="all", max_dim=32 * 4)
    want = nn.functional.adaptive_avg_pool1d(out.transpose(1, 2), 4).reshape(3, -1)
    torch.testing.assert_close(emb.layers["blocks.1"], want)


@pytest.mark.parametrize("case", ["timm swin", "torchvision swin"])
def test_swin_channels_last_maps(case):
    model = CASES[case][0]()
    block = CASES[case][2][-1]
    out = _hooked(model, block)  # [B, H, W, C]
    mean = extract(model, X, "swin")
    torch.testing.assert_close(mean.layers[block], out.mean((1, 2)))
    every = extract(model, X, "swin", token="all")
    torch.testing.assert_close(every.layers[block], out.permute(0, 3, 1, 2).reshape(3, -1))
    with pytest.raises(ValueError, match=rf"token 'cls': {type(model).__name__} \(swin\) has "
                                         "no class token"):
        resolve_probes(model, "swin", token="cls")


def test_hf_vit_model_without_head():
    model = _hf_vit_model()
    spec = ProbeSpec.from_preset("vit", model, softmax=False)
    names = dict(model.named_modules())
    path = "layers" if "layers" in names else "encoder.layer"
    assert spec.modules == (f"{path}.0", f"{path}.1") and spec.token == "cls"
    assert families.recognise(model).name == "vit"
    with ProbeRecorder(model, spec, truncate=True) as rec:
        layers, _ = rec.run(X)
    out = _hooked(model, f"{path}.1")
    torch.testing.assert_close(layers[-1], out[:, 0])


def test_timm_vit_without_class_token_defaults_to_mean():
    model = _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32,
                  num_heads=2, class_token=False, global_pool="avg")
    spec = resolve_probes(model, "auto")
    assert spec.token == "mean" and spec.layout.prefix == 0
    with pytest.raises(ValueError, match=r"token 'cls': VisionTransformer \(vit\) has no class "
                                         "token"):
        resolve_probes(model, "vit", token="cls")
    out = _hooked(model, "blocks.0")
    torch.testing.assert_close(extract(model, X, spec).layers["blocks.0"], out.mean(1))


def test_timm_resnet_is_a_resnet():
    model = _timm("resnet18")
    spec = resolve_probes(model, "auto")
    assert spec.preset == "resnet" and spec.token is None
    assert spec.modules == ("bn1", *[f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)])


class _Attention(nn.Module):
    """A toy transformer: a class token held by the model itself (not a plain layer)."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], 1)
        return self.head(self.attn(t, t, t)[0][:, 0])


def test_auto_refuses_a_model_it_does_not_recognise():
    with pytest.raises(ValueError) as err:
        resolve_probes(_Attention(), "auto")
    msg = str(err.value)
    assert "\n" not in msg and "probes 'auto' does not recognise _Attention" in msg
    for preset in PRESETS[1:]:  # every preset is listed
        assert preset in msg
    assert "--probes NAME,NAME" in msg and "top-level modules: embed, attn, head" in msg
    with pytest.raises(ValueError, match="does not recognise"):
        resolve_probes(nn.Sequential(nn.Embedding(10, 4), nn.LSTM(4, 4)))
    # a library model no family covers is not guessed as a plain conv net
    tv = pytest.importorskip("torchvision")
    with pytest.raises(ValueError, match=r"does not recognise AlexNet \(torchvision"):
        resolve_probes(tv.models.alexnet(weights=None))


def test_auto_refuses_timm_models_no_family_covers():
    timm = pytest.importorskip("timm")
    mixer = timm.models.MlpMixer(num_classes=5, img_size=32, patch_size=8, num_blocks=1,
                                 embed_dim=16)  # Linear, LayerNorm and a Conv2d stem only
    with pytest.raises(ValueError, match=r"does not recognise MlpMixer \(timm"):
        resolve_probes(mixer)


def test_auto_keeps_plain_networks():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 2))
    assert resolve_probes(mlp).preset == "mlp" and resolve_probes(mlp).modules == ("2",)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.LazyLinear(2))
    assert resolve_probes(conv).preset == "vgg" and resolve_probes(conv).modules == ("2",)
    assert resolve_probes(nn.Linear(2, 2)).names == ["input", "softmax"]
    for arch, family in (("cnn", "cnn"), ("mlp", "mlp"), ("vgg16", "vgg")):
        spec = resolve_probes(models.build_model(arch), "auto")
        assert spec.preset == family
        assert spec.modules == resolve_probes(models.build_model(arch), arch).modules


def test_token_is_checked_and_does_not_apply_to_conv_maps():
    with pytest.raises(ValueError, match="token must be one of cls, mean, all or None, got "
                                         "'first'"):
        ProbeSpec(("a",), token="first")
    with pytest.raises(ValueError, match=r"token 'cls': SmallCNN \(cnn\) has no class token"):
        resolve_probes(models.cnn(), "cnn", token="cls")
    model = models.cnn().eval()
    x = torch.randn(2, 1, 28, 28)
    plain = extract(model, x, "cnn")
    meaned = extract(model, x, "cnn", token="mean")  # conv maps and dense outputs unchanged
    for name in plain.names:
        torch.testing.assert_close(plain.layers[name], meaned.layers[name])


def test_registry():
    assert families.get_family("resnet18").name == "resnet"
    assert families.get_family("vgg16").name == "vgg"
    with pytest.raises(ValueError, match="unknown probe preset 'nope'; valid presets: auto, "):
        families.get_family("nope")
    with pytest.raises(ValueError, match="already registered"):
        families.register_family(families.FAMILIES["vit"])
    assert set(PRESETS) == set(families.family_names())
    assert {"vit", "swin", "convnext", "resnet", "vgg", "mlp", "cnn"} <= set(families.FAMILIES)


def _hf(name, config, **kw):
    transformers = pytest.importorskip("transformers")
    return getattr(transformers, name)(getattr(transformers, config)(**kw)).eval()


_HF_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=2)
# Hugging Face models built like ViT: (model class, config class, config, family, prefix)
HF_CASES = {
    "deit with teacher": ("DeiTForImageClassificationWithTeacher", "DeiTConfig",
                          dict(_HF_VIT, intermediate_size=64, num_labels=5), "vit", 2),
    "dinov2 with registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                              dict(_HF_VIT, mlp_ratio=2, num_register_tokens=4), "vit", 5),
    "clip vision": ("CLIPVisionModel", "CLIPVisionConfig", dict(_HF_VIT, intermediate_size=64),
                    "vit", 1),
    "swin": ("SwinForImageClassification", "SwinConfig",
             dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                  window_size=4, num_labels=5), "swin", 0),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig",
                 dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5),
                 "convnext", None),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hugging_face_families(case):
    name, config, kw, family, prefix = HF_CASES[case]
    model = _hf(name, config, **kw)
    spec = ProbeSpec.from_preset("auto", model, softmax=False)
    assert spec.preset == family and len(spec.modules) == 2
    block = spec.modules[-1]
    with ProbeRecorder(model, spec, truncate=True) as rec:
        layers, _ = rec.run(X)
    out = _hooked(model, block)
    if family == "convnext":  # conv maps, as they are
        assert spec.token is None and out.dim() == 4
        torch.testing.assert_close(layers[-1], out.reshape(3, -1))
        return
    assert spec.layout.prefix == prefix and out.dim() == 3
    if family == "vit":
        assert spec.token == "cls"
        torch.testing.assert_close(layers[-1], out[:, 0])
        spec = ProbeSpec.from_preset("vit", model, softmax=False, token="mean")
        with ProbeRecorder(model, spec, truncate=True) as rec:
            layers, _ = rec.run(X)
    assert spec.token == "mean"  # swin's default: its tokens [B, L, C] have no prefix
    torch.testing.assert_close(layers[-1], out[:, prefix:].mean(1))
