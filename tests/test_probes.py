"""Probes (pdepth.probes): embedding extraction, hooks vs a manual forward, in-place
activations, presets, pooling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pdepth
from pdepth import models
from pdepth.probes import (
    PRESETS,
    ProbeRecorder,
    ProbeSpec,
    extract,
    pool_embedding,
    resolve_probes,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _eval(model):
    model.eval()
    # non-trivial batch-norm statistics, so a BN output differs from its input
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_cnn_hooks_equal_manual_forward():
    model = _eval(models.cnn())
    x = torch.randn(37, 1, 28, 28)
    emb = extract(model, x, "cnn", batch_size=16)
    assert emb.names == ["input", "block1", "block2", "block3", "fc", "softmax"]
    with torch.no_grad():
        b1 = model.block1(x)
        b2 = model.block2(b1)
        b3 = model.block3(b2)
        fc = model.fc(b3)
        logits = model.head(fc)
    expected = [x, b1, b2, b3, fc, torch.softmax(logits, 1)]
    for name, want in zip(emb.names, expected, strict=True):
        torch.testing.assert_close(emb.layers[name], want.reshape(37, -1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb.logits, logits, rtol=1e-5, atol=1e-6)
    assert emb.labels is None


def test_labels_and_dataloader_input():
    model = _eval(models.mlp())
    x, y = torch.randn(20, 1, 28, 28), torch.randint(0, 10, (20,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    emb = extract(model, loader, "mlp")
    assert torch.equal(emb.labels, y)
    assert emb.layers["input"].shape == (20, 784)
    assert [t.shape[1] for t in emb.layers.values()] == [784, 512, 512, 512, 512, 10]


class _BNThenInplaceReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

    def forward(self, x):
        return self.head(self.relu(self.bn(self.conv(x))))


def test_inplace_relu_does_not_corrupt_probe():
    model = _eval(_BNThenInplaceReLU())
    x = torch.randn(10, 1, 8, 8)
    emb = extract(model, x, ["bn", "relu"])
    with torch.no_grad():
        bn = model.bn(model.conv(x))
    assert (bn < 0).any()  # the in-place ReLU would have zeroed these
    torch.testing.assert_close(emb.layers["bn"], bn.reshape(10, -1))
    torch.testing.assert_close(emb.layers["relu"], bn.clamp_min(0).reshape(10, -1))


def test_resnet18_stem_probe_survives_inplace_relu():
    model = _eval(models.resnet18())
    x = torch.randn(3, 1, 28, 28)
    emb = extract(model, x, "resnet18")
    with torch.no_grad():
        bn1 = model.bn1(model.conv1(x))
        block = model.layer1[0](model.relu(bn1.clone()))
    assert (bn1 < 0).any()
    torch.testing.assert_close(emb.layers["bn1"], bn1.reshape(3, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb.layers["layer1.0"], block.reshape(3, -1), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("arch, count", [("resnet18", 11), ("vgg16", 15), ("mlp", 6),
                                         ("cnn", 6)])
def test_preset_probe_counts(arch, count):
    model = models.build_model(arch)
    spec = resolve_probes(model, arch)
    assert spec.num_probes == count
    assert spec.names[0] == "input" and spec.names[-1] == "softmax"


def test_resnet18_preset_names_and_torchvision_model():
    from torchvision.models import resnet18

    names = resolve_probes(models.resnet18(), "resnet18").names
    assert names == ["input", "bn1"] + [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)] + [
        "softmax"]
    # the unmodified torchvision model (3 channels, 224 stem) gets the same probes
    assert resolve_probes(resnet18(weights=None), "resnet").names == names
    assert resolve_probes(resnet18(weights=None), "auto").names == names


def test_vgg_preset_probes_after_activation():
    model = models.vgg16()
    spec = resolve_probes(model, "vgg16")
    mods = dict(model.named_modules())
    assert all(isinstance(mods[m], nn.ReLU) for m in spec.modules)
    assert len(spec.modules) == sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13


def test_arbitrary_module_by_name_and_max_dim_pooling():
    model = _eval(models.vgg16())
    x = torch.randn(2, 1, 28, 28)
    emb = extract(model, x, ["features.2", "classifier.2"], max_dim=1000)
    assert emb.names == ["input", "features.2", "classifier.2", "softmax"]
    assert emb.layers["features.2"].shape == (2, 64 * 3 * 3)  # 64x28x28 pooled to 3x3
    assert emb.layers["input"].shape == (2, 784)
    assert emb.layers["classifier.2"].shape == (2, 512)
    with torch.no_grad():
        f2 = model.features[:3](x)
    torch.testing.assert_close(emb.layers["features.2"],
                               F.adaptive_avg_pool2d(f2, 3).reshape(2, -1), rtol=1e-5, atol=1e-5)


def test_pool_embedding_rules():
    t = torch.randn(2, 8, 10, 6)
    assert pool_embedding(t, None).shape == (2, 480)
    assert pool_embedding(t, 480).shape == (2, 480)
    out = pool_embedding(t, 100)
    assert out.shape[1] <= 100
    assert pool_embedding(t, 3).shape == (2, 8)  # at least 1x1: C features
    assert pool_embedding(torch.randn(2, 4, 50), 40).shape == (2, 40)
    assert pool_embedding(torch.randn(2, 500), 10).shape == (2, 500)  # dense: unpooled


def test_unknown_probe_names_list_valid_ones():
    model = models.cnn()
    with pytest.raises(ValueError, match=r"unknown probe module.*block1.*block2"):
        resolve_probes(model, ["block1", "nope"])
    with pytest.raises(ValueError, match=r"unknown probe preset 'resnet50'.*" + PRESETS[0]):
        resolve_probes(model, "resnet50")
    with pytest.raises(ValueError, match="valid architectures: cnn, resnet18, vgg16, mlp"):
        models.build_model("alexnet")


def test_one_module_name_is_a_list_of_one():
    """--probes block2 (no comma): the module alone, as ["block2"], not an unknown preset."""
    model = models.cnn()
    one = resolve_probes(model, "block2")
    assert one.names == resolve_probes(model, ["block2"]).names
    assert list(one.names) == ["input", "block2", "softmax"]


def test_module_running_twice_is_an_error():
    model = _eval(models.resnet18())
    spec = ProbeSpec(("layer1.0.relu",))  # BasicBlock reuses its ReLU
    with ProbeRecorder(model, spec) as rec, pytest.raises(RuntimeError, match="more than once"):
        rec.run(torch.randn(1, 1, 28, 28))


def test_extract_restores_training_mode_and_removes_hooks():
    model = models.cnn().train()
    extract(model, torch.randn(4, 1, 28, 28), "cnn")
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_public_names():
    for name in ("ProbeSpec", "extract", "stream_prediction_depth", "categorize"):
        assert hasattr(pdepth, name)


def test_probe_spec_from_preset_records_the_preset():
    spec = ProbeSpec.from_preset("mlp", models.mlp(), max_dim=64)
    assert spec.preset == "mlp" and spec.max_dim == 64 and spec.num_probes == 6
    assert ProbeSpec(("a",)).preset is None


def test_pinned_only_pins_for_cuda():
    from pdepth.probes import pinned

    x = torch.zeros(3, 2)
    assert pinned(x, "cpu") is x and pinned(x, torch.device("cpu")) is x
    if torch.cuda.is_available():  # the batches sliced from it copy asynchronously
        assert pinned(x, "cuda").is_pinned() and torch.equal(pinned(x, "cuda"), x)


class _Backwards(nn.Module):
    """Modules registered in the reverse of the order the forward pass runs them."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Linear(8, 8)
        self.stem = nn.Linear(4, 8)

    def forward(self, x):
        return self.head(torch.relu(self.body(torch.relu(self.stem(x)))))


def test_probes_must_be_in_the_forward_order():
    """Depth counts the probes in the spec's order: a list in another order than the forward
    pass runs the modules is refused, naming that order (not the registration order)."""
    model = models.cnn().eval()
    x = torch.randn(5, 1, 28, 28)
    with pytest.raises(ValueError, match=r"list them as \['block1', 'block3'\]"):
        extract(model, x, ["block3", "block1"])
    with pytest.raises(ValueError, match=r"list them as \['block1', 'block3'\]"):
        pdepth.stream_prediction_depth(model, x, torch.arange(5) % 2, x,
                                       probes=["block3", "block1"], k=2)
    backwards = _Backwards().eval()
    emb = extract(backwards, torch.randn(3, 4), ["stem", "body"])
    assert emb.names == ["input", "stem", "body", "softmax"]
    with pytest.raises(ValueError, match=r"list them as \['stem', 'body'\]"):
        extract(backwards, torch.randn(3, 4), ["body", "stem"])


def test_an_empty_probe_list_is_refused():
    with pytest.raises(ValueError, match="names no module"):
        resolve_probes(models.cnn(), [])
    assert resolve_probes(models.cnn(), ProbeSpec()).names == ["input", "softmax"]


def test_auto_on_a_timm_vit_probes_its_blocks_at_the_class_token():
    """Issue 24: "auto" on a timm ViT chose the MLP rule ([input, blocks.0.mlp.act, softmax]);
    it is now the vit family, every block read at its class token."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28,
                              patch_size=4, in_chans=1, depth=3, embed_dim=24, num_heads=2,
                              num_classes=10).eval()
    x = torch.randn(4, 1, 28, 28)
    spec = resolve_probes(model, None)
    assert spec.names == ["input", "blocks.0", "blocks.1", "blocks.2", "softmax"]
    assert spec.preset == "vit" and spec.token == "cls" and spec.layout.prefix == 1
    emb = extract(model, x)
    assert [t.shape[1] for t in emb.layers.values()] == [784, 24, 24, 24, 10]
    # module names take a token: the class token instead of 50 x 24 flattened features
    assert extract(model, x, ["blocks.1"]).layers["blocks.1"].shape == (4, 50 * 24)
    cls = extract(model, x, ["blocks.1"], token="cls").layers["blocks.1"]
    torch.testing.assert_close(cls, emb.layers["blocks.1"])
    res = pdepth.stream_prediction_depth(model, x, torch.arange(4) % 2, x, k=1,
                                         token="mean")
    assert res.result.layer_names == emb.names


def test_auto_refuses_what_it_does_not_recognise():
    class Tokens(nn.Module):  # a class token of its own: not a network of plain layers
        def __init__(self):
            super().__init__()
            self.cls = nn.Parameter(torch.zeros(1, 4))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x + self.cls)

    with pytest.raises(ValueError, match=r"probes 'auto' does not recognise Tokens .*name a "
                                         r"preset \(cnn, convnext, .*vit\) or the modules"):
        resolve_probes(Tokens())
    assert resolve_probes(Tokens(), ["fc"]).names == ["input", "fc", "softmax"]


def test_probe_spec_records_the_token_rule():
    spec = resolve_probes(models.cnn(), "cnn")
    assert spec.token is None and spec.layout is None
    assert resolve_probes(models.cnn(), spec, token="all").token == "all"
    with pytest.raises(ValueError, match="token must be one of cls, mean, all"):
        resolve_probes(models.cnn(), "cnn", token="CLS")
