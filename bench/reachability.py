"""What qgoft's layouts reach: the measurements behind the theorem section of docs/METHODS.md.

For each layout and ``d`` (odd included):

* ``P``: rotations (angles) per layer; ``L``: layers; ``rank``: rank of the Jacobian of ``angles -> R`` at
  random angles (:func:`qgoft.solvers.chain_jacobian_rank`) against ``dim SO(d) = d (d - 1) / 2``;
* ``u -> v``: for ``--pairs`` random unit pairs (Gaussian, normalised, float64), the share a solver carried
  onto each other to ``|u R - v| < 1e-9``. Round-trip layouts use the closed-form solver
  (:func:`qgoft.solvers.solve_round_trip`); every other layout a numerical one (L-BFGS on ``|u R - v|^2``
  from ``--restarts`` random starts), whose failure is evidence, not proof, of unreachability;
* the adaptive construction (:func:`qgoft.solvers.solve_adaptive`, ``d - 1`` pairs chosen per ``(u, v)``).

    python bench/reachability.py                 # the table in docs/METHODS.md (a few minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qgoft import layouts, reference, solvers  # noqa: E402

TOL = 1e-9


def apply_chain(layout, angles, u):
    return reference.givens_chain_reference(u[None], angles, layout.pairs_tensor(),
                                            layout.layer_offsets_tensor())[0]


def numerical_reach(layout, u, v, restarts, generator) -> bool:
    """L-BFGS on the squared residual from random starts; True when one start reaches ``|u R - v| < TOL``."""
    for _ in range(restarts):
        angles = ((torch.rand(layout.num_pairs, generator=generator, dtype=torch.float64) * 2 - 1) * math.pi)
        angles.requires_grad_(True)
        optimizer = torch.optim.LBFGS([angles], lr=1.0, max_iter=400, tolerance_grad=1e-15,
                                      tolerance_change=1e-18, history_size=50, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = (apply_chain(layout, angles, u) - v).pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            if (apply_chain(layout, angles, u) - v).norm() < TOL:
                return True
    return False


def layouts_for(d):
    parallel = layouts.parallel(d)
    return [
        ("parallel", parallel, None),
        ("sequential", layouts.sequential(d), None),
        ("butterfly", layouts.butterfly(d), None),
        ("parallel×2", layouts.stack(parallel, 2), None),
        ("parallel×3", layouts.stack(parallel, 3), None),
        ("parallel + mirror", solvers.round_trip(parallel), parallel),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="3,4,5,7,8,9,16,17,33")
    ap.add_argument("--pairs", type=int, default=12, help="random (u, v) pairs per layout and d")
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--rank-max-d", type=int, default=33, help="Jacobian ranks up to this d")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    print("| d | layout | P (rotations) | L (layers) | Jacobian rank / dim SO(d) | u -> v reached | solver |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for d in [int(x) for x in args.dims.split(",")]:
        problems = []
        for _ in range(args.pairs):
            u = torch.randn(d, generator=generator, dtype=torch.float64)
            v = torch.randn(d, generator=generator, dtype=torch.float64)
            problems.append((u / u.norm(), v / v.norm()))
        for name, layout, gather in layouts_for(d):
            start = time.perf_counter()
            rank = solvers.chain_jacobian_rank(layout) if d <= args.rank_max_d else None
            if gather is not None:
                hits = sum(bool((apply_chain(layout, solvers.solve_round_trip(gather, u, v), u) - v).norm() < TOL)
                           for u, v in problems)
                how = "closed form"
            else:
                hits = sum(numerical_reach(layout, u, v, args.restarts, generator) for u, v in problems)
                how = f"L-BFGS, {args.restarts} starts"
            rank_text = f"{rank} / {d * (d - 1) // 2}" if rank is not None else f"- / {d * (d - 1) // 2}"
            print(f"| {d} | {name} | {layout.num_pairs} | {layout.num_layers} | {rank_text} | "
                  f"{hits}/{len(problems)} | {how} ({time.perf_counter() - start:.0f} s) |", flush=True)
        hits = 0
        for u, v in problems:
            layout, angles = solvers.solve_adaptive(u, v)
            hits += bool((apply_chain(layout, angles, u) - v).norm() < TOL)
        print(f"| {d} | adaptive (pairs chosen per u, v) | {d - 1} | {d - 1} | - | {hits}/{len(problems)} | "
              "closed form |", flush=True)


if __name__ == "__main__":
    main()
