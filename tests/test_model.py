"""MLP: gradients against finite differences, flat-buffer layout, init, training."""

import numpy as np
import pytest

from mpitrain.models import MLP
from mpitrain.optim import make_optimizer


def _batch(features, classes, n, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features))
    y = rng.integers(0, classes, size=n)
    return x, y


def _numeric_grad(model, x, y, h=1e-6):
    """Central differences of the mean loss w.r.t. every parameter (float64)."""
    p = model.params
    num = np.empty_like(p)
    n = x.shape[0]
    for k in range(p.size):
        old = p[k]
        p[k] = old + h
        fp = model.evaluate((x, y))[0] / n
        p[k] = old - h
        fm = model.evaluate((x, y))[0] / n
        p[k] = old
        num[k] = (fp - fm) / (2 * h)
    return num


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("hidden", [[], [7, 6]])
def test_gradient_matches_finite_differences(activation, hidden):
    model = MLP(5, hidden, 4, activation, dtype=np.float64, seed=3)
    model.params += 0.01  # non-zero biases too
    x, y = _batch(5, 4, 8)
    loss, _ = model.loss_and_grad((x, y))
    ana = model.grads.copy()
    num = _numeric_grad(model, x, y)
    assert loss == pytest.approx(model.evaluate((x, y))[0] / 8, rel=1e-12)
    rel = np.abs(ana - num).max() / np.abs(num).max()
    assert rel < 1e-6, rel
    # every parameter gets a gradient (no block silently left at zero)
    for layer in model.layers:
        assert np.abs(layer.dW).max() > 0


def test_loss_and_accuracy_values():
    model = MLP(3, [], 3, dtype=np.float64)
    model.params[...] = 0.0
    model.layers[0].b[...] = [0.0, np.log(2.0), 0.0]  # p = (1/4, 1/2, 1/4) for every row
    x = np.ones((4, 3))
    y = np.array([0, 1, 1, 2])
    loss, correct = model.loss_and_grad((x, y))
    assert loss == pytest.approx((2 * np.log(4) + 2 * np.log(2)) / 4)
    assert correct == 2
    # d loss / d b = mean(p - onehot)
    assert model.layers[0].db == pytest.approx([(4 * 0.25 - 1) / 4, (4 * 0.5 - 2) / 4, (4 * 0.25 - 1) / 4])
    loss_sum, correct = model.evaluate((x, y), batch_size=3)  # chunked
    assert loss_sum == pytest.approx(loss * 4)
    assert correct == 2


def test_loss_is_stable_for_huge_logits():
    model = MLP(2, [], 3, dtype=np.float32)
    model.params[...] = 0.0
    model.layers[0].W[...] = [[1000.0, -1000.0, 0.0], [0.0, 0.0, 0.0]]
    x = np.array([[1.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    loss, correct = model.loss_and_grad((x, np.array([0, 2])))
    assert np.isfinite(loss) and np.all(np.isfinite(model.grads))
    assert loss == pytest.approx(1000.0 / 2, rel=1e-5)  # first row: 0, second row: 1000
    assert correct == 1


def test_layout_last_layer_first_and_ready_prefixes():
    model = MLP(6, [5, 4], 3)
    widths = [6, 5, 4, 3]
    sizes = [widths[i] * widths[i + 1] + widths[i + 1] for i in range(3)]
    assert model.n_params == sum(sizes) == model.params.size == model.grads.size
    assert model.layer_slices() == [("fc2", 0, sizes[2]),
                                    ("fc1", sizes[2], sizes[2] + sizes[1]),
                                    ("fc0", sizes[2] + sizes[1], sum(sizes))]
    last = model.layers[-1]
    assert last.W.shape == (4, 3) and last.b.shape == (3,)
    assert np.shares_memory(last.W, model.params[:12]) and np.shares_memory(last.b, model.params[12:15])
    assert np.shares_memory(last.dW, model.grads[:12])
    # views: writing the flat buffer shows through the layer views
    model.params[0] = 42.0
    assert last.W[0, 0] == 42.0
    model.params[12] = -7.0
    assert last.b[0] == -7.0

    x, y = _batch(6, 3, 10)
    seen = []

    def ready(hi):
        # the prefix is final: it already equals what a full backward gives
        seen.append((hi, model.grads[:hi].copy()))

    model.loss_and_grad((x, y), on_grad_ready=ready)
    final = model.grads.copy()
    his = [hi for hi, _ in seen]
    assert his == [sizes[2], sizes[2] + sizes[1], sum(sizes)]
    assert all(a < b for a, b in zip(his, his[1:]))
    for hi, prefix in seen:
        np.testing.assert_array_equal(prefix, final[:hi])


def test_grads_overwritten_not_accumulated_and_buffers_reused():
    model = MLP(4, [8], 3, seed=1)
    x, y = _batch(4, 3, 16)
    model.grads[...] = 123.0
    model.loss_and_grad((x, y))
    g1 = model.grads.copy()
    # a different batch size in between must not disturb the cached buffers
    x2, y2 = _batch(4, 3, 5, seed=9)
    model.loss_and_grad((x2, y2))
    model.loss_and_grad((x, y))
    np.testing.assert_array_equal(model.grads, g1)
    assert 16 in model._cache and 5 in model._cache


def test_evaluate_leaves_grads_and_params_alone():
    model = MLP(4, [8], 3)
    x, y = _batch(4, 3, 20)
    model.loss_and_grad((x, y))
    g, p = model.grads.copy(), model.params.copy()
    model.evaluate((x, y), batch_size=7)
    np.testing.assert_array_equal(model.grads, g)
    np.testing.assert_array_equal(model.params, p)
    assert model.evaluate((x[:0], y[:0])) == (0.0, 0)


def test_seeded_init():
    a = MLP(10, [16, 8], 4, seed=5)
    b = MLP(10, [16, 8], 4, seed=5)
    c = MLP(10, [16, 8], 4, seed=6)
    assert a.params.tobytes() == b.params.tobytes()
    assert not np.array_equal(a.params, c.params)
    for layer in a.layers:
        assert np.all(layer.b == 0)
        assert np.abs(layer.W).max() > 0
    # re-init restores the seed's values exactly
    a.params += 1
    a.init(5)
    assert a.params.tobytes() == b.params.tobytes()
    assert a.params.dtype == np.float32


def test_init_scales():
    relu = MLP(400, [300], 10, "relu", seed=0)
    w = relu.layers[0].W
    assert np.std(w) == pytest.approx(np.sqrt(2 / 400), rel=0.05)  # He normal
    tanh = MLP(400, [300], 10, "tanh", seed=0)
    w = tanh.layers[0].W
    a = np.sqrt(6 / 700)
    assert np.abs(w).max() <= a
    assert np.std(w) == pytest.approx(a / np.sqrt(3), rel=0.05)  # Glorot uniform


def test_bad_arguments():
    with pytest.raises(ValueError, match="relu"):
        MLP(4, [], 3, activation="sigmoid")
    with pytest.raises(ValueError):
        MLP(4, [0], 3)
    model = MLP(4, [], 3)
    with pytest.raises(ValueError, match=r"\(batch, 4\)"):
        model.loss_and_grad((np.zeros((2, 5)), np.zeros(2, dtype=int)))
    with pytest.raises(ValueError):
        model.loss_and_grad((np.zeros((2, 4)), np.zeros(3, dtype=int)))
    with pytest.raises(ValueError):
        model.set_params(np.zeros(model.n_params + 1))


def test_describe_and_config():
    model = MLP(64, [128], 10)
    text = model.describe()
    assert "64-128-10" in text and "9,610" in text and "relu" in text
    assert model.config() == {"features": 64, "hidden": [128], "classes": 10,
                              "activation": "relu", "dtype": "float32"}
    assert "4-3" in MLP(4, [], 3).describe()


def _blobs(n=120, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0]])
    y = rng.integers(0, 3, size=n)
    x = centers[y] + 0.5 * rng.standard_normal((n, 4))
    return x.astype(np.float32), y


@pytest.mark.parametrize("opt,lr", [("sgd", 0.2), ("adam", 0.02)])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_tiny_model_trains(opt, lr, activation):
    x, y = _blobs()
    model = MLP(4, [16], 3, activation, seed=0)
    optimizer = make_optimizer(opt, model.params, lr=lr, momentum=0.9)
    first, _ = model.loss_and_grad((x, y))
    for _ in range(60):
        loss, correct = model.loss_and_grad((x, y))
        optimizer.step(model.grads)
    loss, correct = model.loss_and_grad((x, y))
    assert loss < 0.1 * first, (first, loss)
    assert correct == len(y)
