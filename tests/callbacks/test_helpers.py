import pytest
import torch

from lightning_lip.callbacks._logging import WarnOnce
from lightning_lip.callbacks._measuring import Differentiation, module_loss
from lightning_lip.callbacks._optimizers import StepHooks, held_parameters
from lightning_lip.functional import per_sample_grads
from tests.models import Classifier, mlp


def differentiation(generator=None):
    generator = generator or torch.Generator()
    return Differentiation("Owner", WarnOnce(), generator, consequence="it stops.")


def test_falls_back_to_autograd_once_and_replays_the_generator():
    """A failed torch.func attempt is retried with autograd from the generator's state before it, warned once; later
    measurements go to autograd directly."""
    generator = torch.Generator().manual_seed(0)
    attempts = []

    def attempt(autograd):
        attempts.append(autograd)
        draw = torch.rand(1, generator=generator).item()
        if not autograd:
            raise RuntimeError("no transform\nsecond line")
        return draw

    diff = differentiation(generator)
    first_draw = torch.rand(1, generator=torch.Generator().manual_seed(0)).item()
    with pytest.warns(
        UserWarning, match=r"^Owner: torch.func cannot transform this model's loss \(no transform\); .*loop"
    ):
        assert diff(attempt, Classifier(mlp())) == first_draw
    assert diff(attempt, Classifier(mlp())) != first_draw
    assert attempts == [False, True, True] and diff.autograd and diff.failure is None


def test_fails_with_both_reasons_and_the_remedy_then_stays_failed():
    def attempt(autograd):
        raise RuntimeError("autograd failed" if autograd else "func failed")

    diff = differentiation()
    expected = (
        r"Owner cannot differentiate this model's loss \(torch.func: func failed; torch.autograd: autograd failed\)"
    )
    with pytest.warns(UserWarning, match=expected + "; it stops. If `training_step`.*define `lip_loss"):
        assert diff(attempt, Classifier(mlp())) is None
    assert diff.failure == "torch.func: func failed; torch.autograd: autograd failed"


def test_any_error_of_the_loss_stops_the_measurements_named_by_its_type():
    """The user's loss runs on batches of one and under ``vmap``: an assertion on the batch size or a metric that
    needs two classes must stop the measurements, not training."""

    def attempt(autograd):
        raise ValueError("Only one class present in y_true") if autograd else AssertionError()

    diff = differentiation()
    with pytest.warns(UserWarning, match="cannot differentiate"):
        assert diff(attempt, Classifier(mlp())) is None
    assert diff.failure == "torch.func: AssertionError; torch.autograd: ValueError: Only one class present in y_true"


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("out of memory"), MemoryError("pass a smaller chunk_size")])
def test_out_of_memory_is_raised_in_either_attempt(error):
    def attempt(autograd):
        raise error if autograd else RuntimeError("func failed")

    with pytest.raises(type(error)):
        differentiation()(attempt, Classifier(mlp()))


def test_a_training_step_that_returns_no_loss_is_a_clear_error_in_either_engine():
    """A `training_step` that returns `None` (it skips a batch) where a measurement evaluates it."""

    class NoLoss(Classifier):
        def training_step(self, batch, batch_idx):
            return None

    model = NoLoss(mlp())
    batch = (torch.randn(8, 16), torch.randint(0, 4, (8,)))
    for autograd in (False, True):
        with pytest.raises(RuntimeError, match="`training_step` returned NoneType, not a loss tensor"):
            per_sample_grads(model, module_loss(model), batch, autograd=autograd)


def test_held_parameters_are_the_modules_the_optimizers_step_or_all_where_they_step_copies():
    """A head's optimizer holds the head's parameters; an optimizer over copies (a strategy that steps master
    weights) holds none of the module's, and then every parameter counts as stepped rather than none."""
    net = mlp()
    head = torch.optim.SGD(net[4].parameters(), lr=0.1)
    copies = torch.optim.SGD([p.detach().clone().requires_grad_() for p in net.parameters()], lr=0.1)
    heads = {id(p) for p in net[4].parameters()}
    assert held_parameters([head], net) == held_parameters([head, copies], net) == heads
    assert held_parameters([copies], net) == {id(p) for p in net.parameters()}


def test_step_hooks_move_to_the_optimizers_that_replace_the_hooked_ones():
    """The same optimizers keep their hooks (registered once); others take them over, and the old ones lose them.
    ``post_first`` puts the post-hook before those registered earlier."""
    calls = []
    params = [torch.nn.Parameter(torch.zeros(2))]
    old, new = torch.optim.SGD(params, lr=0.1), torch.optim.SGD(params, lr=0.1)
    new.register_step_post_hook(lambda *args: calls.append("earlier"))
    hooks = StepHooks()
    pre, post = (lambda opt, args, kwargs: calls.append(("pre", opt))), (lambda opt, args, kwargs: calls.append("post"))
    assert hooks.follow([old], pre=pre, post=post, post_first=True)
    assert not hooks.follow([old], pre=pre, post=post, post_first=True)
    old.step()
    assert calls == [("pre", old), "post"]
    assert hooks.follow([new], pre=pre, post=post, post_first=True) and hooks.optimizers == (new,)
    calls.clear()
    old.step()
    new.step()
    assert calls == [("pre", new), "post", "earlier"]
    hooks.remove()
    calls.clear()
    new.step()
    assert calls == ["earlier"] and hooks.optimizers == ()
