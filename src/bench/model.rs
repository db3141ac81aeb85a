//! The capacity model fitted to the measured sends: ordinary least squares with non-negative
//! coefficients (a negative one is dropped and the rest refitted), leave-one-size-out
//! validation and the projection table.
//!
//! Wall time: `wall(N, K) = a + N·(s + p / K)` with `K = min(workers, cores)`: a fixed
//! start-up and suppression-index cost `a`, a serial cost per recipient `s` (the reader and
//! the writers) and a parallel cost per recipient `p` that the decision workers share
//! (Amdahl's law). Peak RSS: `rss(N, K) = m0 + m1·N + m2·K` (fixed structures, what grows with
//! the campaign, buffers per worker).

use serde::Serialize;

/// One measured configuration (the median of its runs).
#[derive(Debug, Clone, Copy)]
pub struct Obs {
    /// Recipients.
    pub rows: f64,
    /// Effective workers: `min(workers, cores)`.
    pub k: f64,
    /// Wall seconds.
    pub wall: f64,
    /// Peak RSS, bytes.
    pub rss: f64,
}

/// A regressor of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Term {
    /// 1.
    Const,
    /// N.
    Rows,
    /// N / K.
    RowsPerWorker,
    /// K.
    Workers,
}

impl Term {
    fn value(self, rows: f64, k: f64) -> f64 {
        match self {
            Term::Const => 1.0,
            Term::Rows => rows,
            Term::RowsPerWorker => rows / k.max(1.0),
            Term::Workers => k,
        }
    }
}

/// A fitted linear model.
#[derive(Debug, Clone, Serialize)]
pub struct Fit {
    /// Terms kept, with their coefficients.
    pub terms: Vec<(Term, f64)>,
}

impl Fit {
    /// The prediction at `(rows, k)`.
    pub fn predict(&self, rows: f64, k: f64) -> f64 {
        self.terms.iter().map(|(t, c)| c * t.value(rows, k)).sum()
    }

    /// The coefficient of `t` (0 when dropped).
    #[cfg(test)]
    pub fn coef(&self, t: Term) -> f64 {
        self.terms
            .iter()
            .find(|(x, _)| *x == t)
            .map(|x| x.1)
            .unwrap_or(0.0)
    }
}

/// Least squares `x·β ≈ y` by the normal equations (columns scaled to unit maximum first);
/// `None` when the columns are linearly dependent.
pub fn lstsq(x: &[Vec<f64>], y: &[f64]) -> Option<Vec<f64>> {
    let n = x.first()?.len();
    if n == 0 || x.len() < n {
        return None;
    }
    let scale: Vec<f64> = (0..n)
        .map(|j| {
            x.iter()
                .map(|r| r[j].abs())
                .fold(0.0, f64::max)
                .max(f64::MIN_POSITIVE)
        })
        .collect();
    // A = XᵀX, b = Xᵀy over the scaled columns, solved by Gaussian elimination with partial
    // pivoting.
    let mut a = vec![vec![0.0; n + 1]; n];
    for (row, &yi) in x.iter().zip(y) {
        for i in 0..n {
            let xi = row[i] / scale[i];
            for j in 0..n {
                a[i][j] += xi * row[j] / scale[j];
            }
            a[i][n] += xi * yi;
        }
    }
    let norm = a
        .iter()
        .flat_map(|r| r[..n].iter())
        .fold(0.0f64, |m, v| m.max(v.abs()));
    for c in 0..n {
        let p = (c..n).max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))?;
        if a[p][c].abs() <= norm * 1e-10 {
            return None;
        }
        a.swap(c, p);
        let pivot = a[c].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != c {
                let f = row[c] / pivot[c];
                for (x, p) in row.iter_mut().zip(&pivot).skip(c) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..n).map(|i| a[i][n] / a[i][i] / scale[i]).collect())
}

/// Fits `terms` to `(obs, target)` with coefficients ≥ 0: the most negative coefficient's
/// term is dropped and the rest refitted until none is negative.
pub fn fit_nonneg(obs: &[Obs], target: impl Fn(&Obs) -> f64, terms: &[Term]) -> Option<Fit> {
    let mut terms = terms.to_vec();
    let y: Vec<f64> = obs.iter().map(&target).collect();
    while !terms.is_empty() {
        let x: Vec<Vec<f64>> = obs
            .iter()
            .map(|o| terms.iter().map(|t| t.value(o.rows, o.k)).collect())
            .collect();
        match lstsq(&x, &y) {
            Some(beta) => {
                let (worst, min) = beta
                    .iter()
                    .enumerate()
                    .min_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, v)| (i, *v))?;
                if min >= 0.0 {
                    return Some(Fit {
                        terms: terms.into_iter().zip(beta).collect(),
                    });
                }
                terms.remove(worst);
            }
            // Dependent columns: drop the last term (the most specific) and try again.
            None => {
                terms.pop();
            }
        }
    }
    None
}

fn distinct(v: impl Iterator<Item = f64>) -> usize {
    let mut v: Vec<f64> = v.collect();
    v.sort_by(f64::total_cmp);
    v.dedup();
    v.len()
}

/// The wall-time terms the observations can identify: an intercept needs two sizes, the
/// serial/parallel split two worker counts.
pub fn wall_terms(obs: &[Obs]) -> Vec<Term> {
    let sizes = distinct(obs.iter().map(|o| o.rows));
    let ks = distinct(obs.iter().map(|o| o.k));
    let mut t = Vec::new();
    if sizes >= 2 {
        t.push(Term::Const);
    }
    t.push(Term::Rows);
    if ks >= 2 {
        t.push(Term::RowsPerWorker);
    }
    t
}

/// The memory terms the observations can identify.
pub fn rss_terms(obs: &[Obs]) -> Vec<Term> {
    let sizes = distinct(obs.iter().map(|o| o.rows));
    let ks = distinct(obs.iter().map(|o| o.k));
    let mut t = vec![Term::Const];
    if sizes >= 2 {
        t.push(Term::Rows);
    }
    if ks >= 2 {
        t.push(Term::Workers);
    }
    t
}

/// Both fits of one input format.
#[derive(Debug, Clone, Serialize)]
pub struct Model {
    /// Wall seconds.
    pub wall: Fit,
    /// Peak RSS bytes.
    pub rss: Fit,
}

/// Fits the model to `obs`; `None` for no observations.
pub fn fit(obs: &[Obs]) -> Option<Model> {
    Some(Model {
        wall: fit_nonneg(obs, |o| o.wall, &wall_terms(obs))?,
        rss: fit_nonneg(obs, |o| o.rss, &rss_terms(obs))?,
    })
}

/// One held-out prediction.
#[derive(Debug, Clone, Serialize)]
pub struct HeldOut {
    /// Recipients of the held-out point.
    pub rows: u64,
    /// Workers (effective).
    pub workers: usize,
    /// Measured wall seconds (median).
    pub wall_secs: f64,
    /// Wall seconds predicted by the model fitted without this size (`None`: nothing left to
    /// fit).
    pub predicted_wall_secs: Option<f64>,
    /// `(predicted − measured) / measured`.
    pub wall_rel_error: Option<f64>,
    /// Measured peak RSS bytes.
    pub peak_rss: f64,
    /// Predicted peak RSS bytes.
    pub predicted_peak_rss: Option<f64>,
    /// `(predicted − measured) / measured`.
    pub rss_rel_error: Option<f64>,
    /// Terms of the model fitted without this size.
    pub terms: Vec<Term>,
}

/// Leave-one-size-out: for each measured size, the model fitted to the other sizes predicts
/// this size's points.
pub fn leave_one_size_out(obs: &[Obs]) -> Vec<HeldOut> {
    let mut sizes: Vec<f64> = obs.iter().map(|o| o.rows).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    let mut out = Vec::new();
    for s in sizes {
        let train: Vec<Obs> = obs.iter().filter(|o| o.rows != s).copied().collect();
        let m = fit(&train);
        for o in obs.iter().filter(|o| o.rows == s) {
            let pw = m.as_ref().map(|m| m.wall.predict(o.rows, o.k));
            let pr = m.as_ref().map(|m| m.rss.predict(o.rows, o.k));
            out.push(HeldOut {
                rows: o.rows as u64,
                workers: o.k as usize,
                wall_secs: o.wall,
                predicted_wall_secs: pw,
                wall_rel_error: pw.map(|p| (p - o.wall) / o.wall),
                peak_rss: o.rss,
                predicted_peak_rss: pr,
                rss_rel_error: pr.map(|p| (p - o.rss) / o.rss),
                terms: m
                    .as_ref()
                    .map(|m| m.wall.terms.iter().map(|t| t.0).collect())
                    .unwrap_or_default(),
            });
        }
    }
    out
}

/// Recipients of the projection table.
pub const PROJECT_ROWS: [u64; 4] = [1_000_000, 10_000_000, 50_000_000, 100_000_000];
/// Cores of the projection table.
pub const PROJECT_CORES: [usize; 4] = [2, 4, 8, 16];

/// One row of the projection table.
#[derive(Debug, Clone, Serialize)]
pub struct Projection {
    /// Recipients.
    pub recipients: u64,
    /// Cores (= workers).
    pub cores: usize,
    /// Expected wall seconds.
    pub wall_secs: f64,
    /// Expected recipients per second.
    pub rows_per_sec: f64,
    /// Expected peak RSS bytes.
    pub peak_rss: f64,
    /// Beyond the measured sizes or worker counts.
    pub extrapolated: bool,
    /// Why it extrapolates (`size`, `cores`).
    pub beyond: Vec<String>,
}

/// The projection table for `model`, flagged against the measured observations.
pub fn project(model: &Model, obs: &[Obs]) -> Vec<Projection> {
    let max_rows = obs.iter().map(|o| o.rows).fold(0.0, f64::max);
    let min_k = obs.iter().map(|o| o.k).fold(f64::INFINITY, f64::min);
    let max_k = obs.iter().map(|o| o.k).fold(0.0, f64::max);
    let mut out = Vec::new();
    for &n in &PROJECT_ROWS {
        for &k in &PROJECT_CORES {
            let wall = model.wall.predict(n as f64, k as f64);
            let mut beyond = Vec::new();
            if n as f64 > max_rows {
                beyond.push("size".to_string());
            }
            if (k as f64) > max_k || (k as f64) < min_k {
                beyond.push("cores".to_string());
            }
            out.push(Projection {
                recipients: n,
                cores: k,
                wall_secs: wall,
                rows_per_sec: if wall > 0.0 { n as f64 / wall } else { 0.0 },
                peak_rss: model.rss.predict(n as f64, k as f64),
                extrapolated: !beyond.is_empty(),
                beyond,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(rows: f64, k: f64, wall: f64, rss: f64) -> Obs {
        Obs { rows, k, wall, rss }
    }

    #[test]
    fn recovers_an_exact_amdahl_model() {
        // wall = 0.5 + N·(1e-7 + 4e-7 / K), rss = 1e8 + 10·N + 5e6·K
        let f = |n: f64, k: f64| obs(n, k, 0.5 + n * (1e-7 + 4e-7 / k), 1e8 + 10.0 * n + 5e6 * k);
        let o = vec![
            f(1e5, 1.0),
            f(1e6, 1.0),
            f(1e6, 2.0),
            f(1e7, 2.0),
            f(1e7, 4.0),
        ];
        let m = fit(&o).unwrap();
        assert!((m.wall.coef(Term::Const) - 0.5).abs() < 1e-6);
        assert!((m.wall.coef(Term::Rows) - 1e-7).abs() < 1e-12);
        assert!((m.wall.coef(Term::RowsPerWorker) - 4e-7).abs() < 1e-12);
        assert!((m.rss.coef(Term::Rows) - 10.0).abs() < 1e-6);
        for h in leave_one_size_out(&o) {
            assert!(h.wall_rel_error.unwrap().abs() < 1e-6, "{h:?}");
        }
        let p = project(&m, &o);
        assert_eq!(p.len(), 16);
        assert!(p.iter().any(|p| !p.extrapolated));
        assert!(p
            .iter()
            .all(|p| p.extrapolated == (p.recipients > 10_000_000 || p.cores > 4)));
    }

    #[test]
    fn negative_coefficients_are_dropped_and_one_size_goes_through_the_origin() {
        // Memory falling with size would need m1 < 0: dropped, a constant remains.
        let o = vec![obs(1e3, 1.0, 1.0, 2e8), obs(2e3, 1.0, 2.0, 1.9e8)];
        let m = fit(&o).unwrap();
        assert_eq!(m.rss.coef(Term::Rows), 0.0);
        assert!((m.rss.coef(Term::Const) - 1.95e8).abs() < 1.0);
        let h = leave_one_size_out(&o);
        assert_eq!(h.len(), 2);
        // Trained on 2000 rows alone: wall = N · 1e-3, exact for 1000 rows.
        assert!(h[0].wall_rel_error.unwrap().abs() < 1e-9);
        assert_eq!(h[0].terms, vec![Term::Rows]);
        assert!(leave_one_size_out(&o[..1])[0].wall_rel_error.is_none());
    }
}
