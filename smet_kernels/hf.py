"""Hugging Face ``transformers`` integration: :class:`SMETCallback` drives the SMET controller from ``Trainer``.

Needs the optional extra ``hf`` (``pip install "smet_kernels[hf]"``)::

    optimizer = sk.SMETAdamW(model.parameters(), lr=1e-3)
    smet = sk.SMET(model, optimizer, update_interval=100, total_steps=args.max_steps)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None),
                      callbacks=[SMETCallback(smet)])
"""

from __future__ import annotations

from transformers import TrainerCallback

from .topology import SMET

#: key of the controller's state in the optimizer's ``state_dict`` (the Trainer's ``optimizer.pt``)
STATE_KEY = "smet"


class SMETCallback(TrainerCallback):
    """Runs ``smet.step()`` after every optimizer step of a ``transformers.Trainer`` and checkpoints the controller.

    The update runs in ``on_optimizer_step``, which the Trainer fires right after ``optimizer.step()`` and before
    ``model.zero_grad()``: the step's gradients still exist (RigL's dense gradients are recorded by the
    controller's own hooks during the backward pass). The controller's :meth:`SMET.state_dict` travels inside the
    optimizer's: a state-dict hook of ``smet.optimizer`` adds it under ``"smet"`` — so every Trainer checkpoint
    holds it in ``optimizer.pt``, next to the model's layouts (``block_indices`` tensors in the safetensors) — and a
    load hook restores it, so ``trainer.train(resume_from_checkpoint=...)`` continues the topology schedule
    exactly. The Trainer must step ``smet.optimizer``: pass ``optimizers=(smet.optimizer, None)``.
    """

    def __init__(self, smet: SMET):
        if not isinstance(smet, SMET):
            raise TypeError(f"smet must be an smet_kernels.SMET controller, got {type(smet).__name__}")
        self.smet = smet
        smet.optimizer.register_state_dict_post_hook(self._add_controller_state)
        smet.optimizer.register_load_state_dict_pre_hook(self._load_controller_state)

    def _add_controller_state(self, optimizer, state_dict: dict) -> dict:
        return {**state_dict, STATE_KEY: self.smet.state_dict()}

    def _load_controller_state(self, optimizer, state_dict: dict) -> dict:
        if STATE_KEY not in state_dict:
            return state_dict
        state_dict = dict(state_dict)
        self.smet.load_state_dict(state_dict.pop(STATE_KEY))
        return state_dict

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        """Refuse an optimizer other than ``smet.optimizer`` and a controller out of step with the Trainer."""
        stepped = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it in an AcceleratedOptimizer
        if stepped is not None and stepped is not self.smet.optimizer:
            raise ValueError(
                "the Trainer steps another optimizer than the SMET controller's: pass "
                "Trainer(..., optimizers=(smet.optimizer, None))"
            )
        if self.smet.step_count != state.global_step:
            raise ValueError(
                f"the SMET controller has counted {self.smet.step_count} optimizer steps but the Trainer starts at "
                f"step {state.global_step}: resume from a checkpoint saved with SMETCallback, with a fresh controller"
            )

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.smet.step()
