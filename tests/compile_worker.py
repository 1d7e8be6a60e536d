"""``smet-train`` whose ``torch.compile`` uses the ``aot_eager`` backend (Dynamo's graph capture and AOTAutograd, no
C++ build on a CPU) and counts what Dynamo captured: at exit it prints ``compiled graphs: N, with a recomputed decoder
layer: M, with the embedding: E, with a dense linear: L`` (graphs holding an activation checkpoint, an embedding
lookup, a dense ``F.linear``). Run by ``tests/test_train_fsdp.py`` through
``torchrun_launch.launch``."""

import atexit
import sys

import torch

compile_ = torch.compile
graphs = []


def aot_eager_counting(gm: torch.fx.GraphModule, example_inputs):
    targets = {node.target for node in gm.graph.nodes}
    graphs.append((torch.ops.higher_order.tag_activation_checkpoint in targets,
                   torch.nn.functional.embedding in targets, torch.nn.functional.linear in targets))
    return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)


def report() -> None:
    recomputed, embedding, linear = (sum(column) for column in zip(*graphs)) if graphs else (0, 0, 0)
    print(f"compiled graphs: {len(graphs)}, with a recomputed decoder layer: {recomputed}, with the embedding: "
          f"{embedding}, with a dense linear: {linear}", flush=True)


if __name__ == "__main__":
    from smet_kernels.train import cli

    torch.compile = lambda model, **kwargs: compile_(model, backend=aot_eager_counting, **kwargs)
    atexit.register(report)
    sys.exit(cli.main())
