"""The per-log-SNR statistics of a flush as W&B values: a histogram of the sampled λ, per-band loss scalars, and
every `wandb.plots_every` flushes per-bin line plots over λ (a wandb.Table) and the loss-variance heatmap image."""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

BANDS = 8                                       # equal-width λ bands of the per-band scalars
TABLE_COLUMNS = ["logsnr", "count", "loss_mean", "loss_var", "wloss_mean", "weight_mean"]
LINE_PLOTS = (("loss_mean", "mean loss E[ℓ | λ]"), ("loss_var", "loss variance Var[ℓ | λ]"),
              ("weight_mean", "effective weight E[w | λ]"))


def statistics_data(wandb, edges: np.ndarray, arrays: dict[str, np.ndarray]) -> dict:
    """The λ histogram (`stats/logsnr_hist`) and per-band scalars (`logsnr_band/*`) of one flush's per-bin
    `arrays`."""
    return {"stats/logsnr_hist": wandb.Histogram(np_histogram=(arrays["count"], edges)), **band_scalars(edges, arrays)}


def plots_data(wandb, edges: np.ndarray, arrays: dict[str, np.ndarray], step: int, history: dict[str, list],
               title: str) -> dict:
    """Per-bin line plots over λ (`stats/*_vs_logsnr`) of this flush, and the heatmap of Var[ℓ | λ] over the
    flushes of `history` (`step`, `loss_var` rows; the whole run, also before a resume)."""
    centers = 0.5 * (edges[1:] + edges[:-1])
    rows = [[float(centers[i]), int(arrays["count"][i]), *(_num(arrays[k][i]) for k in TABLE_COLUMNS[2:])]
            for i in range(len(centers))]                     # one row per bin; None where empty
    table = wandb.Table(columns=TABLE_COLUMNS, data=rows)
    data = {f"stats/{key}_vs_logsnr": wandb.plot.line(table, "logsnr", key, title=f"{name} at step {step}")
            for key, name in LINE_PLOTS}
    image = heatmap(np.asarray(history["step"]), edges, np.stack(history["loss_var"]), title)
    if image is not None:
        data["stats/loss_var_heatmap"] = wandb.Image(image, caption=f"Var[ℓ | λ] up to step {step}")
    return data


def band_scalars(edges: np.ndarray, stats: dict, bands: int = BANDS) -> dict[str, float]:
    """Per-band loss mean and pooled variance from one flush's per-bin statistics.

    The bins are grouped into `bands` equal-width intervals of λ (by bin centre). With n_b, m_b, s²_b
    the count, mean and unbiased variance of bin b in band B:
        loss_mean = Σ n_b m_b / Σ n_b                       (the mean of every loss drawn in the band)
        loss_var  = Σ (n_b − 1) s²_b / Σ (n_b − 1)          (pooled within-bin variance: Var[ℓ | λ]
                                                             averaged over the band, without the spread
                                                             of the bin means along λ)
    A key is left out when its band has no sample (mean) or no bin with two samples (variance).
    Names: `logsnr_band/b<k>_<lo>_<hi>/loss_mean`, λ written with `m` for minus and `p` for the point.
    """
    edges = np.asarray(edges, dtype=np.float64)
    count = np.asarray(stats["count"], dtype=np.float64)
    mean = np.nan_to_num(np.asarray(stats["loss_mean"], dtype=np.float64))
    var = np.nan_to_num(np.asarray(stats["loss_var"], dtype=np.float64))
    lo, hi = edges[0], edges[-1]
    centers = 0.5 * (edges[1:] + edges[:-1])
    band_of = np.clip(np.floor((centers - lo) / (hi - lo) * bands), 0, bands - 1).astype(int)
    out: dict[str, float] = {}
    for band in np.unique(band_of):
        inside = np.flatnonzero(band_of == band)
        key = f"logsnr_band/b{band}_{_lambda_label(edges[inside[0]])}_{_lambda_label(edges[inside[-1] + 1])}"
        n, m, s2 = count[inside], mean[inside], var[inside]
        if n.sum() > 0:
            out[f"{key}/loss_mean"] = float((n * m).sum() / n.sum())
        dof = np.clip(n - 1, 0, None)
        if dof.sum() > 0:
            out[f"{key}/loss_var"] = float((dof * s2).sum() / dof.sum())
    return out


def _lambda_label(value: float) -> str:
    text = f"{round(float(value), 2) + 0.0:g}"                  # + 0.0: no "-0"
    return text.replace("-", "m").replace(".", "p")


def heatmap(steps: np.ndarray, edges: np.ndarray, loss_var: np.ndarray, run_name: str):
    """RGB array of the variance heatmap (bins × steps); None if it cannot be drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from diffrun.monitoring.plots import draw_variance_heatmap  # deferred: matplotlib

    try:
        fig = Figure(figsize=(7, 4.2), dpi=100, layout="constrained")
        canvas = FigureCanvasAgg(fig)
        ax = fig.subplots()
        draw_variance_heatmap(ax, steps, edges, loss_var, colorbar_fig=fig)
        ax.set_title(f"{run_name}: loss variance over λ and training", fontsize=9)
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()
    except Exception as exc:  # noqa: BLE001 - a plot must never stop training
        log.warning("could not render the loss-variance heatmap: %s", exc)
        return None


def _num(value: float):
    value = float(value)
    return value if np.isfinite(value) else None
