"""Optimizers, clipping and LR schedules against hand computations."""

import math

import numpy as np
import pytest

from mpitrain.optim import (SGD, Adam, LRSchedule, clip_by_global_norm, clip_by_value,
                            make_optimizer)


def _vec(n=7, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(n).astype(dtype)


def test_sgd_plain_step():
    p = np.array([1.0, -2.0, 3.0])
    g = np.array([0.5, 0.5, -1.0])
    opt = SGD(p, lr=0.1)
    opt.step(g)
    np.testing.assert_allclose(p, [0.95, -2.05, 3.1], rtol=0, atol=1e-15)
    opt.step(g, lr=1.0)  # per-step override
    np.testing.assert_allclose(p, [0.45, -2.55, 4.1], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(g, [0.5, 0.5, -1.0])  # grads untouched
    assert opt.steps == 2 and opt.lr == 0.1


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_sgd_momentum_weight_decay(nesterov, wd):
    lr, mu = 0.05, 0.9
    p = _vec()
    ref_p, v = p.copy(), np.zeros_like(p)
    opt = SGD(p, lr, momentum=mu, weight_decay=wd, nesterov=nesterov)
    for t in range(5):
        g = _vec(seed=10 + t)
        g_in = g.copy()
        opt.step(g)
        gd = g + wd * ref_p
        v = mu * v + gd
        ref_p = ref_p - lr * (gd + mu * v if nesterov else v)
        np.testing.assert_allclose(p, ref_p, rtol=1e-13, atol=1e-15)
        np.testing.assert_array_equal(g, g_in)
    np.testing.assert_allclose(opt.velocity, v, rtol=1e-13)


def _adam_reference(p, grads, lr, b1, b2, eps, wd):
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1 ** t)
        vhat = v / (1 - b2 ** t)
        p = p - lr * mhat / (np.sqrt(vhat) + eps)
        out.append(p)
    return out


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_matches_reference(wd):
    lr, betas, eps = 0.01, (0.8, 0.99), 1e-8
    p = _vec(11)
    grads = [_vec(11, seed=20 + t) for t in range(6)]
    expected = _adam_reference(p.copy(), grads, lr, *betas, eps, wd)
    opt = Adam(p, lr, betas=betas, eps=eps, weight_decay=wd)
    for g, want in zip(grads, expected):
        opt.step(g)
        np.testing.assert_allclose(p, want, rtol=1e-12, atol=1e-14)
    assert opt.steps == 6
    # first Adam step moves every coordinate by about lr (sign of the gradient)
    q = np.zeros(4)
    Adam(q, 0.01).step(np.array([3.0, -0.2, 1e-3, -50.0]))
    np.testing.assert_allclose(q, [-0.01, 0.01, -0.01, 0.01], rtol=1e-4)


@pytest.mark.parametrize("name,kw", [("sgd", dict(momentum=0.9, weight_decay=1e-3)),
                                     ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=1e-3)),
                                     ("sgd", dict()),
                                     ("adam", dict(weight_decay=1e-3))])
def test_state_dict_round_trip_bitwise(name, kw):
    p = _vec(50, dtype=np.float32)
    opt = make_optimizer(name, p, lr=0.01, **kw)
    for t in range(3):
        opt.step(_vec(50, seed=t, dtype=np.float32))
    state = opt.state_dict()
    assert state["step"] == 3 and state["kind"] == name
    for key, val in state.items():
        assert np.isscalar(val) or isinstance(val, (np.ndarray, str))
    # host copies, not views of the live buffers
    for key, val in state.items():
        if isinstance(val, np.ndarray):
            assert not np.shares_memory(val, p)
    saved_p = p.copy()
    opt.step(_vec(50, seed=3, dtype=np.float32))
    opt.step(_vec(50, seed=4, dtype=np.float32))
    after_a = p.copy()
    # live state moved on, the saved one did not
    if "exp_avg" in state:
        assert not np.array_equal(state["exp_avg"], opt.exp_avg)

    q = saved_p.copy()
    opt2 = make_optimizer(name, q, lr=0.01, **kw)
    opt2.load_state_dict(state)
    assert opt2.steps == 3
    opt2.step(_vec(50, seed=3, dtype=np.float32))
    opt2.step(_vec(50, seed=4, dtype=np.float32))
    assert q.tobytes() == after_a.tobytes()


def test_load_state_dict_mismatch():
    p = np.zeros(5)
    sgd = SGD(p, 0.1, momentum=0.9)
    with pytest.raises(ValueError, match="adam"):
        sgd.load_state_dict(Adam(np.zeros(5), 0.1).state_dict())
    with pytest.raises(ValueError, match="shape"):
        sgd.load_state_dict(SGD(np.zeros(6), 0.1, momentum=0.9).state_dict())
    with pytest.raises(ValueError, match="momentum_buffer"):
        sgd.load_state_dict(SGD(np.zeros(5), 0.1).state_dict())


def test_step_checks_grads():
    opt = SGD(np.zeros(5), 0.1)
    with pytest.raises(ValueError):
        opt.step(np.zeros(4))
    with pytest.raises(ValueError):
        opt.step(np.zeros(5, dtype=np.float32))


def test_make_optimizer_names_and_args():
    p = np.zeros(3)
    assert isinstance(make_optimizer("SGD", p, lr=0.1, momentum=0.5), SGD)
    adam = make_optimizer("adam", p, lr=0.1, betas=(0.5, 0.6), eps=1e-6)
    assert isinstance(adam, Adam) and adam.betas == (0.5, 0.6) and adam.eps == 1e-6
    with pytest.raises(ValueError, match=r"'sgd', 'adam'"):
        make_optimizer("rmsprop", p, lr=0.1)
    with pytest.raises(ValueError):
        SGD(p, 0.1, momentum=1.5)
    with pytest.raises(ValueError):
        SGD(p, 0.1, nesterov=True)
    with pytest.raises(ValueError):
        SGD(p, -1.0)
    with pytest.raises(ValueError):
        Adam(p, 0.1, betas=(1.0, 0.9))


def test_clip_by_global_norm():
    g = np.array([3.0, 4.0, 0.0, 0.0])
    assert clip_by_global_norm(g, 10.0) == pytest.approx(5.0)
    np.testing.assert_array_equal(g, [3.0, 4.0, 0.0, 0.0])  # under the limit: untouched
    assert clip_by_global_norm(g, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(g, [0.6, 0.8, 0.0, 0.0], rtol=1e-15)
    assert np.linalg.norm(g) == pytest.approx(1.0)
    h = np.array([30.0, 40.0])
    assert clip_by_global_norm(h, 0.0) == pytest.approx(50.0)  # off: no-op
    np.testing.assert_array_equal(h, [30.0, 40.0])
    big = _vec(1000, dtype=np.float32) * 10
    norm = clip_by_global_norm(big, 2.5)
    assert norm == pytest.approx(float(np.linalg.norm(_vec(1000).astype(np.float32) * 10)), rel=1e-5)
    assert float(np.linalg.norm(big.astype(np.float64))) == pytest.approx(2.5, rel=1e-5)
    bad = np.array([1.0, np.inf])
    assert math.isinf(clip_by_global_norm(bad, 1.0))
    np.testing.assert_array_equal(bad, [1.0, np.inf])  # caller decides


def test_clip_by_value():
    g = np.array([-3.0, -0.5, 0.0, 0.25, 2.0])
    out = clip_by_value(g, 1.0)
    assert out is g
    np.testing.assert_array_equal(g, np.sign(g) * np.minimum(np.abs(g), 1.0))
    np.testing.assert_array_equal(g, [-1.0, -0.5, 0.0, 0.25, 1.0])
    h = np.array([-3.0, 5.0])
    clip_by_value(h, 0.0)
    np.testing.assert_array_equal(h, [-3.0, 5.0])


def test_schedule_constant_with_warmup():
    s = LRSchedule("constant", 0.4, total_steps=100, warmup_steps=4)
    assert [s(i) for i in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    assert s(10_000) == 0.4
    assert LRSchedule("constant", 0.3)(0) == 0.3  # no warm-up: full lr at step 0


def test_schedule_step_boundaries():
    s = LRSchedule("step", 1.0, total_steps=100, step_size=10, gamma=0.5)
    assert s(0) == 1.0 and s(9) == 1.0
    assert s(10) == 0.5 and s(19) == 0.5
    assert s(20) == 0.25
    floored = LRSchedule("step", 1.0, total_steps=100, step_size=10, gamma=0.1, min_lr=0.05)
    assert floored(10) == pytest.approx(0.1) and floored(20) == 0.05
    warm = LRSchedule("step", 1.0, total_steps=100, warmup_steps=5, step_size=10, gamma=0.5)
    assert warm(0) == pytest.approx(0.2) and warm(4) == pytest.approx(1.0)
    assert warm(5) == 1.0 and warm(10) == 0.5
    assert LRSchedule("step", 1.0, total_steps=30).step_size == 10  # default: thirds


def test_schedule_cosine_endpoints():
    s = LRSchedule("cosine", 0.1, total_steps=110, warmup_steps=10, min_lr=0.001)
    assert s(0) == pytest.approx(0.01)
    assert s(9) == pytest.approx(0.1)
    assert s(10) == pytest.approx(0.1)
    assert s(60) == pytest.approx((0.1 + 0.001) / 2)
    assert s(110) == pytest.approx(0.001)
    assert s(500) == pytest.approx(0.001)
    vals = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"'constant', 'step', 'cosine'"):
        LRSchedule("linear", 0.1, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        LRSchedule("cosine", 0.1)
    with pytest.raises(ValueError):
        LRSchedule("step", 0.1)
    with pytest.raises(ValueError):
        LRSchedule("constant", 0.1, warmup_steps=-1)
