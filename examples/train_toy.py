"""End-to-end qgoft example on the CPU: adapt a "pretrained" MLP to a shifted task with (q)GOFT.

1. Pretrain a small MLP classifier on synthetic data (task A).
2. Task B is task A seen through an unknown rotation of the input space (a domain shift an
   orthogonal adapter can undo). The pretrained model does poorly on it.
3. Wrap every Linear with qgoft.nn.Linear (base weights frozen, identity-initialised adapters),
   train only the adapters (plus the qGOFT soft-orthogonality penalty), watch the loss go down.
4. Merge the adapters into the weights and check the merged model gives the same outputs.

    python examples/train_toy.py [--method qgoft|goft|goft_scaled] [--layout butterfly] [--steps 300]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import qgoft


def make_task(n: int, d: int, classes: int, generator: torch.Generator, centers: torch.Tensor,
              rotation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, classes, (n,), generator=generator)
    x = centers[y] + 1.6 * torch.randn(n, d, generator=generator)
    if rotation is not None:
        x = x @ rotation.T
    return x, y


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def wrap_linears(model: nn.Module, method: str, layout: str, stack: int) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear) and not isinstance(child, qgoft.nn.Linear):
            setattr(model, name, qgoft.nn.Linear.from_linear(child, method=method, layout=layout, stack=stack))
        else:
            wrap_linears(child, method, layout, stack)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="qgoft", choices=["goft", "goft_scaled", "qgoft"])
    ap.add_argument("--layout", default="butterfly", help="parallel | sequential | butterfly")
    ap.add_argument("--stack", type=int, default=2, help="repeat the layout this many times")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--ortho-weight", type=float, default=1e-2, help="λ of the qGOFT penalty")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    d, hidden, classes = 64, 256, 10
    info = qgoft.build_info()
    print(f"qgoft {qgoft.__version__}: compiled kernels {'on' if info['extension_loaded'] else 'OFF (reference fallback)'}"
          f", CPU ISA {info.get('cpu_isa_selected', '-')}, {torch.get_num_threads()} threads")

    centers = 1.5 * torch.randn(classes, d, generator=gen)
    xa, ya = make_task(8000, d, classes, gen, centers)
    model = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                          nn.Linear(hidden, classes))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(400):
        idx = torch.randint(0, xa.shape[0], (256,), generator=gen)
        loss = nn.functional.cross_entropy(model(xa[idx]), ya[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))  # the unknown domain shift
    xb, yb = make_task(8000, d, classes, gen, centers, rotation=q)
    xb_test, yb_test = make_task(2000, d, classes, gen, centers, rotation=q)
    xa_test, ya_test = make_task(2000, d, classes, gen, centers)
    print(f"pretrained model: task A accuracy {accuracy(model, xa_test, ya_test):.3f}, "
          f"shifted task B accuracy {accuracy(model, xb_test, yb_test):.3f}")

    wrap_linears(model, args.method, args.layout, args.stack)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"adapting with {args.method} ({args.layout} x{args.stack}): {trainable:,} trainable of {total:,} "
          f"parameters ({100 * trainable / total:.2f}%)")
    with torch.no_grad():
        before = model(xb_test)
    adapters = [m for m in model.modules() if isinstance(m, qgoft.nn.Linear)]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, xb.shape[0], (256,), generator=gen)
        task_loss = nn.functional.cross_entropy(model(xb[idx]), yb[idx])
        penalty = sum(m.orthogonality_penalty() for m in adapters)
        loss = task_loss + args.ortho_weight * penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % max(1, args.steps // 6) == 0 or step == args.steps:
            print(f"  step {step:4d}  loss {task_loss.item():.4f}  ortho penalty {float(penalty.detach()):.2e}")
    elapsed = time.perf_counter() - t0
    print(f"trained {args.steps} steps in {elapsed:.1f} s ({1e3 * elapsed / args.steps:.1f} ms/step)")
    print(f"adapted model: shifted task B accuracy {accuracy(model, xb_test, yb_test):.3f}")

    with torch.no_grad():
        adapted = model(xb_test)
        for m in adapters:
            m.merge()
        merged = model(xb_test)
    rel = ((merged - adapted).abs().max() / adapted.abs().max()).item()
    same = (merged.argmax(-1) == adapted.argmax(-1)).float().mean().item()
    print(f"merged adapters into the weights: max relative output difference {rel:.2e}, "
          f"identical predictions {100 * same:.1f}%")
    for m in adapters:
        m.unmerge()
    assert rel < 1e-5, "merged model differs from the adapted model"
    assert not torch.equal(before, adapted), "training did not change the model"


if __name__ == "__main__":
    main()
