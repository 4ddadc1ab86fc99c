"""A one-pass, streaming approximation of the aggregated LoRA product W = sum_i p_i B_i A_i.

The FedSRD server (Yan et al., WWW '26, Eq. 9-10) and FlexLoRA (Bai et al., NeurIPS '24) need
the rank-r SVD of W, with B_i = B + dB_i and A_i = A + dA_i the clients' reconstructed factors.
Exactly, through the factors, that costs O((d_out + d_in) (m r)^2) for m clients (a QR of
[B_1..B_m]), which passes the dense method near m = 64. Expanding each client's product,

    W = B (A + dA_bar) + dB_bar A + E,      E = sum_i p_i dB_i dA_i,

with dA_bar = sum_i p_i dA_i and dB_bar = sum_i p_i dB_i. Everything but E is linear in the
uploads and accumulated exactly. E (a sum of products of two small deltas, rank up to m r)
enters SVD_r(W) to first order only through its projections onto W's leading subspaces, and
those are close to the spans of the global factors B and A^T. With U, V orthonormal bases of
range(B) and range(A^T), the streamed sums E V = sum_i p_i dB_i (dA_i V) and
U^T E = sum_i p_i (U^T dB_i) dA_i give the cross approximation

    E ~ E V V^T + U (U^T E - U^T E V V^T),

exact on everything E does inside either span; what is left out, (I - U U^T) E (I - V V^T),
moves SVD_r(W) at second order only. Optionally (`width` > 0) that remainder is sketched too,
as in Tropp, Yurtsever, Udell and Cevher (SIAM J. Matrix Anal. Appl. 2017, Alg. 1-3): a range
sketch Y = E_rem Omega and a co-range sketch Z = Psi E_rem, Q = orth(Y), X = (Psi Q)^+ Z. With
`width` >= m r the remainder is captured exactly, so the result equals the exact one (test).
Measured (benchmarks/server_scaling.py): a random remainder sketch narrower than m r adds noise
directions that compete with the true ones, so `width = 0` is the default.

Since U lies in range(B) and V^T in A's row space, the result folds into 2 r columns (plus the
remainder sketch's), W ~ [B, dB_bar + E V V^T pinv(A)] @ [A + dA_bar + pinv(B) U G; A] with
G = U^T E - U^T E V V^T, whose rank-r SVD is taken in factor space. FedSRD-e's solves need only E V
(odd rounds: T pinv(A), and pinv(A) has A^T's span) or U^T E (even rounds: pinv(B) T), so there
the approximation is exact whenever B and A have full rank.

* One side (`sides = "right"` or `"left"`): an Eq. 12-13 solve reads only one side of its
  target. The odd round's dB = T pinv(A) sees T V (pinv(A) = V ...), the even round's
  dA = pinv(B) T sees U^T T. To first order, with D what the approximation misses and P, S the
  result's column and row spaces, SVD_r moves by P D + D S S^T - P D S S^T; with `sides =
  "right"` (E ~ E V V^T, so D V = 0) that moves T V by (I - P) D S S^T V only, and S lies close
  to V's span, so D S is itself small: the odd solve keeps first-order accuracy from E V alone,
  at half the products per upload (the even solve from U^T E alone, by symmetry). What the other
  side of T gets is then wrong at first order, so the target as a whole (and anything that reads
  it whole: download error feedback, FlexLoRA's product) needs `sides = "both"`. FedSRD-e's
  solves are exact from one side whenever B and A have full rank.
* Streaming: each upload is folded in and let go; memory is two adapter-sized means, E V and
  U^T E (another adapter's worth), the bases U and V with the QRs they came from (kept for
  `truncated_svd`; one side's only, with one side), plus the optional sketches: about 4.8
  adapters with both sides, 2.8-3.3 with one. Cost per upload
  O((d_out + d_in) r (2 r + 3 width + 1 + 2 probes)) with both sides (Psi has 2 width + 1 rows),
  O((d_out + d_in) r (r + probes)) with one. A one-sided sketch takes the SVD of the one factor
  whose basis it streams, keeps its QR for `truncated_svd` and hands the SVD to the solve
  (`factor_svd`).
* Deterministic: Omega, Psi and the probes come from one seed (the algorithm derives it from the
  run seed, the round and the module), so runs repeat and resume exactly.
* `probes` Gaussian columns and rows give an a-posteriori estimate of the first-order error
  (Halko, Martinsson and Tropp 2011, Sec. 4.3): `first_order_error(left, right)`.
"""

from __future__ import annotations

import torch

from fedlowrank.lora import product_norm2, split_core, truncated_svd_of_sum

__all__ = ["ProductSketch", "SIDES"]

SIDES = ("both", "right", "left")


def _thin_svd(M: torch.Tensor, rtol: float = 1e-6):
    """(Q, R, U, S, V): M = Q R (reduced QR) and M ~ U diag(S) V^T over the directions above
    rtol * s_max (U = Q U_R orthonormal, d x k: fewer columns for a zero or rank-deficient factor,
    LoRA's B = 0 at the start); by the SVD of the q x q triangle, O(d q^2), rank-revealing."""
    Q, R = torch.linalg.qr(M, mode="reduced")
    U, S, Vh = torch.linalg.svd(R)
    if S.numel() == 0 or float(S[0]) <= 0:
        return Q, R, M.new_zeros(M.shape[0], 0), S[:0], M.new_zeros(M.shape[1], 0)
    keep = S > rtol * S[0]
    return Q, R, Q @ U[:, keep], S[keep], Vh[keep].mT


def _extend_basis(Q: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q2, C, R2) with X = Q C + Q2 R2 and [Q, Q2] orthonormal, for orthonormal Q: block
    Gram-Schmidt against Q, twice (so rounding leaves no component along Q), then a Householder
    QR of what is left. O(d q p) products and a d x p QR, where a QR of [Q-span, X] is d x (q + p)."""
    C = Q.mT @ X
    rest = X - Q @ C
    C2 = Q.mT @ rest
    rest = rest - Q @ C2
    Q2, R2 = torch.linalg.qr(rest, mode="reduced")
    return Q2, C + C2, R2


class ProductSketch:
    """Streaming accumulator of W = sum_i p_i (B + dB_i)(A + dA_i) for one LoRA module.

    B (d_out x r), A (r x d_in): the global factors. `add(dB_i, dA_i, p_i)` folds one client in;
    `factors()` returns (L, R) with W ~ L @ R. `width`: columns of the remainder sketch (0: none);
    `probes`: columns of the error estimate; `seed`: where the random matrices come from;
    `sides`: "both" (the cross approximation), "right" (E V only: enough for an odd-round solve
    T pinv(A)) or "left" (U^T E only: an even-round solve pinv(B) T), see the module docstring.
    With one side, the other side's basis (U for "right", V for "left") and probes are empty.
    """

    def __init__(self, B: torch.Tensor, A: torch.Tensor, seed: int, width: int = 0, probes: int = 4,
                 sides: str = "both") -> None:  # fmt: skip
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"ProductSketch: B {tuple(B.shape)} and A {tuple(A.shape)} are not (d_out x r), (r x d_in)")
        if width < 0 or probes < 0:
            raise ValueError(f"ProductSketch: width and probes must be >= 0, got {width}, {probes}")
        if sides not in SIDES:
            raise ValueError(f"ProductSketch: sides must be one of {SIDES}, got {sides!r}")
        if sides != "both" and width:
            raise ValueError(f"ProductSketch: a remainder sketch (width {width}) needs sides = 'both', got {sides!r}")
        self.sides = sides
        d_out, d_in = B.shape[0], A.shape[1]
        self.B, self.A = B, A
        # B ~ U diag(sB) WB^T and A^T ~ V diag(sA) WA^T: bases and, for free, pinv(B) U = WB / sB
        # and V^T pinv(A) = (WA / sA)^T. A one-sided sketch needs one basis only ("left": U,
        # "right": V); the QR it comes from is kept for truncated_svd.
        r = B.shape[1]
        self._qr_B = self._qr_A = None
        self._svd_B = self._svd_A = None  # (U, S, Vh) of B and of A, where every direction was kept
        U, sB, WB = B.new_zeros(d_out, 0), B.new_zeros(0), B.new_zeros(r, 0)
        V, sA, WA = A.new_zeros(d_in, 0), A.new_zeros(0), A.new_zeros(r, 0)
        if sides != "right":
            QB, RB, U, sB, WB = _thin_svd(B)
            self._qr_B = (QB, RB)
        if sides != "left":
            QA, RA, V, sA, WA = _thin_svd(A.mT)
            self._qr_A = (QA, RA)
        self._pinvB_U = WB / sB[None, :]  # (r, u)
        self._Vt_pinvA = (WA / sA[None, :]).mT  # (v, r)
        g = torch.Generator(device="cpu").manual_seed(int(seed) & (2**63 - 1))

        def gauss(*shape):
            return torch.randn(*shape, generator=g, dtype=B.dtype).to(B.device)

        k = min(width, d_in - V.shape[1], d_out - U.shape[1])
        self.width = max(k, 0)
        l = min(2 * self.width + 1, d_out) if self.width else 0
        # the remainder's test matrices live in the complements of V and U
        omega = gauss(d_in, self.width)
        self.omega = omega - V @ (V.mT @ omega)
        psi = gauss(l, d_out)
        self.psi = psi - (psi @ U) @ U.mT
        self.probe_right, self.probe_left = gauss(d_in, probes), gauss(probes, d_out)
        # a one-sided estimate reads the probes of one side only (first_order_error): the right
        # ones for "left", the left ones for "right"; the other side's are drawn (same random
        # stream) but not streamed
        self.probes = probes
        if sides == "left":
            self.probe_left = self.probe_left[:0]
        elif sides == "right":
            self.probe_right = self.probe_right[:, :0]
        # the test matrices of each side together: dA_i is multiplied by all right ones at once.
        # The right ones are held transposed: a product with a column-major right factor of few
        # columns (a one-sided sketch's probes) runs 2-3x faster on CPU BLAS than a row-major one.
        # U and V are views of these (the bases are not held twice; the QRs they came from are).
        self._v, self._u = V.shape[1], U.shape[1]
        self._right_t = torch.cat([V.mT, self.omega.mT, self.probe_right.mT], dim=0).contiguous()
        self._left = torch.cat([U.mT, self.psi, self.probe_left], dim=0)
        self.V, self.U = self._right_t[: self._v].mT, self._left[: self._u].mT
        if self._qr_B is not None and sB.numel() == r:
            self._svd_B = (self.U, sB, WB.mT)
        if self._qr_A is not None and sA.numel() == r:
            self._svd_A = (WA, sA, self.V.mT)
        self.dB, self.dA = torch.zeros_like(B), torch.zeros_like(A)
        self._ER = B.new_zeros(d_out, self._right_t.shape[0])  # E [V, Omega, probes]
        self._LE = B.new_zeros(self._left.shape[0], d_in)  # [U^T; Psi; probes] E
        self._done: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # what the sums give, once

    def add(self, dB: torch.Tensor, dA: torch.Tensor, weight: float) -> None:
        """Fold one client's deltas (the factors' dtype and shapes) in with weight p_i."""
        if dB.shape != self.B.shape or dA.shape != self.A.shape:
            raise ValueError(f"ProductSketch.add: dB {tuple(dB.shape)}, dA {tuple(dA.shape)}; expected "
                             f"{tuple(self.B.shape)}, {tuple(self.A.shape)}")  # fmt: skip
        w = float(weight)
        self.dB.add_(dB, alpha=w)
        self.dA.add_(dA, alpha=w)
        self._ER.add_(dB @ (dA @ self._right_t.mT).mT.contiguous().mT, alpha=w)
        self._LE.add_((self._left @ dB) @ dA, alpha=w)
        self._done.clear()

    def _parts(self):
        v, k = self._v, self.width
        u, l = self._u, self.psi.shape[0]
        EV, EO, EP = self._ER[:, :v], self._ER[:, v : v + k], self._ER[:, v + k :]
        UtE, PsiE, PE = self._LE[:u], self._LE[u : u + l], self._LE[u + l :]
        return EV, EO, EP, UtE, PsiE, PE

    def _cross(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E V, G) with E ~ E V V^T + U G: G = U^T E - U^T E V V^T (both sides), 0 (right: E ~
        E V V^T), U^T E (left: E ~ U U^T E, and E V taken as 0). The side not sketched has
        zero columns (or rows)."""
        if "cross" not in self._done:
            EV, _, _, UtE, _, _ = self._parts()
            G = UtE - (self.U.mT @ EV) @ self.V.mT if self.sides == "both" else UtE
            self._done["cross"] = EV, G
        return self._done["cross"]

    def _remainder(self) -> tuple[torch.Tensor, torch.Tensor]:
        """E_rem = (I - U U^T) E (I - V V^T) ~ Q X from the range and co-range sketches: Omega is
        orthogonal to V and Psi to U, so E_rem Omega = (I - U U^T) E Omega and Psi E_rem =
        Psi E (I - V V^T)."""
        if "remainder" not in self._done:
            _, EO, _, _, PsiE, _ = self._parts()
            U, V = self.U, self.V
            Y = EO - U @ (U.mT @ EO)
            Zr = PsiE - (PsiE @ V) @ V.mT
            Q, _ = torch.linalg.qr(Y, mode="reduced")
            self._done["remainder"] = Q, torch.linalg.lstsq(self.psi @ Q, Zr).solution
        return self._done["remainder"]

    def e_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(F, G) with E ~ F @ G: the cross approximation plus the remainder sketch."""
        EV, G = self._cross()
        F, Gs = [EV, self.U[:, : self._u]], [self.V.mT[: self._v], G]
        if self.width:
            Q, X = self._remainder()
            F.append(Q)
            Gs.append(X)
        return torch.cat(F, dim=1), torch.cat(Gs, dim=0)

    def factors(self, difference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) with L @ R ~ W, or ~ W - B A with `difference` (FedSRD-e's target, formed
        without the cancellation of W - B A). 2 r columns (plus the remainder sketch's): U lies
        in range(B) and V^T in A's row space, so U = B pinv(B) U and V^T = V^T pinv(A) A fold
        the cross terms into the two factors, W ~ B (A + dA_bar + pinv(B) U G) + (dB_bar +
        E V V^T pinv(A)) A."""
        left, right = self._blocks(difference)
        L, R = [self.B, left], [right, self.A]
        if self.width:
            Q, X = self._remainder()
            L.append(Q)
            R.append(X)
        return torch.cat(L, dim=1), torch.cat(R, dim=0)

    def _blocks(self, difference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(X, Y) with factors() = [B, X (, Q)] @ [Y; A (; X_rem)]: X = dB_bar + E V V^T pinv(A),
        Y = (A +) dA_bar + pinv(B) U G."""
        EV, G = self._cross()
        first = self.dA if difference else self.A + self.dA
        right = first + self._pinvB_U @ G if self._u else first
        left = self.dB + EV @ self._Vt_pinvA if self._v else self.dB
        return left, right

    def truncated_svd(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-`rank` SVD factors (U_r sqrt(S_r), sqrt(S_r) V_r^T) of `factors()`'s product, as
        `lora.truncated_svd_of_sum` gives them, in blocks: with B = Q_B R_B, L = [B, X] =
        [Q_B, Q2] [[R_B, C], [0, R2]] needs two d x r QRs (one already taken for the basis
        the sketch streams) and block Gram-Schmidt, not a QR of the d x 2r factor (a third of
        the time on a gate module); R likewise. Falls back to `truncated_svd_of_sum` with a
        remainder sketch (`width` > 0)."""
        if self.width:
            L, R = self.factors()
            return truncated_svd_of_sum([L], [R], [1.0], rank)
        X, Y = self._blocks()
        r = self.B.shape[1]
        QB, RB = self._qr_B if self._qr_B is not None else torch.linalg.qr(self.B, mode="reduced")
        QA, RA = self._qr_A if self._qr_A is not None else torch.linalg.qr(self.A.mT, mode="reduced")
        Q2, CL, R2 = _extend_basis(QB, X)  # L = [B, X]
        Q3, CR, R3 = _extend_basis(QA, Y.mT)  # R^T = [Y^T, A^T]
        KL = torch.cat([torch.cat([RB, CL], dim=1), torch.cat([torch.zeros_like(R2[:, :r]), R2], dim=1)], dim=0)
        KR = torch.cat([torch.cat([CR, RA], dim=1), torch.cat([R3, torch.zeros_like(R3[:, :r])], dim=1)], dim=0)
        return split_core(torch.cat([QB, Q2], dim=1), KL @ KR.mT, torch.cat([QA, Q3], dim=1), rank)

    def factor_svd(self, which: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The thin SVD (U, S, Vh) of B (`which = "B"`) or of A ("A") the sketch took for its
        bases, when it kept every direction (a full-rank factor), else None: an Eq. 12-13 solve
        against that factor can reuse it (fedsrd.solve_inverse)."""
        if which not in ("B", "A"):
            raise ValueError(f"ProductSketch.factor_svd: which must be 'B' or 'A', got {which!r}")
        return self._svd_B if which == "B" else self._svd_A

    def first_order_error(self, left: torch.Tensor, right: torch.Tensor, target2: float | None = None) -> float:
        """Estimated first-order error of a rank-r result left @ right ~ SVD_r(W), relative to
        ||left @ right - B A||: with D = E - F G (what the approximation missed) and P, S the
        result's column and row spaces, sqrt(||P^T D||^2 + ||D S||^2), from the probes. 0.0
        without probes. `left`'s columns and `right`'s rows must be orthogonal (an SVD's split,
        as `truncated_svd_of_sum` returns), so their bases are those vectors normalised.
        One-sided, only the part its solve reads: ||D S|| (right: T V moves by (I - P) D S S^T V)
        or ||P^T D|| (left). `target2`: ||left @ right - B A||^2 where the caller has it."""
        _, _, EP, _, _, PE = self._parts()
        p = self.probes
        if not p:
            return 0.0
        F, G = self.e_factors()
        miss_r = EP - F @ (G @ self.probe_right)  # D omega
        miss_l = PE - (self.probe_left @ F) @ G  # psi D
        ln, rn = left.norm(dim=0), right.norm(dim=1)
        P, S = left[:, ln > 0] / ln[ln > 0], (right[rn > 0] / rn[rn > 0, None]).mT
        left_part = float((P.mT @ miss_r).pow(2).sum()) if self.sides != "right" else 0.0
        right_part = float((miss_l @ S).pow(2).sum()) if self.sides != "left" else 0.0
        est2 = (left_part + right_part) / p
        t2 = target2 if target2 is not None else product_norm2(torch.cat([left, -self.B], dim=1), torch.cat([right, self.A], dim=0))
        return (est2 / t2) ** 0.5 if t2 > 0 else 0.0
