"""One row per algorithm: what the generic suite (``test_algorithm_suite.py``) needs to run it.
A new algorithm is tested by adding a row.

Each row maps a name to a dict:

* ``algorithm``: ``() -> Algorithm`` (a fresh instance, arguments for a tiny run);
* ``model``: ``() -> model`` (tiny, dropout 0: MindSpore's dropout kernels keep their random
  state inside the kernel, so only a dropout-free model can resume to the identical next loss);
* ``data``: ``step -> batch`` (tuple of numpy arrays: model inputs, then targets);
* ``loss_fn``: ``(outputs, *targets) -> loss``, a module-level function (graph mode parses it);
* ``apply`` / ``remove``: the functional form and its inverse, ``model -> anything``;
* ``adds_tensors``: names a prefix test for tensors the functional form adds to the model (gates),
  or None: then the model's tensor names must be exactly the original ones after ``apply``;
* ``model_train``: True if the algorithm runs under ``AlgorithmCallback`` with
  ``mindspore.train.Model.train``; False if the callback must refuse it, naming the Trainer;
* ``steps``: how many steps the suite trains;
* ``acts_per_step`` (default True): False for an algorithm that acts at INIT alone (it builds the
  loss, as distillation does), so no BATCH_START is expected under ``Model.train``.
"""
import numpy as np
import mindspore as ms
from mindspore import ops

from ms_prune.distill import Distillation, apply_distillation, remove_distillation
from ms_prune.gradnas import GradNAS
from ms_prune.gradnas.masks import attach_masks, detach
from ms_prune.heads.algorithm import LRP, apply_lrp, remove_lrp
from ms_prune.layer_drop import ProgressiveLayerDropping, apply_progressive_layer_drop, remove_progressive_layer_drop
from ms_prune.models.bert import BertConfig, BertForSequenceClassification
from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
from ms_prune.token_drop import RandomLTD, apply_random_ltd, remove_random_ltd

VOCAB = 60


def tiny_bert(pre_layer_norm=False):
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
        pre_layer_norm=pre_layer_norm))


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=3, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def classification_batch(step, batch=8, seq=12):
    rng = np.random.default_rng(step)
    ids = rng.integers(0, VOCAB, (batch, seq)).astype(np.int32)
    return ids, (ids[:, 0] % 3).astype(np.int32)


def lm_batch(step, batch=4, seq=16):
    ids = np.random.default_rng(step).integers(0, VOCAB, (batch, seq + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def classification_loss(logits, labels):
    return ops.cross_entropy(logits, labels)


def lm_loss(logits, labels):
    return ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def pre_ln_bert():
    return tiny_bert(pre_layer_norm=True)  # PLD refuses post-LN BERT


# 16 tokens, kept length 4 -> 16 over 6 steps (4, 4, 8, 8, 12, 12): the step after the resume drops tokens
RANDOM_LTD = dict(min_value=4, max_value=16, require_steps=6, seq_per_step=4)


def apply_tiny_random_ltd(model):
    return apply_random_ltd(model, **RANDOM_LTD)


def tiny_teacher():
    """A GPT-2 of the student's shape with other weights, the same in every process (the global
    seed is restored after: the student's initialisation does not depend on the teacher's)."""
    seed = ms.get_seed()
    ms.set_seed(7)
    teacher = tiny_gpt2()
    if seed is not None:
        ms.set_seed(seed)
    return teacher


DISTILLATION = dict(temperature=2.0, alpha=0.7, top_k=8, vocab_chunk=16)
def apply_tiny_distillation(model):
    return apply_distillation(model, tiny_teacher(), lm_loss, **DISTILLATION)


def is_gate_tensor(name):
    return ".head_gate." in name


def is_gradnas_mask(name):
    return name.endswith((".head_gate.mask", ".neuron_gate.mask"))


ALGORITHM_SETTINGS = {
    "lrp": dict(
        algorithm=lambda: LRP(target_heads=5, warmup_steps=3, gate_lr=0.3),
        model=tiny_bert, data=classification_batch, loss_fn=classification_loss,
        apply=apply_lrp, remove=remove_lrp, adds_tensors=is_gate_tensor, model_train=True, steps=6),
    # GradNAS's reversible functional step is putting its scoring masks (ones) in and taking them
    # out; the pruning itself (apply_gradnas) removes units and has no inverse.
    "gradnas": dict(
        algorithm=lambda: GradNAS([classification_batch(100 + i) for i in range(2)], constraints={"flops": "60%"},
                                  seq_len=12, at_step=2),
        model=tiny_bert, data=classification_batch, loss_fn=classification_loss,
        apply=attach_masks, remove=detach, adds_tensors=is_gradnas_mask, model_train=False, steps=6),
    "progressive_layer_drop": dict(
        algorithm=lambda: ProgressiveLayerDropping(theta=0.5, gamma=0.5),
        model=pre_ln_bert, data=classification_batch, loss_fn=classification_loss,
        apply=apply_progressive_layer_drop, remove=remove_progressive_layer_drop, adds_tensors=None,
        model_train=True, steps=6),
    "random_ltd": dict(
        algorithm=lambda: RandomLTD(**RANDOM_LTD),
        model=tiny_gpt2, data=lm_batch, loss_fn=lm_loss,
        apply=apply_tiny_random_ltd, remove=remove_random_ltd, adds_tensors=None, model_train=False, steps=6),
    "distillation": dict(
        algorithm=lambda: Distillation(tiny_teacher(), **DISTILLATION),
        model=tiny_gpt2, data=lm_batch, loss_fn=lm_loss,
        apply=apply_tiny_distillation, remove=remove_distillation, adds_tensors=None, model_train=True, steps=6,
        acts_per_step=False),
}
