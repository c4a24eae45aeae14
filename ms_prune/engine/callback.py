"""Run the algorithms inside ``mindspore.train.Model.train``.

``Model.train`` compiles one graph for the whole run and calls back between steps (once per
sink chunk in sink mode), so the algorithms that only write host values into the graph between
steps (PLD's theta, LRP's target schedule, a learning rate) run there; an algorithm that needs a
new graph during training (random-LTD's changing kept length, pruning in the middle of a run) is
refused when the callback is built, with the reason and the ``Trainer`` named.
"""
from mindspore.train import Callback

from ms_prune import protocol

from .engine import Engine
from .event import Event
from .state import State
from .trainer import LossWithTerms

__all__ = ["AlgorithmCallback"]


class AlgorithmCallback(Callback):
    """``callback = AlgorithmCallback(model, algorithms)`` applies INIT (surgery) at once, so build
    the loss net, the optimizer and the ``Model`` after it, with ``callback.loss_net(net)`` (adds the
    algorithms' loss terms) and ``callback.trainable_params()`` / ``callback.param_groups(...)``.
    Then ``Model.train(epochs, dataset, callbacks=[callback])``.
    """

    def __init__(self, model, algorithms, seed=0):
        super().__init__()
        refused = [a for a in algorithms if not a.runs_in_model_train]
        if refused:
            # refused before INIT, so the model is left untouched; an algorithm may say why (LRP: its
            # prune_at_step), else the general reason
            general = "needs a new graph during training (e.g. a changing kept length)"
            reasons = "; ".join(f"{a.name}: {getattr(a, 'model_train_refusal', None) or general}" for a in refused)
            raise ValueError(
                f"AlgorithmCallback: {[a.name for a in refused]} cannot run under mindspore Model.train, which "
                f"compiles one graph for the whole run ({reasons}). Train with ms_prune.engine.Trainer, which "
                f"keeps one compiled step per graph key.")
        self.state = State(model, algorithms, seed=seed)
        self.engine = Engine(self.state)
        self.engine.run_event(Event.INIT)
        protocol.refresh(model)
        self.state.structure_changed = False  # the user builds the network and Model after this

    def loss_net(self, loss_net):
        """``loss_net`` (as the algorithms' ``wrap_loss`` replace it) plus their loss terms, as one
        Cell for ``Model(network=...)`` or a ``TrainOneStepCell``."""
        for algorithm in self.state.algorithms:
            loss_net = algorithm.wrap_loss(loss_net, self.state)
        terms = [t for a in self.state.algorithms for t in a.loss_terms(self.state)]
        self.state.loss_net = LossWithTerms(loss_net, terms) if terms else loss_net
        return self.state.loss_net

    def param_groups(self, **defaults):
        """Optimizer groups: the model's trainable Parameters (with ``defaults``, e.g. lr) and the
        algorithms' own groups."""
        groups = [dict(g) for a in self.state.algorithms for g in a.param_groups(self.state)]
        claimed = {id(p) for g in groups for p in g["params"]}
        params = [p for p in self.state.model.trainable_params() if id(p) not in claimed]
        return [dict(defaults, params=params)] + groups

    def _sync(self, run_context):
        args = run_context.original_args()
        self.state.optimizer = getattr(args, "optimizer", None)
        return args

    def on_train_begin(self, run_context):
        self._sync(run_context)
        self.engine.run_event(Event.FIT_START)
        self.engine.run_event(Event.EPOCH_START)

    def on_train_step_begin(self, run_context):
        args = self._sync(run_context)
        self.state.step = int(args.cur_step_num) - 1  # cur_step_num counts from 1
        self.engine.run_event(Event.BATCH_START)

    def on_train_step_end(self, run_context):
        args = self._sync(run_context)
        self.state.step = int(args.cur_step_num)
        outputs = args.net_outputs
        loss = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        self.state.loss = float(loss.asnumpy()) if loss is not None else None
        self.engine.run_event(Event.AFTER_TRAIN_STEP)
        self.engine.run_event(Event.BATCH_END)
        if self.state.structure_changed:
            raise RuntimeError("AlgorithmCallback: an algorithm changed the model's structure during Model.train; "
                               "its compiled graph cannot follow. Use ms_prune.engine.Trainer.")

    def on_train_epoch_end(self, run_context):
        self.engine.run_event(Event.EPOCH_END)
        self.state.epoch += 1
        self.engine.run_event(Event.EPOCH_START)

    def on_train_end(self, run_context):
        self.engine.run_event(Event.FIT_END)
