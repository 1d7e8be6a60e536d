"""``smet-train`` whose ``torch.compile`` uses the ``aot_eager`` backend (Dynamo's graph capture and AOTAutograd, no
C++ build on a CPU) and counts what Dynamo captured: at exit it prints ``compiled graphs: N, with a recomputed decoder
layer: M`` (graphs holding an activation checkpoint). Run by ``tests/test_train_fsdp.py`` through
``torchrun_launch.launch``."""

import atexit
import sys

import torch

compile_ = torch.compile
graphs = []


def aot_eager_counting(gm: torch.fx.GraphModule, example_inputs):
    graphs.append(any(node.target is torch.ops.higher_order.tag_activation_checkpoint for node in gm.graph.nodes))
    return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)


def report() -> None:
    print(f"compiled graphs: {len(graphs)}, with a recomputed decoder layer: {sum(graphs)}", flush=True)


if __name__ == "__main__":
    from smet_kernels.train import cli

    torch.compile = lambda model, **kwargs: compile_(model, backend=aot_eager_counting, **kwargs)
    atexit.register(report)
    sys.exit(cli.main())
