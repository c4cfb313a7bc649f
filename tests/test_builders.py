"""Models by name (pdepth.builders): --model-arg parsing, factories called with pdepth's or
timm's keyword names, timm / torchvision / Hugging Face builders (random weights, nothing
downloaded), the model's own preprocessing, and builders that reject their arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pdepth.builders import (
    PreprocessedImages,
    build_named_model,
    call_factory,
    input_transform,
    model_dependencies,
    parse_model_args,
    preprocess,
)


def test_parse_model_args_literals_else_strings():
    got = parse_model_args(["img_size=32", "drop_rate=0.1", "size=(16, 8)", "act=gelu",
                            "flag=True", "none=None", "text='a=b'"])
    assert got == {"img_size": 32, "drop_rate": 0.1, "size": (16, 8), "act": "gelu",
                   "flag": True, "none": None, "text": "a=b"}
    for bad, message in ((["img_size"], "KEY=VALUE"), (["1x=2"], "identifier"),
                         (["a=1", "a=2"], "given twice")):
        with pytest.raises(ValueError, match=message):
            parse_model_args(bad)


def test_call_factory_maps_to_timm_names_and_model_args_win():
    seen = {}

    def timm_like(num_classes=1000, in_chans=3, img_size=224, drop_rate=0.0):
        seen.update(num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                    drop_rate=drop_rate)
        return nn.Linear(1, 1)

    given = {"num_classes": 10, "in_channels": 1, "image_size": 28}
    call_factory(timm_like, given, {"drop_rate": 0.5, "img_size": 32}, "m:f")
    assert seen == {"num_classes": 10, "in_chans": 1, "img_size": 32, "drop_rate": 0.5}

    def ours(num_classes, in_channels):
        seen.clear()
        seen.update(num_classes=num_classes, in_channels=in_channels)
        return nn.Linear(1, 1)

    call_factory(ours, given, None, "m:f")
    assert seen == {"num_classes": 10, "in_channels": 1}
    with pytest.raises(ValueError, match=r"--model m:f rejects --model-arg depth=3: TypeError"):
        call_factory(ours, given, {"depth": 3}, "m:f")
    with pytest.raises(ValueError, match="returned a int, not a torch.nn.Module"):
        call_factory(lambda **kw: 3, given, None, "m:f")


def test_timm_model_by_name_random_weights_and_preprocessing():
    pytest.importorskip("timm")
    built = build_named_model("timm:vit_tiny_patch16_224", {
        "img_size": 32, "patch_size": 8, "num_classes": 10, "depth": 1, "embed_dim": 32,
        "num_heads": 2})
    pre = built.preprocessing
    # the ViT's own size (img_size=32), not the pretrained config's 224
    assert pre["input_size"] == [3, 32, 32] and pre["interpolation"] == "bicubic"
    images = torch.randint(0, 256, (5, 16, 16), dtype=torch.uint8)  # grey, 16x16
    x, record = preprocess(images, built.model, pre, (0.3,), (0.2,))
    assert x.shape == (5, 3, 32, 32) and record["resized"] and record["mean"] == pre["mean"]
    assert built.model(x).shape == (5, 10)
    with pytest.raises(ValueError, match="timm has no model 'nope'"):
        build_named_model("timm:nope")
    with pytest.raises(ValueError, match="rejects --model-arg img_size=32"):
        build_named_model("timm:resnet10t", {"img_size": 32})


def test_torchvision_model_by_name_and_checkpoint(tmp_path):
    pytest.importorskip("torchvision")
    built = build_named_model("torchvision:resnet18", {"num_classes": 4})
    assert built.preprocessing is None and built.kind == "torchvision"
    torch.save(built.model.state_dict(), tmp_path / "w.pt")
    again = build_named_model("torchvision:resnet18", {"num_classes": 4},
                              checkpoint=str(tmp_path / "w.pt"))
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(again.model(x), built.model.eval()(x))
    with pytest.raises(ValueError, match="does not fit"):
        build_named_model("torchvision:resnet18", {"num_classes": 5},
                          checkpoint=str(tmp_path / "w.pt"))


def test_hf_folder_loads_locally_and_returns_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, num_labels=3)
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "m")
    built = build_named_model(f"hf:{tmp_path / 'm'}")
    out = built.model(torch.randn(2, 3, 16, 16))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)  # logits, not an output object
    with pytest.raises(ValueError, match="not a folder written by save_pretrained"):
        build_named_model(f"hf:{tmp_path}")


def test_model_dependencies():
    assert model_dependencies("timm:resnet18") == ("timm",)
    assert model_dependencies("hf:/x") == ("transformers",)
    assert model_dependencies("mynets:build") == ()


def test_call_factory_finds_the_keywords_of_a_kwargs_builder():
    # timm.models:resnet18 / torchvision.models:resnet18 take **kwargs: pdepth's names are
    # refused, so timm's are tried, then in_chans alone, then num_classes alone
    timm = pytest.importorskip("timm")
    given = {"num_classes": 10, "in_channels": 1, "image_size": 28}
    net = call_factory(timm.models.resnet18, given, None, "timm.models:resnet18")
    assert net.conv1[0].in_channels == 1 if isinstance(net.conv1, nn.Sequential) else \
        net.conv1.in_channels == 1
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    vit = call_factory(timm.models.vit_tiny_patch16_224, given, {"patch_size": 7, "depth": 1},
                       "timm.models:vit_tiny_patch16_224")
    assert vit(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # in_chans=1, img_size=28
    torchvision = pytest.importorskip("torchvision")
    tv = call_factory(torchvision.models.resnet18, given, None, "torchvision.models:resnet18")
    assert tv.fc.out_features == 10
    with pytest.raises(ValueError, match="rejects --model-arg bogus=1"):
        call_factory(timm.models.resnet18, given, {"bogus": 1}, "timm.models:resnet18")


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("grey", [True, False])
def test_preprocessed_images_batch_by_batch_equal_the_whole_split(mode, grey):
    """pdepth score makes the model's inputs batch by batch (a split resized to 224 is never
    held whole): any batching gives the bits of preprocess() on the whole split, with the
    resize (every interpolation), the grey -> RGB repeat and the standardisation."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    shape = (300, 12, 10) if grey else (300, 12, 10, 3)
    images = torch.randint(0, 256, shape, dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    labels = torch.arange(300) % 7
    pre = {"input_size": [3, 20, 24], "interpolation": mode, "mean": [0.4, 0.5, 0.6],
           "std": [0.2, 0.3, 0.25], "source": "test"}
    want, record = preprocess(images, model, pre, (0.3,), (0.2,))
    transform, same = input_transform(images, model, pre, (0.3,), (0.2,))
    assert same == record and record["input_shape"] == [3, 20, 24] and record["resized"]
    data = PreprocessedImages(images, labels, transform)
    assert len(data) == 300 and torch.equal(data.targets, labels)
    for batch in (1, 7, 256):
        xs, ys = zip(*torch.utils.data.DataLoader(data, batch_size=batch), strict=True)
        assert torch.equal(torch.cat(xs), want), batch
        assert torch.equal(torch.cat(ys), labels)
    x5, y5 = data[5]
    assert torch.equal(x5, want[5]) and int(y5) == 5
    with pytest.raises(ValueError, match="300 rows but labels has 299"):
        PreprocessedImages(images, labels[:299], transform)

