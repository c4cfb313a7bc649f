"""pdepth.models: every architecture builds by name, maps a batch to logits, and rejects
unknown names."""

from __future__ import annotations

import pytest
import torch

from pdepth import models


@pytest.mark.parametrize("arch", sorted(models.ARCHITECTURES))
def test_every_architecture_gives_logits(arch):
    if arch == "resnet18":
        pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = models.build_model(arch, num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_unknown_architecture_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid architectures: cnn"):
        models.build_model("alexnet")


# name -> (probes of its preset, in the module docstrings and docs/protocol.md)
PROBES = {"cnn": 6, "resnet18": 11, "vgg16": 15, "mlp": 6}


@pytest.mark.parametrize("shape", [(1, 28), (3, 32), (3, 64)])
@pytest.mark.parametrize("arch", sorted(models.ARCHITECTURES))
def test_every_architecture_and_its_preset_fit_every_input_shape(arch, shape):
    from pdepth.probes import probe_dims, resolve_probes

    pytest.importorskip("torchvision")
    channels, size = shape
    torch.manual_seed(0)
    model = models.build_model(arch, num_classes=5, in_channels=channels, image_size=size)
    x = torch.randn(2, channels, size, size)
    spec = resolve_probes(model, arch, max_dim=4096)
    dims = probe_dims(model, spec, x)
    assert spec.num_probes == PROBES[arch] and len(dims) == PROBES[arch]
    assert dims[0] == min(channels * size * size, 3888) and max(dims) <= 4096
    assert dims[-1] == 5 and model.eval()(x).shape == (2, 5)


@pytest.mark.parametrize("size, kernel, stride, pool", [(28, 3, 1, False), (32, 3, 1, False),
                                                         (64, 7, 2, True)])
def test_resnet18_is_the_papers_group_norm_network_with_a_stem_per_size(size, kernel, stride,
                                                                        pool):
    pytest.importorskip("torchvision")
    model = models.build_model("resnet18", 10, 3, size)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
    assert not norms and isinstance(model.bn1, torch.nn.GroupNorm)
    assert model.bn1.num_groups == 32 and model.layer4[1].bn2.num_groups == 32
    assert model.conv1.kernel_size == (kernel, kernel) and model.conv1.stride == (stride, stride)
    assert isinstance(model.maxpool, torch.nn.MaxPool2d) == pool
    assert models.ARCH_VERSIONS["resnet18"] == 2


def test_the_protocol_key_changes_only_for_the_changed_architecture():
    """resnet18 became a GroupNorm network (issue 14): its key changed; the others' keys are
    those of earlier versions (values computed before issue 14)."""
    from pdepth.protocol import RunConfig

    # seeds 0, 1: the default of those versions (since then 5 seeds); since issue 23 the key
    # leaves out the memory budget, and the key of those versions is still accepted
    assert RunConfig(seeds=[0, 1]).accepted_keys()[1] == "8a33f2e3973642cb"
    assert RunConfig(label_noise=0.2, subset=200, epochs=1, k=3,
                     seeds=[0, 1]).accepted_keys()[1] == "8f0100d7df4001be"
    assert RunConfig(arch="resnet18").protocol_key() != "22c4d222499b8667"
    # settings that change results are in the key, the runtime ones are not
    base = RunConfig(dataset="cifar10").protocol_key()
    assert RunConfig(dataset="cifar10", workers=4, download=True,
                     root="/elsewhere").protocol_key() == base
    assert RunConfig(dataset="imagefolder", root="x", image_size=48).protocol_key() != \
        RunConfig(dataset="imagefolder", root="x").protocol_key()
    assert RunConfig(dataset="imagefolder", root="x", image_size=32).protocol_key() == \
        RunConfig(dataset="imagefolder", root="x").protocol_key()  # 32: the default


def _zip_of_text(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")


@pytest.mark.parametrize("name, write, message", [
    ("notes.pt", lambda p: p.write_text("hello world\n"), "is not a torch.save checkpoint"),
    ("empty.pt", lambda p: p.write_bytes(b""), r"is empty \(0 bytes\)"),
    ("other.zip", _zip_of_text, "is a zip archive but not a readable torch.save checkpoint"),
    ("cut.pt", lambda p: p.write_bytes(_saved_cnn()[:3000]), "zip archive but not a readable"),
    ("old-cut.pt", lambda p: p.write_bytes(_saved_cnn(zip=False)[:3000]),
     "a pickle but not a readable"),
    ("garbage.pt", lambda p: p.write_bytes(b"\x80\x02garbage"), "a pickle but not a readable"),
    ("folder.pt", lambda p: p.mkdir(), "cannot be read"),
])
def test_a_checkpoint_that_is_not_one_names_the_file(tmp_path, name, write, message):
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError, match=message) as exc:
        models.load_checkpoint(models.cnn(), str(path))
    assert f"--checkpoint {path} " in str(exc.value) and "\n" not in str(exc.value)


def _saved_cnn(zip: bool = True) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(models.cnn().state_dict(), buffer, _use_new_zipfile_serialization=zip)
    return buffer.getvalue()


def test_a_checkpoint_in_either_torch_save_format_loads(tmp_path):
    for zip in (True, False):
        (tmp_path / "ok.pt").write_bytes(_saved_cnn(zip))
        models.load_checkpoint(models.cnn(), str(tmp_path / "ok.pt"))
