"""One rank of a two-process ``transformers.Trainer`` DDP run (gloo, CPU) with SMET: trains, then saves what the
test compares across ranks (layouts, values, the controller's step count and update steps) to ``OUT/rank<R>.pt``.
Run by ``tests/test_hf.py`` through ``torchrun_launch.launch``."""

import argparse
import os

import torch
import torch.distributed as dist
import transformers

import smet_kernels as sk
from smet_kernels.hf import SMETCallback

parser = argparse.ArgumentParser()
parser.add_argument("--regrow", default="gradient")
parser.add_argument("--out-dir", required=True)
args = parser.parse_args()

config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
torch.manual_seed(0)  # the same initial model and layouts on every rank
model = sk.sparsify(transformers.LlamaForCausalLM(config), 0.5, block_size=16, exclude="lm_head",
                    generator=torch.Generator().manual_seed(0), backend="reference")  # fmt: skip
optimizer = sk.SMETAdamW(model.parameters(), lr=1e-2, warmup_steps=3, backend="reference")
smet = sk.SMET(model, optimizer, update_interval=3, prune_fraction=0.3, regrow=args.regrow, seed=3)
initial = [m.layout.block_indices.clone() for m in model.modules() if isinstance(m, sk.BlockSparseLinear)]
training_args = transformers.TrainingArguments(
    args.out_dir, max_steps=7, per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no", seed=0,
    report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
)  # fmt: skip
ids = torch.randint(0, 128, (64, 16), generator=torch.Generator().manual_seed(1))
data = [{"input_ids": row, "labels": row} for row in ids]
trainer = transformers.Trainer(model=model, args=training_args, train_dataset=data, optimizers=(optimizer, None),
                               callbacks=[SMETCallback(smet)])  # fmt: skip
trainer.train()
sparse = [m for m in model.modules() if isinstance(m, sk.BlockSparseLinear)]
torch.save({"world_size": training_args.world_size, "initial": initial, "steps": smet.state_dict()["step"],
            "updates": [record["step"] for record in smet.history], "layouts": [m.layout.block_indices for m in sparse],
            "values": [m.values.detach() for m in sparse]}, os.path.join(args.out_dir, f"rank{os.environ['RANK']}.pt"))
# the Trainer leaves its gloo group up: shut it down here, not in the interpreter's teardown, where a rank once
# aborted ('terminate called without an active exception') with its gloo threads still running
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
