"""Python side of the C++ inference example: save a small model with qgoft layers, then check C++ outputs.

    python export_model.py save OUT_DIR [--aoti]
        OUT_DIR/model.pt         scripted TorchScript module (torch.jit.script + torch.jit.save)
        OUT_DIR/model_traced.pt  traced TorchScript module (torch.jit.trace)
        OUT_DIR/model.pt2        AOTInductor package, first dimension dynamic (with --aoti)
        OUT_DIR/input.pt         the input tensor (torch.save), OUT_DIR/expected.pt the eager output
    python export_model.py compare EXPECTED.pt OUTPUT.pt [OUTPUT.pt ...] [--tol 1e-5]
        exits 1 unless every OUTPUT (written by qgoft_infer) matches EXPECTED within the tolerance

The model has all three methods on three layouts (qgoft/butterfly, goft_scaled/parallel,
goft/sequential, the last one merged), with seeded non-trivial adapter parameters.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import qgoft
import qgoft.export


class TinyEncoder(nn.Module):
    """Linear -> GELU -> Linear -> tanh -> Linear on inputs of shape (..., 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.down(F.gelu(self.up(x)))))


def build_model(seed: int = 0) -> nn.Module:
    """TinyEncoder with every Linear adapted by qgoft (non-identity adapters; ``head`` merged)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyEncoder()
    model.up = qgoft.nn.Linear.from_linear(model.up, method="qgoft", layout="butterfly")
    model.down = qgoft.nn.Linear.from_linear(model.down, method="goft_scaled", layout="parallel")
    model.head = qgoft.nn.Linear.from_linear(model.head, method="goft", layout="sequential")
    with torch.no_grad():
        for layer in (model.up, model.down, model.head):
            for param in layer.adapter_parameters():
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    model.head.merge()
    return model.eval()


def save(out_dir: Path, aoti: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model()
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    torch.save(x, out_dir / "input.pt")
    torch.save(expected, out_dir / "expected.pt")
    qgoft.export.save_torchscript(model, out_dir / "model.pt", x)
    qgoft.export.save_torchscript(model, out_dir / "model_traced.pt", x, trace=True)
    written = ["model.pt", "model_traced.pt"]
    if aoti:
        batch = torch.export.Dim("batch", min=1, max=1024)  # any number of sequences
        package = qgoft.export.save_aoti_package(model, out_dir / "model.pt2", (x,),
                                                 dynamic_shapes=({0: batch},))
        with torch.no_grad():
            # Loaded from Python too: the same package must reproduce eager before C++ runs it.
            torch.testing.assert_close(torch._inductor.aoti_load_package(package)(x), expected,
                                       rtol=1e-5, atol=1e-5)
        written.append("model.pt2")
    print(f"saved {', '.join(written)}, input.pt {tuple(x.shape)}, expected.pt {tuple(expected.shape)} "
          f"in {out_dir}")


def compare(expected_path: Path, output_paths: list[Path], tol: float) -> bool:
    expected = torch.load(expected_path)
    ok = True
    for path in output_paths:
        output = torch.load(path)
        if output.shape != expected.shape or output.dtype != expected.dtype:
            print(f"FAIL {path}: {tuple(output.shape)} {output.dtype}, expected "
                  f"{tuple(expected.shape)} {expected.dtype}")
            ok = False
            continue
        diff = (output.double() - expected.double()).abs().max().item()
        good = diff <= tol
        ok = ok and good
        print(f"{'ok  ' if good else 'FAIL'} {path}: max |C++ - Python| = {diff:.3g} (tolerance {tol:g})")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    save_cmd = commands.add_parser("save", help="save the model, its input and the expected output")
    save_cmd.add_argument("out_dir", type=Path)
    save_cmd.add_argument("--aoti", action="store_true", help="also write an AOTInductor package")
    compare_cmd = commands.add_parser("compare", help="compare C++ outputs with the expected output")
    compare_cmd.add_argument("expected", type=Path)
    compare_cmd.add_argument("outputs", type=Path, nargs="+")
    compare_cmd.add_argument("--tol", type=float, default=1e-5)
    args = parser.parse_args(argv)
    if args.command == "save":
        save(args.out_dir, args.aoti)
        return 0
    return 0 if compare(args.expected, args.outputs, args.tol) else 1


if __name__ == "__main__":
    sys.exit(main())
