"""Float32 error of Winograd F(m x m, 3x3) against float64, as a multiple of the direct convolution's.

    python bench/winograd_accuracy.py

The question it answers (issue 17): would Winograd F(4x4, 3x3), 4x fewer multiplications than the
direct convolution where F(2x2, 3x3) does 2.25x, stay within the accuracy bar of our inference
path (no more than 2x the error of oneDNN's direct convolution against float64)? The transforms
are built by Toom-Cook from interpolation points (A^T a Vandermonde matrix, the 1/f scale factors
in G, B^T solved exactly and checked), the weights transformed in float64 and rounded once (as
``resnet_fast::winograd_weight`` does), the sum over input channels in the transformed domain
accumulated in float32 (a batched matrix product, as ``conv3x3_bias_act`` does). ``--stages64``
also runs the input and output transforms in float64, to tell the transforms' rounding from the
accumulation's. He-initialised weights, ReLU'd inputs, as in a ResNet.

This is a sketch of the arithmetic, not our kernel: its F(2x2, 3x3) line (MKL's batched product
over all channels) is the yardstick for its F(4x4, 3x3) lines. The shipped Winograd's accuracy is
tested on whole networks against torchvision's float32 error (tests/models/test_drop_in.py).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

POINTS = {
    2: {"0, 1, -1": [0, 1, -1]},
    4: {
        "0, 1, -1, 2, -2 (the usual)": [0, 1, -1, 2, -2],
        "0, 1, -1, 1/2, -1/2": [0, 1, -1, 0.5, -0.5],
        "0, 1, -1, 1/2, -2": [0, 1, -1, 0.5, -2],
        "0, 1/2, -1/2, 2, -2": [0, 0.5, -0.5, 2, -2],
    },
}


def toom_cook(points: list[float], m: int, r: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B^T, G, A^T) of F(m, r) with these finite points and infinity."""
    n = m + r - 1
    assert len(points) == n - 1
    at, g = np.zeros((m, n)), np.zeros((n, r))
    for j, a in enumerate(points):
        f = np.prod([a - b for b in points if b != a])
        at[:, j] = [a**i for i in range(m)]
        g[j, :] = [a**k / f for k in range(r)]
    at[m - 1, n - 1] = g[n - 1, r - 1] = 1.0
    # y_i = sum_j A^T[i, j] (G g)_j (B^T d)_j must be sum_k d[i + k] g[k]: linear in B^T's columns.
    system = np.array([at[i, :] * g[:, k] for i in range(m) for k in range(r)])
    bt = np.zeros((n, n))
    for col in range(n):
        rhs = np.array([1.0 if col == i + k else 0.0 for i in range(m) for k in range(r)])
        bt[:, col] = np.linalg.lstsq(system, rhs, rcond=None)[0]
    rng = np.random.default_rng(0)
    d, w = rng.standard_normal(n), rng.standard_normal(r)
    assert np.allclose(at @ ((g @ w) * (bt @ d)), [d[i : i + r] @ w for i in range(m)], atol=1e-9)
    return bt, g, at


def winograd_conv3x3(x: torch.Tensor, w: torch.Tensor, mats, m: int, stages64: bool = False) -> torch.Tensor:
    """Stride 1, padding 1, (1, C, H, W) with H and W multiples of m; float32 accumulation."""
    bt, g, at = (torch.tensor(a, dtype=torch.float64) for a in mats)
    t, c = m + 2, x.shape[1]
    tiles = F.pad(x.double(), (1, 1, 1, 1)).unfold(2, t, m).unfold(3, t, m)[0]  # (C, th, tw, t, t)
    v = (bt @ tiles @ bt.T).float() if stages64 else bt.float() @ tiles.float() @ bt.T.float()
    u = (g @ w.double() @ g.T).float()
    prod = torch.bmm(u.permute(2, 3, 0, 1).reshape(t * t, -1, c), v.permute(3, 4, 0, 1, 2).reshape(t * t, c, -1))
    prod = prod.reshape(t, t, -1, v.shape[1], v.shape[2]).permute(2, 3, 4, 0, 1)
    y = at @ prod.double() @ at.T if stages64 else at.float() @ prod @ at.T.float()
    k, th, tw = y.shape[:3]
    return y.permute(0, 1, 3, 2, 4).reshape(1, k, th * m, tw * m).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages64", action="store_true", help="input and output transforms in float64")
    args = parser.parse_args()
    torch.manual_seed(0)
    for c, hw in [(64, 56), (256, 16), (512, 8)]:
        x = torch.randn(1, c, hw, hw).relu()
        w = torch.randn(c, c, 3, 3) * (2 / (9 * c)) ** 0.5
        exact = F.conv2d(x.double(), w.double(), None, 1, 1)
        direct = (F.conv2d(x, w, None, 1, 1).double() - exact).norm()
        print(f"{c} -> {c} channels, {hw}x{hw}: direct float32 {direct / exact.norm():.2e} (relative L2)")
        for m, sets in POINTS.items():
            for name, points in sets.items():
                y = winograd_conv3x3(x, w, toom_cook(points, m), m, args.stages64)
                print(f"  F({m}x{m}, 3x3), points {name}: {((y - exact).norm() / direct).item():.1f}x the direct error")


if __name__ == "__main__":
    main()
