"""Scores against torch autograd of the float64 companion network (theory.md section 4: a score is |theta| times
the gradient of the path-norm), for torch-exported CNNs with BatchNorm, strided/grouped/dilated/depthwise convs,
max- and average-pooling, ReLU6, LeakyReLU and residual blocks."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")

import onnxlip  # noqa: E402
from tests import exporter_models as E  # noqa: E402


@pytest.mark.parametrize("arch", ["resnet", "convzoo", "conv1d", "transpose", "mix", "unet", "densenet", "shuffle"])
def test_scores_equal_torch_autograd_of_the_companion(tmp_path, arch):
    model = E.build(arch, seed=1)
    path = tmp_path / f"{arch}.onnx"
    # no constant folding: initializers keep torch's parameter names (BatchNorm stays for onnxlip to fold)
    E.export(model, path, dynamo=False, dynamic_batch=False, do_constant_folding=False)
    comp = E.companion(model, 1.0)
    out = comp(torch.ones((1, *model.input_shape), dtype=torch.float64))
    out.sum().backward()
    expected = {name: (p * p.grad).detach().numpy() for name, p in comp.named_parameters() if p.grad is not None}
    result = onnxlip.scores(path)
    compared = 0
    for name in result.tensors:
        if name not in expected or "bn" in name:
            continue  # BatchNorm parameters are folded into the conv before them in onnxlip
        got = result.absolute(name)
        assert got.shape == expected[name].shape
        assert np.allclose(got, expected[name], rtol=2e-5, atol=1e-9 * np.abs(expected[name]).max()), name
        compared += 1
    assert compared >= 5
    assert result.log10_path_norm == pytest.approx(np.log10(float(out.sum().detach())), abs=1e-6)


def test_full_size_resnet18_export_matches_torch_float64(tmp_path):
    """torchvision's ResNet-18 shapes at 224x224 (11.7M parameters, BatchNorm with non-trivial statistics, a
    path-norm near 1e25), exported by torch.onnx: path-norm and every conv weight's scores against the float64
    torch reference (the path-norm toolkit's recipe and its autograd)."""
    from benchmarks.torch_resnet import ResNet18, reference_pathnorm, reference_scores

    torch.manual_seed(0)
    net = ResNet18().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    path = tmp_path / "resnet18.onnx"
    torch.onnx.export(
        net, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False, do_constant_folding=False, input_names=["x"]
    )
    norm = onnxlip.path_norm(path)
    assert norm.log10_path_norm == pytest.approx(np.log10(reference_pathnorm(net)), abs=5e-7)  # 1e-6 relative
    expected = {k: v.numpy() for k, v in reference_scores(net).items()}
    result = onnxlip.scores(path)
    convs = [n for n in result.tensors if n in expected and expected[n].ndim == 4]
    assert len(convs) == 20
    for name in convs:
        want = expected[name]
        np.testing.assert_allclose(result.absolute(name), want, rtol=1e-5, atol=1e-7 * np.abs(want).max(), err_msg=name)
