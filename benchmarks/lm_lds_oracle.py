"""Oracle compressions for the LM LDS benchmark: how well can k numbers per module do, given exact EK-FAC?

Issue 14 asks for ≥ 0.85× of exact EK-FAC's LDS at 256 numbers per module (projection dim 16) and ≥ 0.95× at
4096 (dim 64). This script asks whether any fixed per-module linear compression reaches that, on the task of
`benchmarks/lm_lds.py` (same model, rows, ground truth cache), with exact EK-FAC known in full.

Everything lives in each module's K-FAC eigenbasis, from an exact (dim 0) EK-FAC store made by `tributary index`:
C = Q_Sᵀ G Q_A (k_out × k_in), Λ the EK-FAC eigenvalues (true Fisher), λ = damping × mean(Λ) (Tributary's default
0.1), and the whitened gradient z = C / sqrt(Λ + λ), so that the exact score is Σ_modules ⟨z_q, z_n⟩. A
compression keeps k numbers of z per module (a fixed linear map z ↦ R z) and scores ⟨R z_q, R z_n⟩:

  block        the top √k × √k block of C by the side eigenvalues (σ of S, α of A): kfac_eigen with exact weights
  top_lambda   the k coordinates with the largest Λ (the same order as Λ/(Λ+λ), the Fisher's whitened variance)
  top_fit_var  the k coordinates with the largest variance of z over held-out rows (data labels, centred)
  top_train_m2 the k coordinates with the largest mean z² over the training rows themselves (in-sample)
  jl           a Gaussian sketch of z, R ~ N(0, 1/k): unbiased inner products (mean LDS over seeds)
  hybrid       top_lambda (k/2) + a Gaussian sketch (k/2) of the remaining coordinates
  pca_fit      top-k principal directions of z over held-out rows (centred), F = 836 windows of Hamlet that are
               neither training nor query rows; k > F keeps all F
  kron_fit     the best r × r Kronecker pair (P_out, P_in) for the held-out whitened matrices (GLRAM): k = r²
  pca_train    top-k principal directions of the training rows' own z (in-sample: exact once k ≥ N = 256)
  asym_jl      the asymmetric form (issues 29, 30): the query preconditioned at full width, (H + λ)⁻¹ g_q, then
               both it and the raw training gradient g_n sketched by the same Gaussian R ~ N(0, 1/k) in parameter
               coordinates (what a store of R g_n rows and full-width factors can score): ⟨R (H + λ)⁻¹ g_q, R g_n⟩,
               unbiased for the exact score like jl, but of the raw rows, not the whitened ones (mean over seeds)
               (results/lm_lds_oracle.{json,md} predate it; its figures, beside jl's and the store's own, are in
               results/lm_lds_asymmetric.{json,md}, from benchmarks/lm_lds_asymmetric.py)

Exact EK-FAC itself is also run at several dampings (0.001–10 × mean Λ) and with the empirical Λ (data labels),
with each module's effective dimension Σ Λ/(Λ+λ). The model is trained again (seed 0), so the exact LDS may
differ from benchmarks/results/lm_lds.json in the third decimal (thread-count-dependent float sums); the script
checks its own exact scores against `tributary query` on the same store.

    python -m benchmarks.lm_lds_oracle             # ≈ 5 min on 2 cores; writes results/lm_lds_oracle.{json,md}
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import first_line, write_result
from benchmarks.evaluation_common import RESULTS, machine_line
from benchmarks.lm_lds import CACHE, CLI, Setting, ground_truth, job_config, prepare_workdir, tributary, write_rows
from benchmarks.lm_lds_task import TOKEN, LMTask, TaskSpec, build_task
from engine.evaluation.lds import GroundTruth, lds, lds_per_query
from engine.evaluation.tasks import shakespeare_text
from engine.projection import ModuleProjection
from engine.store import GradientStore

BUDGETS = (16, 64, 256, 1024, 4096)  # numbers kept per module
HEADLINE = (256, 4096)
COMPRESSION_DAMPINGS = (0.1, 1.0)  # × mean Λ per module
EXACT_DAMPINGS = (0.001, 0.01, 0.1, 1.0, 10.0)
JL_SEEDS = 5
GLRAM_ITERATIONS = 4


# ---- data: the rows, the stores, the per-module eigenbasis coordinates ---------------------------------


def held_out_texts(task: LMTask) -> tuple[str, ...]:
    """Every window of the play that `build_task` drew neither as a training row nor as a query (same draw)."""
    spec = task.spec
    words = TOKEN.findall(shakespeare_text(spec.play, characters=10**8))
    windows = [words[i : i + spec.window] for i in range(0, len(words) - spec.window + 1, spec.window)]
    order = np.random.default_rng(spec.data_seed).permutation(len(windows))
    return tuple(" ".join(windows[i]) for i in order[spec.train + spec.queries :])


def index_stores(task: LMTask, work: Path, with_fit: bool = True) -> dict[str, Path]:
    """The exact EK-FAC store of the training rows and raw-gradient (dim 0) stores of the queries and (`with_fit`)
    the held-out rows, all through the CLI; plus the CLI's own EK-FAC scores of the queries."""
    window = task.spec.window
    configs = {"train": job_config(Setting("ekfac", "exact", 0), work, None, window)}
    if with_fit:
        write_rows(work / "fit.jsonl", "fit", held_out_texts(task))
    for name in ("queries", "fit") if with_fit else ("queries",):
        config = job_config(Setting("grad_dot", "exact", 0), work, None, window)
        config["data"]["train"] = str(work / f"{name}.jsonl")
        config["store"]["path"] = str(work / "stores" / f"{name}.zarr")
        configs[name] = config
    for name, config in configs.items():
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        tributary(CLI, "index", str(path), "--overwrite", "--no-progress")
    scores = work / "cli_scores.npy"
    tributary(
        CLI, "query", str(work / "train.yaml"), "--queries", str(work / "queries.jsonl"), "--scores-out", str(scores)
    )
    return {name: Path(config["store"]["path"]) for name, config in configs.items()} | {"cli_scores": scores}


@dataclass
class Module:
    """One module's rows in its K-FAC eigenbasis, flattened row-major over (k_out, k_in)."""

    name: str
    shape: tuple[int, int]  # (k_out, k_in)
    queries: np.ndarray  # (Q, D) C of the query rows
    train: np.ndarray  # (N, D)
    fit: np.ndarray  # (F, D) held-out rows (F = 0 where the fit store was not made)
    lam: np.ndarray  # (D,) EK-FAC Λ (true Fisher)
    sigma: np.ndarray  # (k_out,) eigenvalues of S
    alpha: np.ndarray  # (k_in,) eigenvalues of A
    q_s: np.ndarray  # (k_out, k_out) eigenbasis of S: G = Q_S C Q_Aᵀ
    q_a: np.ndarray  # (k_in, k_in) eigenbasis of A

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


def rotated(rows: np.ndarray, spec: ModuleProjection, q_s: np.ndarray, q_a: np.ndarray) -> np.ndarray:
    """C = Q_Sᵀ G Q_A of one module's block of stored rows, flattened: (rows, k_out k_in) float64."""
    grads = rows[:, spec.offset : spec.offset + spec.width].astype(np.float64)
    return (q_s.T @ grads.reshape(-1, spec.k_out, spec.k_in) @ q_a).reshape(len(rows), -1)


def load_modules(paths: dict[str, Path]) -> list[Module]:
    """Every module's rows in its eigenbasis; `fit` is empty where `paths` has no fit store."""
    stores = {name: GradientStore.open(str(paths[name])) for name in ("train", "queries", "fit") if name in paths}
    rows = {name: store.read_rows(0, store.rows) for name, store in stores.items()}  # float32
    factors = stores["train"].read_factors()
    modules = []
    for spec in stores["train"].modules:
        f = factors[spec.name]
        if f.q_a is None or f.q_s is None or f.alpha is None or f.sigma is None:
            raise ValueError(f"{spec.name}: the store has no EK-FAC eigenbasis")
        modules.append(
            Module(
                name=spec.name,
                shape=(spec.k_out, spec.k_in),
                queries=rotated(rows["queries"], spec, f.q_s, f.q_a),
                train=rotated(rows["train"], spec, f.q_s, f.q_a),
                fit=(
                    rotated(rows["fit"], spec, f.q_s, f.q_a).astype(np.float32)
                    if "fit" in rows
                    else np.zeros((0, spec.width), np.float32)
                ),
                lam=f.lam.ravel().copy(),
                sigma=f.sigma.copy(),
                alpha=f.alpha.copy(),
                q_s=f.q_s.astype(np.float64),
                q_a=f.q_a.astype(np.float64),
            )
        )
    return modules


# ---- the study ----------------------------------------------------------------------------------------


def damping_of(lam: np.ndarray, factor: float) -> float:
    return factor * float(lam.mean())


@dataclass
class Reference:
    """Exact EK-FAC's per-query LDS and group predictions, to compare a compression with (paired over queries)."""

    truth: GroundTruth
    per_query: np.ndarray  # (Q,)
    predictions: np.ndarray  # (M, Q): Σ_{i ∈ subset} score

    @classmethod
    def of(cls, scores: np.ndarray, truth: GroundTruth) -> Reference:
        return cls(truth, lds_per_query(scores, truth), truth.masks.astype(np.float64) @ scores.T)

    def compare(self, scores: np.ndarray, resamples: int = 2000) -> dict:
        """LDS, its fraction of exact with a paired bootstrap 95% CI over queries, and the mean over queries of
        the Pearson correlation between this method's group predictions and exact EK-FAC's."""
        per_query = lds_per_query(scores, self.truth)
        draws = np.random.default_rng(0).integers(0, len(per_query), (resamples, len(per_query)))
        ratios = per_query[draws].mean(axis=1) / self.per_query[draws].mean(axis=1)
        predictions = self.truth.masks.astype(np.float64) @ scores.T
        a = predictions - predictions.mean(axis=0)
        b = self.predictions - self.predictions.mean(axis=0)
        correlation = (a * b).sum(axis=0) / np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
        return {
            "lds": float(per_query.mean()),
            "fraction": float(per_query.mean() / self.per_query.mean()),
            "fraction_ci95": [float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))],
            "prediction_correlation": float(correlation.mean()),
        }


def exact_scores(modules: list[Module], factor: float) -> np.ndarray:
    return sum(
        ((m.queries / (m.lam + damping_of(m.lam, factor))) @ m.train.T for m in modules),
        np.zeros((len(modules[0].queries), len(modules[0].train))),
    )


def exact_study(modules: list[Module], truth: GroundTruth) -> tuple[list[dict], dict]:
    """Exact EK-FAC at several dampings and with the empirical Λ; effective dimensions per module."""
    shape = (len(modules[0].queries), len(modules[0].train))
    rows, effective = [], {}
    for factor in EXACT_DAMPINGS:
        scores = np.zeros(shape)
        for m in modules:
            damping = damping_of(m.lam, factor)
            scores += (m.queries / (m.lam + damping)) @ m.train.T
            effective.setdefault(m.name, {})[str(factor)] = float((m.lam / (m.lam + damping)).sum())
        rows.append({"variant": "fisher Λ", "damping": factor, "lds": lds(scores, truth)})
    scores = np.zeros(shape)
    for m in modules:
        empirical = (m.train**2).mean(axis=0)
        scores += (m.queries / (empirical + damping_of(empirical, 0.1))) @ m.train.T
    rows.append({"variant": "empirical Λ (data labels)", "damping": 0.1, "lds": lds(scores, truth)})
    scores = sum((m.queries @ m.train.T for m in modules), np.zeros(shape))
    rows.append({"variant": "no curvature (Grad-Dot)", "damping": None, "lds": lds(scores, truth)})
    return rows, effective


# ---- compressions: each gives one module's (Q, N) share of the score ----------------------------------


def top(values: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-values, kind="stable")[: min(k, len(values))]


def block_keep(module: Module, k: int) -> np.ndarray:
    """The top r × r block by the side eigenvalues, r = √k (capped at the module's sides)."""
    r = int(round(np.sqrt(k)))
    rows = top(module.sigma, r)
    columns = top(module.alpha, r)
    return (rows[:, None] * module.shape[1] + columns[None, :]).ravel()


def gram_coordinates(gram: np.ndarray) -> np.ndarray:
    """Coordinates (rows, r) of vectors in an orthonormal basis of their span, from their Gram matrix."""
    values, vectors = np.linalg.eigh(gram)
    keep = values > max(values.max(), 0.0) * 1e-12
    return vectors[:, keep] * np.sqrt(values[keep])


def gaussian_sketch(coordinates: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """R z for R ~ N(0, 1/k) of shape (k, D), drawn exactly through the vectors' span: R U is again Gaussian for
    an orthonormal U, so only a (r, k) matrix is drawn (r ≤ Q + N), not a (D, k) one."""
    return coordinates @ rng.standard_normal((coordinates.shape[1], k)) / np.sqrt(k)


@dataclass
class Principal:
    """Principal directions of a set of fit rows, as the evaluation rows' inner products with them."""

    values: np.ndarray  # descending eigenvalues of fit fitᵀ
    vectors: np.ndarray  # (F, F) matching eigenvectors
    cross: np.ndarray  # (Q + N, F) evaluation rows · fit rows

    @classmethod
    def of(cls, fit: np.ndarray, rows: np.ndarray) -> Principal:
        values, vectors = np.linalg.eigh(fit @ fit.T)
        order = np.argsort(-values)
        return cls(values[order], vectors[:, order], rows @ fit.T)

    def coordinates(self, k: int) -> np.ndarray:
        """(Q + N, ≤k) coordinates on the top-k directions U = fitᵀ V Σ⁻¹ (all of them when k ≥ rank)."""
        keep = np.flatnonzero(self.values[:k] > self.values[0] * 1e-12)
        return self.cross @ (self.vectors[:, keep] / np.sqrt(self.values[keep]))


def glram(fit: np.ndarray, shape: tuple[int, int], r: int) -> tuple[np.ndarray, np.ndarray]:
    """(P_out, P_in), orthonormal k_out × r and k_in × r, maximising Σ_n ‖P_outᵀ Z_n P_in‖² (alternating)."""
    k_out, k_in = shape
    r_out, r_in = min(r, k_out), min(r, k_in)
    matrices = fit.reshape(-1, k_out, k_in)
    flat = matrices.reshape(-1, k_in)
    p_in = np.linalg.eigh(flat.T @ flat)[1][:, ::-1][:, :r_in]
    p_out = np.eye(k_out)[:, :r_out]
    for _ in range(GLRAM_ITERATIONS):
        right = (matrices @ p_in).transpose(1, 0, 2).reshape(k_out, -1)  # (k_out, F r)
        p_out = np.linalg.eigh(right @ right.T)[1][:, ::-1][:, :r_out]
        left = (p_out.T @ matrices).reshape(-1, k_in)  # (F r, k_in)
        p_in = np.linalg.eigh(left.T @ left)[1][:, ::-1][:, :r_in]
    return p_out, p_in


def module_scores(
    m: Module, factor: float, methods: tuple[str, ...] | None = None, budgets: tuple[int, ...] = BUDGETS
) -> dict[tuple[str, int, int], np.ndarray]:
    """One module's (Q, N) score share for every (method, budget k, seed) at damping `factor` × mean Λ; `methods`
    (default: every one in ORDER) limits what is computed."""
    wanted = set(ORDER if methods is None else methods)
    weight = 1 / np.sqrt(m.lam + damping_of(m.lam, factor))
    zq, zn, zf = m.queries * weight, m.train * weight, m.fit.astype(np.float64) * weight
    rows = np.vstack([zq, zn])
    q = len(zq)
    gram = rows @ rows.T
    span = gram_coordinates(gram)
    # C is an orthogonal rotation of the gradient (Q_S ⊗ Q_A), so a Gaussian sketch of it is one of the gradient
    preconditioned = np.vstack([m.queries / (m.lam + damping_of(m.lam, factor)), m.train])
    asymmetric_span = gram_coordinates(preconditioned @ preconditioned.T)
    fit_pca = Principal.of(zf - zf.mean(axis=0), rows) if "pca_fit" in wanted else None
    train_pca = Principal.of(zn, rows) if "pca_train" in wanted else None
    fit_variance = zf.var(axis=0) if "top_fit_var" in wanted else None
    train_m2 = (zn**2).mean(axis=0)
    by_lambda = top(m.lam, m.size)

    def pairs(coordinates: np.ndarray) -> np.ndarray:
        return coordinates[:q] @ coordinates[q:].T

    def kept(keep: np.ndarray) -> np.ndarray:
        return zq[:, keep] @ zn[:, keep].T

    out: dict[tuple[str, int, int], np.ndarray] = {}
    for k in budgets:
        if "block" in wanted:
            out["block", k, 0] = kept(block_keep(m, k))
        if "top_lambda" in wanted:
            out["top_lambda", k, 0] = kept(by_lambda[:k])
        if fit_variance is not None:
            out["top_fit_var", k, 0] = kept(top(fit_variance, k))
        if "top_train_m2" in wanted:
            out["top_train_m2", k, 0] = kept(top(train_m2, k))
        if fit_pca is not None:
            out["pca_fit", k, 0] = pairs(fit_pca.coordinates(k))
        if train_pca is not None:
            out["pca_train", k, 0] = pairs(train_pca.coordinates(k))
        if "kron_fit" in wanted:
            p_out, p_in = glram(zf, m.shape, int(round(np.sqrt(k))))
            out["kron_fit", k, 0] = pairs((p_out.T @ rows.reshape(-1, *m.shape) @ p_in).reshape(len(rows), -1))
        head = by_lambda[: k // 2]
        rest = gram_coordinates(gram - rows[:, head] @ rows[:, head].T)
        for seed in range(JL_SEEDS):
            # the three sketches draw in this order from one generator whatever is kept, so a subset run draws
            # the same matrices as a full one (they are small: the spans have rank ≤ Q + N)
            rng = np.random.default_rng([seed, k, m.size])
            sketches = {
                "jl": pairs(gaussian_sketch(span, k, rng)),
                "asym_jl": pairs(gaussian_sketch(asymmetric_span, k, rng)),
                "hybrid": kept(head) + pairs(gaussian_sketch(rest, k - k // 2, rng)),
            }
            out.update({(name, k, seed): scores for name, scores in sketches.items() if name in wanted})
    return out


ORDER = (
    "block",
    "top_lambda",
    "top_fit_var",
    "top_train_m2",
    "jl",
    "asym_jl",
    "hybrid",
    "pca_fit",
    "kron_fit",
    "pca_train",
)


def compression_study(modules: list[Module], reference: Reference, factor: float) -> list[dict]:
    """Every method × budget at damping `factor` × mean Λ; the Gaussian ones averaged over JL_SEEDS seeds."""
    totals: dict[tuple[str, int, int], np.ndarray] = {}
    for m in modules:
        for key, scores in module_scores(m, factor).items():
            totals[key] = totals[key] + scores if key in totals else scores
        print(f"  λ = {factor} × mean Λ: {m.name} done", flush=True)
    results = []
    for name in ORDER:
        for k in BUDGETS:
            runs = [reference.compare(totals[key]) for key in totals if key[0] == name and key[1] == k]
            row: dict = {"method": name, "numbers_per_module": k, "damping": factor, "seeds": len(runs)}
            for field in ("lds", "fraction", "prediction_correlation"):
                row[field] = float(np.mean([r[field] for r in runs]))
            row["fraction_ci95"] = runs[0]["fraction_ci95"]  # of the first seed
            if len(runs) > 1:
                row["lds_seed_std"] = float(np.std([r["lds"] for r in runs]))
            results.append(row)
    return results


def fit_size_study(modules: list[Module], reference: Reference, factor: float) -> list[dict]:
    """pca_fit at k = 256 fitted on the first F held-out rows: does more fit data keep helping?"""
    results = []
    for rows in (128, 256, 512, len(modules[0].fit)):
        scores = np.zeros((len(modules[0].queries), len(modules[0].train)))
        for m in modules:
            weight = 1 / np.sqrt(m.lam + damping_of(m.lam, factor))
            zq, zn = m.queries * weight, m.train * weight
            zf = m.fit[:rows].astype(np.float64) * weight
            coordinates = Principal.of(zf - zf.mean(axis=0), np.vstack([zq, zn])).coordinates(256)
            scores += coordinates[: len(zq)] @ coordinates[len(zq) :].T
        results.append(
            {"fit_rows": rows, "numbers_per_module": min(256, rows), "damping": factor} | reference.compare(scores)
        )
    return results


def pooled_study(modules: list[Module], reference: Reference, factor: float) -> list[dict]:
    """A budget of k × #modules numbers shared across modules, by the held-out variance of z (top_fit_var)."""
    weighted = []
    for m in modules:
        weight = 1 / np.sqrt(m.lam + damping_of(m.lam, factor))
        weighted.append((m.queries * weight, m.train * weight, (m.fit.astype(np.float64) * weight).var(axis=0)))
    variance = np.concatenate([w[2] for w in weighted])
    bounds = np.cumsum([0] + [len(w[2]) for w in weighted])
    results = []
    for k in HEADLINE:
        chosen = np.zeros(len(variance), bool)
        chosen[top(variance, k * len(modules))] = True
        scores = sum(
            (zq[:, chosen[a:b]] @ zn[:, chosen[a:b]].T for (zq, zn, _), a, b in zip(weighted, bounds, bounds[1:])),
            np.zeros((len(modules[0].queries), len(modules[0].train))),
        )
        per_module = {m.name: int(chosen[a:b].sum()) for m, a, b in zip(modules, bounds, bounds[1:])}
        results.append(
            {"method": "top_fit_var_pooled", "numbers_per_module": k, "damping": factor, "allocation": per_module}
            | reference.compare(scores)
        )
    return results


def spectrum_summary(modules: list[Module], factor: float) -> dict:
    """Per module: how much of the held-out rows' (centred) whitened variance k coordinates or directions hold."""
    out = {}
    for m in modules:
        zf = m.fit.astype(np.float64) / np.sqrt(m.lam + damping_of(m.lam, factor))
        variance = np.sort(zf.var(axis=0))[::-1]
        centred = zf - zf.mean(axis=0)
        eigen = np.sort(np.linalg.eigvalsh(centred @ centred.T / len(zf)))[::-1]
        out[m.name] = {
            "size": m.size,
            "participation_ratio": float(eigen.sum() ** 2 / (eigen**2).sum()),
            **{f"coords_{k}": float(variance[:k].sum() / variance.sum()) for k in HEADLINE},
            **{f"pca_{k}": float(eigen[:k].sum() / eigen.sum()) for k in HEADLINE},
        }
    return out


# ---- outputs ------------------------------------------------------------------------------------------


def markdown(payload: dict) -> str:
    exact = payload["exact_default_lds"]
    lines = [payload["title"], "", f"exact EK-FAC (λ = 0.1 × mean Λ): LDS {exact:.3f}", ""]
    lines += ["## Exact EK-FAC variants", "", "| variant | damping × mean Λ | LDS | × exact |", "|---|---|---|---|"]
    for row in payload["exact"]:
        lines.append(
            f"| {row['variant']} | {row['damping']} | {row['lds']['mean']:.3f} | {row['lds']['mean'] / exact:.2f} |"
        )
    names = list(payload["effective_dimension"])
    lines += ["", "## Effective dimension Σ Λ/(Λ+λ) per module", ""]
    lines += ["| module | size | " + " | ".join(f"λ={f}×" for f in EXACT_DAMPINGS) + " |"]
    lines += ["|" + "---|" * (len(EXACT_DAMPINGS) + 2)]
    for name in names:
        values = payload["effective_dimension"][name]
        size = payload["spectrum"]["0.1"][name]["size"]
        lines.append(f"| {name} | {size} | " + " | ".join(f"{values[str(f)]:.0f}" for f in EXACT_DAMPINGS) + " |")
    for factor in COMPRESSION_DAMPINGS:
        reference = next(
            r["lds"]["mean"] for r in payload["exact"] if r["damping"] == factor and "fisher" in r["variant"]
        )
        lines += ["", f"## Compressions at λ = {factor} × mean Λ (exact at this damping: {reference:.3f})", ""]
        lines += ["LDS (× exact EK-FAC at the default damping, λ = 0.1 × mean Λ)", ""]
        lines += ["| method | " + " | ".join(f"k={k}" for k in BUDGETS) + " |", "|" + "---|" * (len(BUDGETS) + 1)]
        rows = [r for r in payload["compressions"] + payload["pooled"] if r["damping"] == factor]
        names = (*ORDER, "top_fit_var_pooled")
        for name in names:
            cells = []
            for k in BUDGETS:
                found = next((r for r in rows if r["method"] == name and r["numbers_per_module"] == k), None)
                cells.append("" if found is None else f"{found['lds']:.3f} ({found['fraction']:.2f}×)")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "Headline budgets: fraction of exact with a paired bootstrap 95% CI over queries (first seed)"]
        lines += ["and ρ, the correlation of the group predictions with exact EK-FAC's (mean over queries)", ""]
        lines += ["| method | " + " | ".join(f"k={k}: × exact [CI] | ρ" for k in HEADLINE) + " |"]
        lines += ["|" + "---|" * (2 * len(HEADLINE) + 1)]
        for name in names:
            cells = []
            for k in HEADLINE:
                found = next((r for r in rows if r["method"] == name and r["numbers_per_module"] == k), None)
                if found is None:
                    cells += ["", ""]
                    continue
                low, high = found["fraction_ci95"]
                cells += [f"{found['fraction']:.2f} [{low:.2f}, {high:.2f}]", f"{found['prediction_correlation']:.2f}"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## pca_fit (k = 256) against the number of held-out fit rows F (λ = 0.1 × mean Λ)", ""]
    lines += ["| F | k | LDS | × exact [CI] | ρ |", "|---|---|---|---|---|"]
    for r in payload["fit_sizes"]:
        low, high = r["fraction_ci95"]
        lines.append(
            f"| {r['fit_rows']} | {r['numbers_per_module']} | {r['lds']:.3f} | {r['fraction']:.2f} [{low:.2f}, {high:.2f}] "
            f"| {r['prediction_correlation']:.2f} |"
        )
    lines += ["", "## Held-out whitened variance captured (λ = 0.1 × mean Λ)", ""]
    lines += ["| module | participation ratio | top-256 coords | top-4096 coords | PCA 256 | PCA 4096 (≤ F) |"]
    lines += ["|---|---|---|---|---|---|"]
    for name, s in payload["spectrum"]["0.1"].items():
        lines.append(
            f"| {name} | {s['participation_ratio']:.0f} | {s['coords_256']:.2f} | {s['coords_4096']:.2f} | "
            f"{s['pca_256']:.2f} | {s['pca_4096']:.2f} |"
        )
    lines += ["", f"CLI check: {payload['cli_check']}", "", machine_line(), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--workdir", default="/tmp/tributary-lm-lds-oracle", help="model, rows, configs, stores")
    parser.add_argument("--name", default="lm_lds_oracle", help="results file stem under benchmarks/results")
    args = parser.parse_args()
    start = time.perf_counter()
    task = build_task(TaskSpec(train=256, queries=32))
    truth, _ = ground_truth(task, 0.5, 64, 2, 0, CACHE)  # the cached truth of benchmarks/lm_lds.py (refused if stale)
    work = Path(args.workdir)
    prepare_workdir(task, work)
    paths = index_stores(task, work)
    modules = load_modules(paths)
    print(f"stores ready ({time.perf_counter() - start:.0f} s): {[m.name for m in modules]}", flush=True)

    exact_rows, effective = exact_study(modules, truth)
    exact_default = next(r["lds"]["mean"] for r in exact_rows if r["damping"] == 0.1 and "fisher" in r["variant"])
    ours = exact_scores(modules, 0.1)
    reference = Reference.of(ours, truth)  # fractions are of exact EK-FAC at the default damping, paired by query
    cli = np.load(paths["cli_scores"])
    cli_check = {
        "cli_lds": lds(cli, truth)["mean"],
        "max_relative_difference": float(np.abs(ours - cli).max() / np.abs(cli).max()),
    }
    print("exact", json.dumps(exact_rows[2]["lds"]["mean"]), cli_check, flush=True)

    compressions, pooled, spectrum = [], [], {}
    for factor in COMPRESSION_DAMPINGS:
        compressions += compression_study(modules, reference, factor)
        pooled += pooled_study(modules, reference, factor)
        spectrum[str(factor)] = spectrum_summary(modules, factor)
    fit_sizes = fit_size_study(modules, reference, 0.1)

    title = (
        f"{task.name}: oracle compressions of exact EK-FAC, GPT-2 2×128, N={len(task.train_texts)}, "
        f"Q={len(task.query_texts)}, F={len(modules[0].fit)} held-out fit rows, 64 half-subsets × 2 seeds"
    )
    payload = {
        "title": title,
        "task": task.summary(),
        "held_out_fit_rows": len(modules[0].fit),
        "exact_default_lds": exact_default,
        "cli_check": cli_check,
        "exact": exact_rows,
        "effective_dimension": effective,
        "compressions": compressions,
        "pooled": pooled,
        "fit_sizes": fit_sizes,
        "spectrum": spectrum,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_result(args.name, payload)
    text = markdown(payload)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
