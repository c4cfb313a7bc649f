"""pdepth.protocol.train and the early k check of pdepth.protocol.model_run."""

import pytest
import torch

from pdepth.protocol.model_run import check_support
from pdepth.protocol.train import TrainOptions, train_model


def _tiny():
    torch.manual_seed(0)
    x = torch.randn(40, 1, 4, 4)
    y = torch.randint(0, 3, (40,))
    return x, y


def _model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))


def test_options_and_keywords_train_the_same():
    x, y = _tiny()
    idx = torch.arange(20)
    a_pred, a_hist = train_model(_model(), x, y, idx, epochs=2, lr=1e-2, batch_size=8, seed=3)
    b_pred, b_hist = train_model(_model(), x, y, idx,
                                 TrainOptions(epochs=2, lr=1e-2, batch_size=8, seed=3))
    assert a_pred.shape == (3, 40)
    assert torch.equal(a_pred, b_pred)
    assert a_hist == b_hist
    with pytest.raises(TypeError):
        train_model(_model(), x, y, idx, TrainOptions(epochs=1), epochs=2)


def test_check_support_asks_the_depth_layer():
    check_support(9, 10)  # 10 training examples, one excluded as the self match: 9 usable
    with pytest.raises(ValueError, match="usable support"):
        check_support(10, 10)
