"""The depth target's decision (`steer`) and calibration, without training,
and the calibrated controller end to end."""

import keras
import numpy as np
import pytest

import tf_layersparse as ls
from tf_layersparse.proximal import optimizer_step_sizes, sparsity_groups
from tf_layersparse.regularizers import group_prox
from tf_layersparse.steering import (HARD_LIMIT, MARGIN_CHECKS, Plan, Pull, Seen, Steering,
                                     one_step_strength, steer)

LAYERS = ("a", "b", "c")


def _plan(**kwargs):
    fields = dict(begin=10, end=1010, savings={n: 100 for n in LAYERS},
                  weights={n: 1.0 for n in LAYERS}, inactive=2)
    fields.update(kwargs)
    return Plan(**fields)


def _norms(**zeroed):
    norms = {"a": 0.3, "b": 0.2, "c": 0.5}
    norms.update(zeroed)
    return norms


@pytest.mark.backend_independent
def test_nothing_is_pulled_before_the_warm_up_ends():
    state = steer(Steering(), Seen(5, _norms(), loss=2.0), _plan())
    assert not state.pulled and not state.held and state.loss == 2.0


def _warm_up(losses, plan, every=10):
    """Feed `losses` (one per check, `every` steps apart) to `steer`; the state."""
    state = Steering()
    for i, loss in enumerate(losses, 1):
        state = steer(state, Seen(i * every, _norms(), loss=loss), plan)
        if state.began is not None:
            break
    return state


@pytest.mark.backend_independent
def test_the_warm_up_waits_for_the_loss_to_take_off_and_slow_down():
    plan = _plan(begin=500, end=1000, warmup=True, window=50)
    # a plateau at 2.3, a take-off to 1.0 between steps 100 and 200, then a slow fall
    losses = [2.3] * 10 + [2.3 - 0.13 * i for i in range(1, 11)] + [1.0 - 0.002 * i
                                                                    for i in range(60)]
    state = _warm_up(losses, plan)
    assert state.began is not None and 200 < state.began < 300
    assert list(state.pulled) == ["b"]  # the pull begins at that check


@pytest.mark.backend_independent
def test_the_warm_up_ends_at_its_latest_step_on_a_plateau():
    plan = _plan(begin=300, end=1000, warmup=True, window=50)
    state = _warm_up([2.3] * 60, plan)
    assert state.began == 300
    # a loss that falls fast all along does not end it early either
    state = _warm_up([2.3 * 0.97 ** i for i in range(60)], plan)
    assert state.began == 300


@pytest.mark.backend_independent
def test_a_fixed_begin_step_wins_over_the_warm_up():
    plan = _plan(begin=400, end=1000, warmup=False, window=50)
    losses = [2.3] * 10 + [2.3 - 0.13 * i for i in range(1, 11)] + [1.0] * 60
    assert _warm_up(losses, plan).began == 400
    target = ls.DepthTarget(2, begin_step=400)
    assert target.schedule(1000) == (400, 500)


@pytest.mark.backend_independent
def test_the_closest_layer_is_pulled_first_and_alone():
    state = steer(Steering(), Seen(10, _norms(), loss=1.0), _plan())
    assert list(state.pulled) == ["b"]
    assert state.multiplier == 1.0 and state.reference == (1.0, None, None)
    # each layer still needed gets an equal share of the steps left, one kept back
    assert state.pulled["b"].slot == pytest.approx(1000 / 3)


@pytest.mark.backend_independent
def test_a_layer_that_would_stack_on_a_held_one_comes_last():
    plan = _plan(neighbours={"a": ("b",), "b": ("a", "c"), "c": ("b",)}, inactive=3)
    state = steer(Steering(), Seen(10, _norms(), loss=1.0), plan)
    state = steer(state, Seen(20, _norms(b=0.0), loss=1.0), plan)
    for step in range(30, 200, 10):
        state = steer(state, Seen(step, _norms(b=0.0), loss=1.0), plan)
        if state.pulled:
            break
    # 'a' is closer than 'c' but both sit next to the held 'b': the closer one
    assert list(state.pulled) == ["a"]
    plan = _plan(neighbours={"a": ("b",), "b": ("a",), "c": ()}, inactive=3)
    state = steer(Steering(held=["b"]), Seen(10, _norms(b=0.0), loss=1.0), plan)
    assert list(state.pulled) == ["c"]  # 'a' (0.3) is closer than 'c' (0.5)


@pytest.mark.backend_independent
def test_a_check_holds_at_most_one_new_layer_and_releases_the_crowd():
    plan = _plan(inactive=3)
    state = steer(Steering(), Seen(10, _norms(), loss=1.0), plan)
    state = steer(state, Seen(20, _norms(a=0.0, b=0.0, c=0.0), loss=1.0), plan)
    assert state.held == ["b"]  # the pulled one, not the crowd
    assert set(state.released) == {"a", "c"} and not state.pulled
    two = steer(state, Seen(30, _norms(a=0.0, b=0.0, c=0.0), loss=1.0), plan)
    assert two.held == ["b", "a"] and two.holds == {"b": 20, "a": 30}
    wider = _plan(inactive=3, max_new_holds=2)
    state = steer(Steering(), Seen(10, _norms(), loss=1.0), wider)
    assert len(state.pulled) == 2
    state = steer(state, Seen(20, _norms(a=0.0, b=0.0, c=0.0), loss=1.0), wider)
    assert len(state.held) == 2


@pytest.mark.backend_independent
def test_the_next_pull_waits_until_the_loss_has_recovered():
    plan = _plan()
    state = steer(Steering(), Seen(10, _norms(), loss=1.0), plan)
    state = steer(state, Seen(20, _norms(b=0.0), loss=1.0), plan)
    assert state.held == ["b"] and not state.pulled
    # the loss jumped after the hold: no new pull while it is above the level
    for step in (30, 40, 50):
        state = steer(state, Seen(step, _norms(b=0.0), loss=3.0), plan)
        assert not state.pulled
    # back within the tolerance (the smoothed loss needs a few checks)
    for step in range(60, 200, 10):
        state = steer(state, Seen(step, _norms(b=0.0), loss=0.9), plan)
        if state.pulled:
            break
    assert list(state.pulled) == ["a"] and step < 200


@pytest.mark.backend_independent
def test_the_guard_pauses_then_backs_off_while_the_loss_keeps_rising():
    plan = _plan()
    state = steer(Steering(), Seen(10, _norms(), loss=1.0), plan)
    state = steer(state, Seen(20, _norms(), loss=1.0), plan)
    grown = state.multiplier
    state = steer(state, Seen(30, _norms(), loss=1.5), plan)
    assert state.guard == "paused" and state.paused and state.multiplier == grown
    state = steer(state, Seen(40, _norms(), loss=2.0), plan)
    assert state.guard == "backing off" and state.multiplier < grown
    for step in range(50, 300, 10):
        state = steer(state, Seen(step, _norms(), loss=0.8), plan)
    assert state.guard == "open" and not state.paused


@pytest.mark.backend_independent
def test_the_validation_loss_raises_the_guard_too():
    plan = _plan()
    state = steer(Steering(), Seen(10, _norms(), loss=1.0, val_loss=1.0), plan)
    state = steer(state, Seen(20, _norms(), loss=1.0, val_loss=1.5), plan)
    assert state.guard == "paused"


@pytest.mark.backend_independent
def test_near_the_end_the_guard_no_longer_pauses_up_to_its_hard_limit():
    plan = _plan(end=100)
    state = steer(Steering(), Seen(10, _norms(), loss=1.0), plan)
    late = steer(state, Seen(95, _norms(), loss=1.5), plan)  # smoothed: 1.15, above 1.1
    assert late.guard != "open" and not late.paused
    # beyond HARD_LIMIT times the tolerance (2.0) the loss is not traded for the end step
    assert 1 + HARD_LIMIT * plan.tolerance == pytest.approx(2.0)
    wrecked = steer(state, Seen(95, _norms(), loss=5.0), plan)  # smoothed: 2.2
    assert wrecked.paused and wrecked.limited


@pytest.mark.backend_independent
def test_the_hard_limit_also_asks_for_half_the_way_back_to_the_untrained_loss():
    plan = _plan(begin=40, end=100)
    state = steer(Steering(), Seen(0, _norms(), loss=5.0), plan)  # untrained
    for step in range(2, 42, 2):
        state = steer(state, Seen(step, _norms(), loss=0.1), plan)
    level = state.reference[0]
    assert state.first_levels[0] == 5.0 and level < 0.2
    # late: a rise to three times the level is not yet half-way back to 5.0
    late = steer(state, Seen(95, _norms(), loss=level + (3 * level - level) / 0.3), plan)
    assert late.loss == pytest.approx(3 * level) and not late.paused
    halfway = steer(state, Seen(95, _norms(), loss=level + (2.6 - level) / 0.3), plan)
    assert halfway.loss > level + 0.5 * (5.0 - level) and halfway.paused and halfway.limited


@pytest.mark.backend_independent
def test_a_layer_behind_its_line_is_pulled_harder():
    plan = _plan()
    state = steer(Steering(), Seen(10, _norms(), loss=1.0), plan)
    state = steer(state, Seen(200, _norms(), loss=1.0), plan)  # b has not moved
    assert state.multiplier == pytest.approx(plan.growth)
    ahead = steer(state, Seen(210, _norms(b=0.01), loss=1.0), plan)
    assert ahead.multiplier == state.multiplier


@pytest.mark.backend_independent
def test_a_flops_target_counts_what_the_largest_savings_cover():
    plan = _plan(inactive=None, flops=0.5, savings={"a": 300, "b": 200, "c": 100},
                 base_flops=1000)
    assert plan.needed([], 1.0) == 2  # 300 + 200 cover the 500 to go
    assert plan.needed(["a"], 0.75) == 2  # 200 + 100 for the 250 left
    assert plan.needed(["a", "b"], 0.5) == 0


@pytest.mark.backend_independent
def test_the_schedule_fits_short_and_long_runs():
    # waiting for the loss to take off: the latest begin is half-way to the end step
    target = ls.DepthTarget(5)
    assert target.schedule(1000) == (250, 500)
    assert target.schedule(100_000) == (25_000, 50_000)
    fixed = ls.DepthTarget(5, wait_for_takeoff=False)
    assert fixed.schedule(1000) == (100, 500)
    assert fixed.schedule(100_000) == (10_000, 50_000)
    assert ls.DepthTarget(5, end_step=900).schedule(1000) == (450, 900)
    assert ls.DepthTarget(5, end_step=900, wait_for_takeoff=False).schedule(1000) == (100, 900)
    assert ls.DepthTarget(5, begin_step=0, end_step=50).schedule(None) == (0, 50)
    with pytest.raises(ValueError, match="explicit `end_step`"):
        target.schedule(None)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_step_strength_is_where_one_proximal_step_zeroes_the_layer(optimizer):
    keras.utils.set_random_seed(0)
    reg = ls.LayerSparsity(0.1, group="layer")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(
        4, kernel_regularizer=reg, bias_regularizer=reg, bias_initializer="ones")])
    opt = keras.optimizers.SGD(0.1) if optimizer == "sgd" else keras.optimizers.Adam(0.01)
    model.compile(opt, "mse")
    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    model.fit(x, x[:, :1] * np.ones((1, 4), "float32"), epochs=2, verbose=0)
    group = sparsity_groups(model)[0]
    strength = one_step_strength(group, opt)
    assert strength > 0
    current = [v.value for v in group.variables]
    steps = [optimizer_step_sizes(opt, v) for v in group.variables]
    if optimizer == "sgd":
        steps = steps[0]
    zeroed = group_prox(current, steps, strength * (1 + 1e-5))
    assert all(np.all(keras.ops.convert_to_numpy(t) >= 0) for t in zeroed)
    kept = group_prox(current, steps, strength * 0.9)
    assert any(np.any(keras.ops.convert_to_numpy(t) < 0) for t in kept)


def _data(n=256, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 4)).astype("float32")
    return x, np.maximum(x[:, :1], 0) + 0.5 * x[:, 1:2]


def _mlp(strength, hidden=5, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu", name="first")(inputs)
    for i in range(hidden):
        reg = ls.LayerSparsity(strength, group="layer")
        h = keras.layers.Dense(8, activation="relu", kernel_regularizer=reg,
                               bias_regularizer=reg, name=f"hidden{i}")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(h))


def test_the_starting_strength_does_not_change_the_run():
    x, y = _data()
    runs = []
    for strength in (1e-4, 1e-1):
        model = _mlp(strength)
        model.compile(keras.optimizers.Adam(3e-3), "mse")
        callback = ls.ActiveLayers(target=ls.DepthTarget(3))
        model.fit(x, y, batch_size=16, epochs=10, verbose=0, shuffle=False,
                  callbacks=[callback])
        runs.append((callback.progress, model.get_weights()))
    (first, weights), (second, others) = runs
    assert first.reached and first.held == second.held and first.holds == second.holds
    for a, b in zip(weights, others):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_holds_come_one_check_at_a_time_and_the_guard_is_logged():
    x, y = _data()
    model = _mlp(0.01)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    # an 80-step span: the multiplier may grow faster than the default 1.1 per check
    callback = ls.ActiveLayers(target=ls.DepthTarget(3, frequency=2, growth=1.3))
    history = model.fit(x, y, batch_size=16, epochs=10, verbose=0, shuffle=False,
                        validation_data=(x[:64], y[:64]), callbacks=[callback])
    holds = callback.progress.holds
    assert callback.progress.reached and len(set(holds.values())) == 3
    _, end = callback.target.schedule(160)
    begin = callback.progress.begin_step  # where the warm-up ended
    assert all(begin <= step <= end for step in holds.values())
    assert set(history.history["pull_guard"]) <= {0, 1, 2}
    assert history.history["pull_begin_step"][-1] == begin


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_every_hold_comes_by_the_end_step(optimizer):
    x, y = _data()
    model = _mlp(0.01)
    model.compile(keras.optimizers.SGD(0.05) if optimizer == "sgd"
                  else keras.optimizers.Adam(3e-3), "mse")
    callback = ls.ActiveLayers(target=ls.DepthTarget(3))  # the default warm-up and end
    model.fit(x, y, batch_size=16, epochs=10, verbose=0, shuffle=False, callbacks=[callback])
    _, end = callback.target.schedule(160)
    progress = callback.progress
    assert progress.reached and all(step <= end for step in progress.holds.values())


def test_pulling_every_layer_at_once_still_holds_one_per_check():
    x, y = _data()
    model = _mlp(0.01)
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    callback = ls.ActiveLayers(target=ls.DepthTarget(3, pull="all", frequency=2))
    model.fit(x, y, batch_size=16, epochs=10, verbose=0, shuffle=False, callbacks=[callback])
    progress = callback.progress
    assert progress.reached and len(set(progress.holds.values())) == 3
    assert sorted(n for n, v in ls.negative_part_norms(model).items() if v == 0) == sorted(
        progress.held)


def test_a_held_dense_layer_hands_its_map_on_and_stays_the_identity():
    x, y = _data()
    model = _mlp(0.01)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    callback = ls.ActiveLayers(target=ls.DepthTarget(3, frequency=2))
    model.fit(x, y, batch_size=16, epochs=10, verbose=0, shuffle=False, callbacks=[callback])
    held = callback.progress.held
    assert callback.progress.reached and held
    identity = {name for name in held
                if np.array_equal(model.get_layer(name).get_weights()[0], np.eye(8))}
    assert identity
    for name in held:  # every hidden layer is square and feeds a Dense layer
        kernel, bias = model.get_layer(name).get_weights()
        if name in identity:
            np.testing.assert_array_equal(bias, np.zeros(8, dtype="float32"))
        else:  # it feeds a layer frozen at the identity: that one cannot take its map
            following = f"hidden{int(name[len('hidden'):]) + 1}"
            assert following in identity and kernel.min() >= 0 and bias.min() >= 0
    folded = ls.fold(model)
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_without_rebase_the_held_layers_keep_their_own_weights():
    x, y = _data()
    model = _mlp(0.01)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    callback = ls.ActiveLayers(target=ls.DepthTarget(2, frequency=2, rebase=False))
    model.fit(x, y, batch_size=16, epochs=10, verbose=0, shuffle=False, callbacks=[callback])
    assert callback.progress.reached
    for name in callback.progress.held:
        kernel = model.get_layer(name).get_weights()[0]
        assert not np.array_equal(kernel, np.eye(8, dtype="float32")) and kernel.min() >= 0


@pytest.mark.backend_independent
def test_when_late_a_pull_is_calibrated_again_to_finish_in_time():
    plan = _plan(end=100, inactive=2)
    state = steer(Steering(), Seen(10, _norms(), loss=1.0), plan)
    assert state.pulled["b"].slot == pytest.approx(30)
    state = steer(state, Seen(80, _norms(b=0.15), loss=1.0), plan)
    # 20 steps left, 18 before the margin of two checks, for 2 layers: b gets 9,
    # measured from now, and a new scale
    assert state.pulled["b"] == Pull(80, 0.15, 9.0, first=0.2) and state.pulled["b"].scale is None


@pytest.mark.backend_independent
def test_when_late_a_line_that_ends_in_time_is_kept():
    plan = _plan(begin=60, end=100, inactive=2)
    state = steer(Steering(), Seen(60, _norms(), loss=1.0), plan)
    kept = state.pulled["b"]
    assert kept.start == 60 and 72 < kept.start + kept.slot < 80
    # late at step 72 (a share of 13 steps left per layer, 13.3 by the
    # schedule): b's line ends within its share, so it runs on as it is
    state = steer(state, Seen(72, _norms(b=0.05), loss=1.0), plan)
    assert state.pulled["b"] == kept and state.multiplier > 1.0


@pytest.mark.backend_independent
def test_the_remaining_slots_are_planned_from_the_steps_left_after_a_late_begin():
    plan = _plan(begin=600, end=1000, every=10, inactive=3)
    state = steer(Steering(), Seen(600, _norms(), loss=1.0), plan)  # the warm-up ends late
    # 400 steps left, 380 before the margin: a share is 126.7, a new pull keeps one back
    assert state.began == 600 and state.pulled["b"].slot == pytest.approx(100)
    state = steer(state, Seen(900, _norms(b=0.1), loss=1.0), plan)
    # late: 100 - 2 checks = 80 steps for 3 layers, calibrated anew from now
    room = 100 - MARGIN_CHECKS * 10
    assert state.pulled["b"] == Pull(900, 0.1, room / 3, first=0.2)


def _simulate(plan, push=0.002, loss=lambda step: 1.0, last=None):
    """Run `steer` against a model whose pulled layers move along their
    calibrated line, each step, less a constant `push` back by the data
    gradient; checks every `plan.every` steps and at the end step."""
    norms, state = {"a": 0.3, "b": 0.2, "c": 0.5}, Steering()
    steps = sorted(set(range(plan.every, last or plan.end + 10 * plan.every, plan.every))
                   | {plan.end})
    previous = 0
    for step in steps:
        for name, pull in state.pulled.items():
            for _ in range(step - previous):
                if push is not None and not state.paused:  # None: stuck
                    asked = pull.norm / pull.slot * state.multiplier
                    norms[name] = 0.0 if asked >= norms[name] else norms[name] - asked + push
        previous = step
        state = steer(state, Seen(step, dict(norms), loss=loss(step)), plan)
    return state


@pytest.mark.parametrize("begin", [10, 400, 500])
@pytest.mark.parametrize("push", [0.0, 0.002, 0.01])
def test_a_target_is_met_by_its_end_step_one_layer_per_check(begin, push):
    plan = _plan(begin=begin, end=600, every=3, inactive=3, warmup=False)
    state = _simulate(plan, push)
    assert state.reached and not state.stopped
    assert max(state.holds.values()) <= plan.end
    assert len(set(state.holds.values())) == 3  # one per check


def test_a_target_that_cannot_be_met_stops_at_the_end_step_and_never_holds_after_it():
    plan = _plan(begin=10, end=600, every=3, inactive=3)
    state = _simulate(plan, push=None)  # the data gradient undoes every pull
    assert not state.reached and state.stopped and "in time" in state.stopped
    assert not state.pulled and all(step <= plan.end for step in state.holds.values())


def test_the_loss_is_not_traded_for_the_end_step():
    plan = _plan(begin=10, end=600, every=3, inactive=3)
    # the loss goes to three times its level as soon as the pulls begin
    state = _simulate(plan, push=0.02, loss=lambda step: 1.0 if step < 20 else 3.0)
    assert not state.reached and state.stopped and "guard" in state.stopped
    assert state.limited and not state.pulled and not state.held


def test_rebase_refuses_what_it_cannot_hand_on_exactly():
    from tf_layersparse.steering import rebase_on_identity

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(4, activation="relu", name="active"),
                              keras.layers.Dense(3, activation="relu", name="wide",
                                                 kernel_initializer="ones"),
                              keras.layers.Dense(1, name="out")])
    weights = [w.copy() for w in model.get_weights()]
    assert not rebase_on_identity(model, "active")  # negative weights: its ReLU acts
    assert not rebase_on_identity(model, "wide")  # 4 -> 3 has no identity
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_rebase_never_hands_a_map_to_a_layer_frozen_at_the_identity():
    from tf_layersparse.steering import rebase_on_identity

    model = keras.Sequential([keras.Input((3,))] + [
        keras.layers.Dense(3, activation="relu", name=n, kernel_initializer="ones")
        for n in ("a", "b", "c")] + [keras.layers.Dense(1, name="out")])
    x = np.abs(np.random.default_rng(0).normal(size=(4, 3))).astype("float32")
    before = model.predict(x, verbose=0)
    assert rebase_on_identity(model, "c", nonnegative_inputs=True)
    assert not rebase_on_identity(model, "b", nonnegative_inputs=True, frozen=["c"])
    assert rebase_on_identity(model, "a", nonnegative_inputs=True, frozen=["c"])
    np.testing.assert_allclose(model.predict(x, verbose=0), before, rtol=1e-6)
