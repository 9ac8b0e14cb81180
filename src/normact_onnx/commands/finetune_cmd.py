"""``normact-onnx finetune``: adaptive (ANAct) or static fine-tuning, on PyTorch or ONNX Runtime training.

``--backend torch`` runs in the main environment (the ``[torch]`` extra); ``--backend ort`` needs the
``[train]`` environment (onnxruntime-training cannot share one with onnxruntime). The default is ``ort``
inside such an environment, ``torch`` elsewhere; a backend that is not installed is one line saying how
to get it.
"""

from __future__ import annotations

import argparse

from ..errors import NormactError
from ..methods.static import VARIANTS
from ..training import BACKENDS, finetune
from ..training.backend import resolve_backend
from ..training.losses import LOSSES
from .common import SelectionArgs, add_factor_flags, check_paths, default_output, output_label, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune with normalized activations (PyTorch or ONNX Runtime training)",
        description="Fine-tune a model with adaptive (ANAct) or static normalized activations, on PyTorch (the main "
        "environment) or ONNX Runtime training (the [train] environment), then export the inference model in the "
        "Norm<Act> form.",
    )
    p.add_argument("model", help="path to an .onnx file (plain or already normalized)")
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help=".npz with one array per model input and the labels")
    d.add_argument("--labels", default="y", help="name of the labels array in --data/--val (default y)")
    d.add_argument("--val", help="validation .npz (same keys), evaluated after each epoch")
    t = p.add_argument_group("training")
    t.add_argument(
        "--loss",
        choices=LOSSES,
        default="cross-entropy",
        help="cross-entropy (labels: class indices, [N] or [N, T] for sequence outputs), bce (targets in [0, 1] "
        "shaped like the output) or mse; a Softmax/Sigmoid output is trained on its input (the logits)",
    )
    t.add_argument("--epochs", type=int, default=1, help="passes over --data (default 1)")
    t.add_argument("--batch-size", type=int, default=64, help="samples per training step (default 64)")
    t.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    t.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="adamw (default) or sgd")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    t.add_argument("--max-steps", type=int, help="stop after this many steps in total")
    t.add_argument("--seed", type=int, default=0, help="shuffling seed")
    t.add_argument("--freeze", metavar="REGEX", help="keep initializers whose name matches frozen")
    t.add_argument("--output-name", help="model output the loss is computed on (default: the first)")
    t.add_argument(
        "--backend",
        choices=BACKENDS,
        help="torch: PyTorch in this environment; ort: onnxruntime-training (its own environment); default: ort "
        "inside an onnxruntime-training environment, torch elsewhere",
    )
    t.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="torch backend: where training runs (default: cuda when torch sees a GPU, else cpu)",
    )
    m = p.add_argument_group("method")
    m.add_argument(
        "--method",
        choices=("anact", "static", "none"),
        default="anact",
        help="anact: adaptive factors from batch statistics (default); static: fixed Gaussian constants; "
        "none: train the model as it is (no new normalization; sites an earlier rewrite normalized keep their "
        "constants)",
    )
    m.add_argument(
        "--init",
        choices=("auto", "preserve", "normalize"),
        default="auto",
        help="preserve: keep the model's function (rewrite --preserve-function; the factors' updates are "
        "compensated, so only the gradient steps change it); normalize: every site starts at ANAct's Gaussian "
        "factors (a freshly initialized model); auto (default): preserve when the model looks pretrained",
    )
    m.add_argument("--variant", choices=VARIANTS, default="center-scale", help="static variant")
    m.add_argument("--q", type=float, default=1.0, help="static design variance")
    add_factor_flags(m, aggregate=False)
    SelectionArgs().add(p)
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", help="inference model (default: <model>.tuned.onnx)")
    o.add_argument("--workdir", help="artifacts, checkpoints, log.csv, loss.png (default: <output>.train/)")
    o.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --workdir")
    o.add_argument("--fold", action="store_true", help="fold the normalization into the next layers on export")
    o.add_argument("--no-verify", action="store_true", help="skip the export's verification")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    output = args.output or default_output(args.model, ".tuned.onnx")
    work = args.workdir or default_output(str(output), ".train")
    check_paths(args, {output_label(args): output, "--workdir": work}, ("--data", args.data), ("--val", args.val))
    backend = resolve_backend(args.backend)  # a missing runtime: one line, before any work
    if args.device not in (None, "cpu") and backend != "torch":
        raise NormactError("--device applies to the torch backend; the ort backend trains on the CPU")
    result = finetune(
        args.model,
        args.data,
        labels=args.labels,
        val=args.val,
        output=args.output,
        workdir=args.workdir,
        resume=args.resume,
        selection=SelectionArgs().value(args),
        output_name=args.output_name,
        freeze=args.freeze,
        fold=args.fold,
        verify=not args.no_verify,
        progress=not args.quiet,
        loss=args.loss,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        method=args.method,
        variant=args.variant,
        q=args.q,
        lambda_rule=args.lambda_rule,
        centered_rho=args.centered_rho,
        seed=args.seed,
        max_steps=args.max_steps,
        init=args.init,
        backend=backend,
        device=args.device,
    )
    if args.json:
        print_json(result.report())
        return 0
    for row in result.history:
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    print(f"\nwrote {result.output} (reproduces the training graph to {result.export_max_abs_diff:.2g})")
    print(f"log, checkpoints and loss curve in {result.workdir}")
    return 0
